"""Bar intervals the pipeline supports and the partition grain each one uses.

Dagster recommends at most 100,000 partitions per asset. Every asset is keyed by ticker and a
time window, so the window grain is chosen per interval to stay under that at 1,000 tickers:
daily bars use one partition per year (1980 onwards: 47 windows), intraday bars one per month.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class IntervalSpec:
    name: str
    bar_length: pd.Timedelta
    # Cron expression and key format of the partition windows, evaluated in the market's timezone.
    window_cron: str
    window_format: str
    window_label: str
    # Yahoo serves intraday history only this far back; older windows must come from files.
    yahoo_reach: pd.Timedelta | None
    default_history_start: str


INTERVALS: dict[str, IntervalSpec] = {
    "15m": IntervalSpec(
        name="15m",
        bar_length=pd.Timedelta(minutes=15),
        window_cron="0 0 1 * *",
        window_format="%Y-%m",
        window_label="month",
        yahoo_reach=pd.Timedelta(days=60),
        default_history_start="2025-01-01",
    ),
    "1h": IntervalSpec(
        name="1h",
        bar_length=pd.Timedelta(hours=1),
        window_cron="0 0 1 * *",
        window_format="%Y-%m",
        window_label="month",
        yahoo_reach=pd.Timedelta(days=730),
        default_history_start="2024-01-01",
    ),
    "1d": IntervalSpec(
        name="1d",
        bar_length=pd.Timedelta(days=1),
        window_cron="0 0 1 1 *",
        window_format="%Y",
        window_label="year",
        yahoo_reach=None,
        default_history_start="1980-01-01",
    ),
}


def interval_spec(interval: str) -> IntervalSpec:
    try:
        return INTERVALS[interval]
    except KeyError:
        known = ", ".join(INTERVALS)
        raise ValueError(f"unknown interval {interval!r}; expected one of {known}") from None
