"""The Dagster instance the CLI uses: the one under ``$DAGSTER_HOME``, or the pipeline home's."""

from __future__ import annotations

import os

import dagster as dg

from anomaly_pipeline.settings import dagster_home

_INSTANCE_SETTINGS = """\
# Dagster instance of the anomaly pipeline's local home (written by anomaly-pipeline).
telemetry:
  enabled: false
# Fail runs whose worker process died, so the detection sensor can request them again.
run_monitoring:
  enabled: true
"""


def local_instance() -> dg.DagsterInstance:
    """The persistent instance shared by the CLI and ``dagster dev`` run from the same folder."""
    home = dagster_home()
    settings = home / "dagster.yaml"
    if not settings.exists():
        settings.write_text(_INSTANCE_SETTINGS)
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()
