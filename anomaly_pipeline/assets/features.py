"""The 14 model features per bar, computed from stored prices with their warm-up history."""

import dagster as dg
import pandas as pd
from pymongo.errors import PyMongoError

from anomaly_pipeline.assets.metadata import window_metadata
from anomaly_pipeline.assets.partial_failure import fail_after_storing
from anomaly_pipeline.assets.prices import prices_asset_key
from anomaly_pipeline.features import LOOKBACK_BARS, compute_features
from anomaly_pipeline.partitions import (
    BAR_BACKFILL_POLICY,
    TICKER_DIMENSION,
    WINDOW_DIMENSION,
    bar_windows,
)
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import Market

# Features of a window read the bars just before it (rolling windows), so each partition also
# depends on the previous window of the same ticker.
_SAME_AND_PREVIOUS_WINDOW = dg.MultiPartitionMapping(
    {
        TICKER_DIMENSION: dg.DimensionPartitionMapping(
            TICKER_DIMENSION, dg.IdentityPartitionMapping()
        ),
        WINDOW_DIMENSION: dg.DimensionPartitionMapping(
            WINDOW_DIMENSION, dg.TimeWindowPartitionMapping(start_offset=-1)
        ),
    }
)


def features_asset_key(market: Market, interval: str) -> dg.AssetKey:
    return dg.AssetKey([market.key_prefix, interval, "features"])


def build_features_asset(
    market: Market, interval: str, partitions_def: dg.MultiPartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=features_asset_key(market, interval),
        partitions_def=partitions_def,
        backfill_policy=BAR_BACKFILL_POLICY,
        deps=[
            dg.AssetDep(
                prices_asset_key(market, interval), partition_mapping=_SAME_AND_PREVIOUS_WINDOW
            )
        ],
        group_name=f"{market.key_prefix}_{interval}",
        kinds={"pandas", "mongodb"},
        description=(
            f"The 14 features of every {interval} {market.name} bar (returns, volatility, volume, "
            f"range, momentum), stored in MongoDB collection `bar_features`, one document per "
            f"partition. Rolling windows use the {LOOKBACK_BARS} stored bars before the window, "
            "so a partition's features do not depend on how history was split. Bars without "
            "enough history are left out and counted as warm-up, never filled in."
        ),
    )
    def features(context: dg.AssetExecutionContext, mongo: MongoResource) -> None:
        store = BarStore(mongo.get_database())
        windows = bar_windows(partitions_def, context.partition_keys, market, interval)
        row_total = warmup_total = 0
        stored: dict[str, dict[str, dg.MetadataValue]] = {}
        for window in windows:
            where = f"{window.ticker} {interval} partition {window.partition_key}"
            try:
                bars = store.read_bars(window.ticker, interval, window.start, window.end)
                history = store.bars_before(window.ticker, interval, window.start, LOOKBACK_BARS)
                result = compute_features(pd.concat([history, bars]), start=window.start)
                store.write_features(
                    window,
                    result.features,
                    warmup_excluded=result.warmup_excluded,
                    run_id=context.run.run_id,
                )
            except ValueError as exc:
                fail_after_storing(context, stored, [f"{where}: {exc}"], planned=len(windows))
            except PyMongoError as exc:
                problem = f"{where}: MongoDB failed the read or write ({type(exc).__name__}: {exc})"
                fail_after_storing(context, stored, [problem], planned=len(windows))
            row_total += len(result.features)
            warmup_total += result.warmup_excluded
            metadata = {
                **window_metadata(window),
                "bars": dg.MetadataValue.int(len(bars)),
                "feature_rows": dg.MetadataValue.int(len(result.features)),
                "warmup_excluded": dg.MetadataValue.int(result.warmup_excluded),
                "history_bars_used": dg.MetadataValue.int(len(history)),
            }
            context.add_asset_metadata(metadata, partition_key=window.partition_key)
            stored[window.partition_key] = metadata
        context.log.info(
            f"computed {row_total} feature rows for {len(windows)} partition(s); "
            f"{warmup_total} warm-up bar(s) excluded"
        )

    return features
