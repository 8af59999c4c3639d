"""Price bars per ticker and window, fetched from the configured source into MongoDB."""

import dagster as dg
from pymongo.errors import PyMongoError

from anomaly_pipeline.assets.metadata import window_metadata
from anomaly_pipeline.assets.partial_failure import fail_after_storing
from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.intervals import interval_spec
from anomaly_pipeline.partitions import BAR_BACKFILL_POLICY, bar_windows
from anomaly_pipeline.prices.frames import PriceDataError
from anomaly_pipeline.prices.source import PriceSource
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import Market


def prices_asset_key(market: Market, interval: str) -> dg.AssetKey:
    return dg.AssetKey([market.key_prefix, interval, "prices"])


def build_prices_asset(
    market: Market, interval: str, partitions_def: dg.MultiPartitionsDefinition
) -> dg.AssetsDefinition:
    spec = interval_spec(interval)

    @dg.asset(
        key=prices_asset_key(market, interval),
        partitions_def=partitions_def,
        backfill_policy=BAR_BACKFILL_POLICY,
        group_name=f"{market.key_prefix}_{interval}",
        kinds={"python", "mongodb"},
        description=(
            f"{interval} OHLCV bars of {market.name} tickers, one partition per ticker and "
            f"{spec.window_label} ({market.timezone}). Stored in MongoDB collection `price_bars`, "
            "one document per partition, on the adjusted price basis with UTC bar-start "
            "timestamps. A window in which the market was closed, or that ends before the "
            "ticker's first bar, holds zero bars and says why; any other empty answer fails."
        ),
    )
    def prices(
        context: dg.AssetExecutionContext, price_source: PriceSource, mongo: MongoResource
    ) -> None:
        windows = bar_windows(partitions_def, context.partition_keys, market, interval)
        context.log.info(
            f"fetching {len(windows)} {interval} partition(s) of {market.name} "
            f"from {price_source.name}"
        )
        store = BarStore(mongo.get_database())
        detection_state = DetectionState(store.database)
        failures: list[PriceDataError] = []
        database_failure: str | None = None
        stored: dict[str, dict[str, dg.MetadataValue]] = {}
        bar_total = 0
        try:
            results = price_source.fetch(windows)
        except Exception as exc:
            # A source reports a bad window as a PriceDataError; an exception here is an outage
            # or a bug in the source, and nothing has been written yet.
            raise dg.Failure(
                f"{price_source.name} raised while fetching {len(windows)} {market.name} "
                f"{interval} partition(s), {windows[0].partition_key} to "
                f"{windows[-1].partition_key}: {type(exc).__name__}: {exc}; nothing was stored"
            ) from exc
        for window, result in zip(windows, results, strict=True):
            if isinstance(result, PriceDataError):
                context.log.error(str(result))
                failures.append(result)
                continue
            try:
                store.write_bars(
                    window,
                    result.bars,
                    run_id=context.run.run_id,
                    source=price_source.name,
                    empty_reason=result.empty_reason,
                    notes=result.notes,
                )
                # After the write: a run killed in between finds the change when it runs again.
                changed = detection_state.record_ingestion(
                    window, result.bars, run_id=context.run.run_id
                )
            except PyMongoError as exc:
                # Every later write would wait out the same timeout, so stop at the first.
                database_failure = (
                    f"{window.ticker} {interval} partition {window.partition_key}: MongoDB "
                    f"refused or did not answer the write ({type(exc).__name__}: {exc}); this "
                    "and the later partitions of the run were not written"
                )
                context.log.error(database_failure)
                break
            bar_total += len(result.bars)
            if result.empty_reason:
                context.log.info(
                    f"{window.ticker} {interval} {window.partition_key}: 0 bars, "
                    f"{result.empty_reason}"
                )
            for note in result.notes:
                context.log.warning(f"{window.ticker} {interval} {window.partition_key}: {note}")
            metadata = {
                **window_metadata(window),
                "bars": dg.MetadataValue.int(len(result.bars)),
                "source": dg.MetadataValue.text(price_source.name),
                # False when the source returned exactly the stored bars: no detection needed.
                "bars_changed": dg.MetadataValue.bool(changed),
            }
            if result.empty_reason:
                metadata["empty_reason"] = dg.MetadataValue.text(result.empty_reason)
            if len(result.bars):
                metadata["first_bar"] = dg.MetadataValue.timestamp(
                    result.bars.index[0].to_pydatetime()
                )
                metadata["last_bar"] = dg.MetadataValue.timestamp(
                    result.bars.index[-1].to_pydatetime()
                )
            if result.notes:
                metadata["normalisation"] = dg.MetadataValue.md(
                    "\n".join(f"- {n}" for n in result.notes)
                )
            context.add_asset_metadata(metadata, partition_key=window.partition_key)
            stored[window.partition_key] = metadata

        context.log.info(
            f"stored {bar_total} bars in {len(stored)} partition(s); "
            f"{len(windows) - len(stored)} not stored"
        )
        if failures or database_failure:
            fail_after_storing(
                context,
                stored,
                [str(f) for f in failures] + ([database_failure] if database_failure else []),
                planned=len(windows),
                allow_retries=database_failure is not None
                or any(f.__class__.__name__ == "RateLimitedError" for f in failures),
            )

    return prices
