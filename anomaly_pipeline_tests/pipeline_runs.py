"""Helpers for tests that run the real assets through Dagster on the shipped sample data."""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.assets import build_pipeline_assets
from anomaly_pipeline.universe import Universe

STAGES = ("prices", "features", "model", "anomalies")


def pipeline_assets(
    universe: Universe, market: str, interval: str
) -> dict[str, dg.AssetsDefinition]:
    """The four assets of one market and interval, by stage name."""
    assets = build_pipeline_assets(universe.markets[market], interval, universe)
    return dict(zip(STAGES, assets, strict=True))


def materialize_range(
    assets: dict[str, dg.AssetsDefinition],
    stages: tuple[str, ...],
    first_key: str,
    last_key: str,
    *,
    resources: dict,
    instance: dg.DagsterInstance,
) -> dg.ExecuteInProcessResult:
    """One ranged run of the given stages over ``first_key..last_key`` (one ticker's windows)."""
    tags = {}
    if first_key == last_key:
        return dg.materialize(
            [assets[stage] for stage in stages],
            partition_key=first_key,
            resources=resources,
            instance=instance,
        )
    tags = {ASSET_PARTITION_RANGE_START_TAG: first_key, ASSET_PARTITION_RANGE_END_TAG: last_key}
    return dg.materialize(
        [assets[stage] for stage in stages], tags=tags, resources=resources, instance=instance
    )


def train(
    assets: dict[str, dg.AssetsDefinition],
    *,
    resources: dict,
    instance: dg.DagsterInstance,
    run_config: dict | None = None,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [assets["model"]], resources=resources, instance=instance, run_config=run_config
    )
