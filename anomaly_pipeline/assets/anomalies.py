"""Anomalous bars per ticker and window, scored by the market's current model."""

import time

import dagster as dg

from anomaly_pipeline.assets.features import features_asset_key
from anomaly_pipeline.assets.metadata import trigger_of, window_metadata
from anomaly_pipeline.assets.models import model_asset_key
from anomaly_pipeline.audit import AuditTrail, run_started_at
from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.charts import MAX_CHARTS_PER_STEP, anomaly_chart_metadata, partitions_to_chart
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.detection import detect
from anomaly_pipeline.modeling.model_store import ModelStoreResource, ModelUnavailableError
from anomaly_pipeline.partitions import BAR_BACKFILL_POLICY, bar_windows
from anomaly_pipeline.storage.anomaly_store import AnomalyStore
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.universe import Market


def anomalies_asset_key(market: Market, interval: str) -> dg.AssetKey:
    return dg.AssetKey([market.key_prefix, interval, "anomalies"])


def build_anomalies_asset(
    market: Market, interval: str, partitions_def: dg.MultiPartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=anomalies_asset_key(market, interval),
        partitions_def=partitions_def,
        backfill_policy=BAR_BACKFILL_POLICY,
        deps=[features_asset_key(market, interval), model_asset_key(market, interval)],
        group_name=f"{market.key_prefix}_{interval}",
        kinds={"scikitlearn", "mongodb"},
        description=(
            f"{market.name} {interval} bars whose anomaly score passes the current model's "
            "threshold, stored in MongoDB collection `anomalies` (one document per bar, `_id` "
            "TICKER|interval|bar start in UTC). Each run scores the partition's whole window and "
            "replaces its anomaly set; running it again never duplicates a document. Every run "
            "also records, per ticker, what it covered and found in collection `detection_runs` "
            "(the audit trail), and partitions with anomalies carry a chart of their closes."
        ),
    )
    def anomalies(context: dg.AssetExecutionContext, model_store: ModelStoreResource) -> None:
        started = time.monotonic()
        try:
            model = model_store.current_model(market.name, interval)
        except ModelUnavailableError as exc:
            raise dg.Failure(str(exc)) from exc
        database = model_store.store().database
        bar_store = BarStore(database)
        anomaly_store = AnomalyStore(database)
        windows = bar_windows(partitions_def, context.partition_keys, market, interval)

        features_by_window, bars_by_window = [], []
        warmup_by_partition: dict[str, int] = {}
        for window in windows:
            document = bar_store.partition_document("bar_features", window)
            if document is None:
                raise dg.Failure(
                    f"{window.ticker} {interval} partition {window.partition_key}: features are "
                    "not stored yet; materialize the features asset for this partition first"
                )
            warmup_by_partition[window.partition_key] = document["warmup_excluded"]
            features = bar_store.read_features([window.ticker], interval, window.start, window.end)
            features_by_window.append(features[list(FEATURE_NAMES)])
            bars_by_window.append(
                bar_store.read_bars(window.ticker, interval, window.start, window.end)
            )

        try:
            detections = detect(
                model,
                windows,
                features_by_window,
                bars_by_window,
                run_id=context.run.run_id,
                trigger=trigger_of(context.run.tags),
            )
        except ValueError as exc:
            # Raised before any write: every stored anomaly of the run's partitions is kept.
            raise dg.Failure(f"{market.name} {interval} anomalies: {exc}") from exc
        found = 0
        charted = partitions_to_chart(detections, MAX_CHARTS_PER_STEP)
        for detection, bars in zip(detections, bars_by_window, strict=True):
            window = detection.window
            counts = anomaly_store.replace_window(
                window.ticker, interval, window.start, window.end, detection.documents
            )
            # Only once the window's anomalies are replaced may its pending mark be cleared.
            DetectionState(database).record_detection(
                window,
                scored_bars=bars,
                model_version=model.version,
                model_hash=model.sha256,
                anomalies=len(detection.documents),
                run_id=context.run.run_id,
            )
            found += len(detection.documents)
            metadata = {
                **window_metadata(window),
                "bars": dg.MetadataValue.int(len(bars)),
                "warmup_excluded": dg.MetadataValue.int(warmup_by_partition[window.partition_key]),
                "bars_scored": dg.MetadataValue.int(detection.scored_bars),
                "anomalies": dg.MetadataValue.int(len(detection.documents)),
                "anomaly_rate": dg.MetadataValue.float(
                    len(detection.documents) / detection.scored_bars
                    if detection.scored_bars
                    else 0.0
                ),
                "removed_stale": dg.MetadataValue.int(counts["removed"]),
                "model_version": dg.MetadataValue.text(model.version),
                "model_hash": dg.MetadataValue.text(model.sha256),
                "threshold": dg.MetadataValue.float(model.threshold),
                "trigger": dg.MetadataValue.text(trigger_of(context.run.tags)),
            }
            if str(window.partition_key) in charted:
                metadata["chart"] = anomaly_chart_metadata(
                    bars,
                    [document["timestamp"] for document in detection.documents],
                    title=f"{window.partition_key} ({interval}): closes with anomalies marked",
                    timezone=market.timezone,
                )
            metadata["duration_seconds"] = dg.MetadataValue.float(
                round(time.monotonic() - started, 3)
            )
            context.add_asset_metadata(metadata, partition_key=window.partition_key)

        AuditTrail(database).record_detection(
            run=context.run,
            trigger=trigger_of(context.run.tags),
            run_started_at=run_started_at(context.instance, context.run.run_id),
            market=market,
            interval=interval,
            model=model,
            detections=detections,
            detection_seconds=time.monotonic() - started,
        )
        context.log.info(
            f"scored {sum(d.scored_bars for d in detections)} bars in {len(windows)} partition(s) "
            f"with {model.version}; {found} anomalies"
        )

    return anomalies
