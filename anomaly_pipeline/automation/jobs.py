"""The jobs that schedules and sensors launch, per market and interval.

A job's assets share one partitions definition, so each market and interval has its own
ingestion job (prices, then features) and detection job (features, then anomalies); one
retraining job per market trains the models of all its intervals.
"""

from __future__ import annotations

import dagster as dg

from anomaly_pipeline.assets.anomalies import anomalies_asset_key
from anomaly_pipeline.assets.features import features_asset_key
from anomaly_pipeline.assets.models import model_asset_key
from anomaly_pipeline.assets.prices import prices_asset_key
from anomaly_pipeline.universe import Market


def ingestion_job_name(market: Market, interval: str) -> str:
    return f"ingest_{market.key_prefix}_{interval}"


def detection_job_name(market: Market, interval: str) -> str:
    return f"detect_{market.key_prefix}_{interval}"


def retraining_job_name(market: Market) -> str:
    return f"retrain_{market.key_prefix}_models"


def ingestion_job(market: Market, interval: str) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        ingestion_job_name(market, interval),
        selection=dg.AssetSelection.assets(
            prices_asset_key(market, interval), features_asset_key(market, interval)
        ),
        description=(
            f"Fetch {market.name} {interval} bars from the configured price source into "
            "`price_bars` and compute their features. Bars that changed mark their window for "
            "detection."
        ),
        tags={"anomaly_pipeline/stage": "ingestion"},
    )


def detection_job(market: Market, interval: str) -> dg.UnresolvedAssetJobDefinition:
    # Features are recomputed before scoring: a window is pending because its bars changed,
    # and features read from stored bars, so scoring older features would miss the change.
    return dg.define_asset_job(
        detection_job_name(market, interval),
        selection=dg.AssetSelection.assets(
            features_asset_key(market, interval), anomalies_asset_key(market, interval)
        ),
        description=(
            f"Recompute features and detect anomalies for {market.name} {interval} partitions "
            "whose bars changed or whose latest detection used an older model."
        ),
        tags={"anomaly_pipeline/stage": "detection"},
    )


def retraining_job(market: Market) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        retraining_job_name(market),
        selection=dg.AssetSelection.assets(
            *(model_asset_key(market, interval) for interval in market.intervals)
        ),
        description=(
            f"Retrain the IsolationForest of every {market.name} interval on all stored "
            "features. Unchanged data keeps the current model version; a new version makes the "
            "detection sensor re-score each ticker's latest window."
        ),
        tags={"anomaly_pipeline/stage": "retraining"},
    )
