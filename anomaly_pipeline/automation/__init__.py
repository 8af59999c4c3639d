"""Running the pipeline unattended: ingestion and retraining schedules, detection sensors, and
the detection state they decide from (``automation.state``).

``build_automation_definitions`` gives the jobs, schedules and sensors of a universe; see
``automation.schedules`` for which of them start running by default and why.
"""

from __future__ import annotations

import dagster as dg

from anomaly_pipeline.universe import Universe


def build_automation_definitions(universe: Universe) -> dg.Definitions:
    """Schedules, sensors and the jobs they launch, for every market and interval."""
    # Imported here, not at module level: the asset modules import this package's detection
    # state, and the schedules and sensors import the asset modules.
    from anomaly_pipeline.automation.schedules import build_schedules
    from anomaly_pipeline.automation.sensors import detection_sensors

    # Each job is defined once, by the schedule or sensor that launches it: ingestion and
    # retraining jobs by the schedules, detection jobs by the sensors.
    return dg.Definitions(schedules=build_schedules(universe), sensors=detection_sensors(universe))
