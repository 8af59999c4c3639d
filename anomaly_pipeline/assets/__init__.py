"""Asset factories: each market and interval of the universe gets prices → features → model →
anomalies, keyed ``<market>/<interval>/<stage>``."""

from __future__ import annotations

import dagster as dg

from anomaly_pipeline.assets.anomalies import build_anomalies_asset
from anomaly_pipeline.assets.features import build_features_asset
from anomaly_pipeline.assets.models import build_model_asset
from anomaly_pipeline.assets.prices import build_prices_asset
from anomaly_pipeline.partitions import bar_partitions
from anomaly_pipeline.universe import Market, Universe


def build_pipeline_assets(
    market: Market, interval: str, universe: Universe
) -> list[dg.AssetsDefinition]:
    partitions_def = bar_partitions(market, interval, universe.history_start[interval])
    return [
        build_prices_asset(market, interval, partitions_def),
        build_features_asset(market, interval, partitions_def),
        build_model_asset(market, interval),
        build_anomalies_asset(market, interval, partitions_def),
    ]


def build_all_assets(universe: Universe) -> list[dg.AssetsDefinition]:
    return [
        asset
        for market, interval in universe.pairs()
        for asset in build_pipeline_assets(market, interval, universe)
    ]
