"""The Dagster code location: assets, checks, jobs, schedules, sensors and resources, assembled.

Each area builds its own ``dg.Definitions`` from the universe; this module only merges them.
"""

from __future__ import annotations

import dagster as dg

from anomaly_pipeline.assets import build_all_assets
from anomaly_pipeline.automation import build_automation_definitions
from anomaly_pipeline.resources import build_resources
from anomaly_pipeline.traceability import build_traceability_definitions
from anomaly_pipeline.universe import Universe, load_universe
from anomaly_pipeline.universe_assets import build_universe_definitions
from anomaly_pipeline.verification import build_verification_definitions


def build_definitions(universe: Universe | None = None) -> dg.Definitions:
    universe = universe or load_universe()
    return dg.Definitions.merge(
        dg.Definitions(assets=build_all_assets(universe), resources=build_resources()),
        build_automation_definitions(universe),
        build_traceability_definitions(universe),
        build_verification_definitions(universe),
        build_universe_definitions(universe),
    )


defs = build_definitions()
