"""Partitions: every bar asset is keyed by ticker and a time window whose grain suits its interval.

Dagster's multi-partitions take two dimensions, so the interval is not a dimension: each market
and interval has its own assets (``us/1d/prices`` and so on), and each of those is partitioned
by ``ticker`` (the market's tickers) × ``window`` (a year of daily bars or a month of intraday
bars, in the market's own timezone). Keys read as ``MSFT|1986`` or ``SYNA.BK|2025-03``.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg
import pandas as pd

from anomaly_pipeline.intervals import interval_spec
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.universe import Market

TICKER_DIMENSION = "ticker"
WINDOW_DIMENSION = "window"

# A backfill groups partitions by whichever dimension has fewer distinct keys (usually the
# window) and runs up to this many tickers of one window per run: a 10-year daily backfill of
# 1,000 tickers is 20 runs, and a source can fetch many tickers of one window per request.
MAX_PARTITIONS_PER_RUN = 500
BAR_BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN)


def window_partitions(
    market: Market, interval: str, history_start: pd.Timestamp
) -> dg.TimeWindowPartitionsDefinition:
    """Time windows for one market and interval; the current, unfinished window is included."""
    spec = interval_spec(interval)
    return dg.TimeWindowPartitionsDefinition(
        start=pd.Timestamp(history_start).strftime(spec.window_format),
        fmt=spec.window_format,
        cron_schedule=spec.window_cron,
        timezone=market.timezone,
        # Detection must run on the window that is still filling up, not only finished ones.
        end_offset=1,
    )


def bar_partitions(
    market: Market, interval: str, history_start: pd.Timestamp
) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {
            TICKER_DIMENSION: dg.StaticPartitionsDefinition(list(market.tickers)),
            WINDOW_DIMENSION: window_partitions(market, interval, history_start),
        }
    )


def bar_windows(
    partitions_def: dg.MultiPartitionsDefinition,
    partition_keys: Sequence[str],
    market: Market,
    interval: str,
) -> list[BarWindow]:
    """The UTC bar windows behind ``partition_keys``, ordered by ticker then time."""
    windows_def = window_dimension(partitions_def)
    windows = []
    for key in partition_keys:
        ticker, window_key = split_partition_key(partitions_def, key)
        time_window = windows_def.time_window_for_partition_key(window_key)
        windows.append(
            BarWindow(
                ticker=ticker,
                interval=interval,
                market=market,
                start=pd.Timestamp(time_window.start).tz_convert("UTC"),
                end=pd.Timestamp(time_window.end).tz_convert("UTC"),
                partition_key=key,
            )
        )
    return sorted(windows, key=lambda window: (window.ticker, window.start))


def split_partition_key(partitions_def: dg.MultiPartitionsDefinition, key: str) -> tuple[str, str]:
    keys = partitions_def.get_partition_key_from_str(key).keys_by_dimension
    return keys[TICKER_DIMENSION], keys[WINDOW_DIMENSION]


def partition_key_for(ticker: str, window_key: str) -> str:
    return dg.MultiPartitionKey({TICKER_DIMENSION: ticker, WINDOW_DIMENSION: window_key})


def window_dimension(
    partitions_def: dg.MultiPartitionsDefinition,
) -> dg.TimeWindowPartitionsDefinition:
    for dimension in partitions_def.partitions_defs:
        if dimension.name == WINDOW_DIMENSION:
            return dimension.partitions_def
    raise ValueError("partitions definition has no window dimension")
