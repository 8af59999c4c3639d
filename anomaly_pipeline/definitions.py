"""The Dagster code location: assets, jobs, schedules, sensors and resources, assembled."""

from __future__ import annotations

import dagster as dg

from anomaly_pipeline.assets import build_all_assets
from anomaly_pipeline.resources import build_resources
from anomaly_pipeline.universe import Universe, load_universe


def build_definitions(universe: Universe | None = None) -> dg.Definitions:
    universe = universe or load_universe()
    return dg.Definitions(assets=build_all_assets(universe), resources=build_resources())


defs = build_definitions()
