"""Price bars per ticker and window, fetched from the configured source into MongoDB."""

import dagster as dg

from anomaly_pipeline.assets.metadata import window_metadata
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
        bar_total = 0
        for window, result in zip(windows, price_source.fetch(windows), strict=True):
            if isinstance(result, PriceDataError):
                context.log.error(str(result))
                failures.append(result)
                continue
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

        context.log.info(
            f"stored {bar_total} bars in {len(windows) - len(failures)} partition(s); "
            f"{len(failures)} failed"
        )
        if failures:
            raise dg.Failure(
                description=(
                    f"{len(failures)} of {len(windows)} {market.name} {interval} partition(s) "
                    "could not be fetched; the others were stored:\n"
                    + "\n".join(str(f) for f in failures)
                ),
                allow_retries=any(f.__class__.__name__ == "RateLimitedError" for f in failures),
            )

    return prices
