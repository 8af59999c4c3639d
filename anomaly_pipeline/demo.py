"""The main job on the offline default: every asset of the sample universe, end to end.

Runs go through the real Dagster instance of the pipeline home, in this process: one ranged run
per ticker for prices and features, one run for every market's model, then one ranged run per
ticker for anomalies. Only windows the sample files cover are materialized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import dagster as dg
import pandas as pd
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.assets.anomalies import anomalies_asset_key
from anomaly_pipeline.assets.features import features_asset_key
from anomaly_pipeline.assets.models import model_asset_key
from anomaly_pipeline.assets.prices import prices_asset_key
from anomaly_pipeline.definitions import build_definitions
from anomaly_pipeline.partitions import bar_partitions, partition_key_for, window_dimension
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.universe import Market, Universe


@dataclass(frozen=True)
class TickerRange:
    market: Market
    interval: str
    ticker: str
    first_key: str
    last_key: str
    partitions: int


@dataclass(frozen=True)
class DemoResult:
    ranges: list[TickerRange]
    run_ids: list[str]
    seconds: float


def covered_ranges(universe: Universe, source: FilesPriceSource) -> list[TickerRange]:
    """Per ticker and interval, the contiguous partition range its sample file covers."""
    ranges = []
    for market, interval in universe.pairs():
        windows_def = window_dimension(
            bar_partitions(market, interval, universe.history_start[interval])
        )
        for ticker in market.tickers:
            first_bar, last_bar = source.coverage(ticker, interval, market)
            keys = [
                key
                for key in windows_def.get_partition_keys()
                if _overlaps(windows_def.time_window_for_partition_key(key), first_bar, last_bar)
            ]
            if keys:
                ranges.append(
                    TickerRange(
                        market=market,
                        interval=interval,
                        ticker=ticker,
                        first_key=partition_key_for(ticker, keys[0]),
                        last_key=partition_key_for(ticker, keys[-1]),
                        partitions=len(keys),
                    )
                )
    return ranges


def _overlaps(window: dg.TimeWindow, first_bar: pd.Timestamp, last_bar: pd.Timestamp) -> bool:
    return pd.Timestamp(window.end) > first_bar and pd.Timestamp(window.start) <= last_bar


def run_demo(instance: dg.DagsterInstance, universe: Universe, log=print) -> DemoResult:
    started = time.monotonic()
    definitions = build_definitions(universe)
    resources = definitions.resources
    source = resources["price_source"]
    if not isinstance(source, FilesPriceSource):
        raise SystemExit("the demo runs on the files source; unset ANOMALY_PIPELINE_PRICE_SOURCE")
    assets = list(definitions.assets)
    ranges = covered_ranges(universe, source)
    run_ids: list[str] = []

    def materialize(selection: list[dg.AssetKey], tags: dict[str, str], label: str) -> None:
        result = dg.materialize(
            assets,
            selection=selection,
            instance=instance,
            resources=resources,
            tags=tags,
            # The summary below is what a person reads; step-by-step events stay in the UI.
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        run_ids.append(result.run_id)
        log(f"  {label}: run {result.run_id[:8]} succeeded")

    log("1/3 prices and features")
    for item in ranges:
        materialize(
            [
                prices_asset_key(item.market, item.interval),
                features_asset_key(item.market, item.interval),
            ],
            _range_tags(item),
            f"{item.market.name} {item.interval} {item.ticker}: {item.partitions} partition(s)",
        )
    log("2/3 models")
    materialize(
        [model_asset_key(market, interval) for market, interval in universe.pairs()],
        {},
        "one IsolationForest per market and interval",
    )
    log("3/3 anomalies")
    for item in ranges:
        materialize(
            [anomalies_asset_key(item.market, item.interval)],
            _range_tags(item),
            f"{item.market.name} {item.interval} {item.ticker}",
        )
    return DemoResult(ranges=ranges, run_ids=run_ids, seconds=time.monotonic() - started)


def _range_tags(item: TickerRange) -> dict[str, str]:
    return {
        ASSET_PARTITION_RANGE_START_TAG: str(item.first_key),
        ASSET_PARTITION_RANGE_END_TAG: str(item.last_key),
        "anomaly_pipeline/entry_point": "demo",
    }


def format_timestamp(moment) -> str:
    return pd.Timestamp(moment).tz_convert("UTC").strftime("%Y-%m-%d %H:%M UTC")
