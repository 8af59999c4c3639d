"""What a history backfill covers: windows, partitions, stages, and what is left out and why.

A span such as ``10y`` means the ten most recent yearly windows of daily bars (120 monthly
windows of intraday bars), the current window included, never reaching before the universe's
``history_start``. Partitions the configured price source can never deliver (Yahoo's intraday
reach) are left out before launch rather than failing inside a run, and each is reported with
the source's reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg
import pandas as pd

from anomaly_pipeline.intervals import INTERVALS, interval_spec
from anomaly_pipeline.partitions import (
    bar_partitions,
    bar_windows,
    partition_key_for,
    split_partition_key,
    window_dimension,
)
from anomaly_pipeline.prices.source import PriceSource
from anomaly_pipeline.universe import Market, Universe

SPANS: dict[str, int | None] = {"5y": 5, "10y": 10, "all": None}
STAGES: tuple[str, ...] = ("prices", "features", "model", "anomalies")
PARTITIONED_STAGES: tuple[str, ...] = ("prices", "features", "anomalies")
_WINDOWS_PER_YEAR = {"year": 1, "month": 12}


class BackfillRequestError(ValueError):
    """The requested backfill cannot be planned; the message says what to change."""


@dataclass(frozen=True)
class LeftOutPartition:
    partition_key: str
    ticker: str
    window_key: str
    reason: str


@dataclass(frozen=True)
class BackfillPlan:
    market: Market
    interval: str
    span: str
    # Selected windows, oldest first, before anything is left out.
    window_keys: list[str]
    partition_keys: list[str]
    left_out: list[LeftOutPartition]
    # Pipeline stages in pipeline order.
    stages: tuple[str, ...]
    source_name: str

    @property
    def asset_keys(self) -> list[dg.AssetKey]:
        return [
            dg.AssetKey([self.market.key_prefix, self.interval, stage]) for stage in self.stages
        ]

    @property
    def partitioned_stages(self) -> tuple[str, ...]:
        return tuple(stage for stage in self.stages if stage in PARTITIONED_STAGES)

    @property
    def title(self) -> str:
        return f"{self.market.name} {self.interval} {self.span}: {', '.join(self.stages)}"


def resolve_market(universe: Universe, name: str) -> Market:
    """The universe's market called ``name`` (any letter case)."""
    by_lower = {market.name.lower(): market for market in universe.markets.values()}
    market = by_lower.get(name.lower())
    if market is None:
        known = ", ".join(universe.markets) or "none"
        raise BackfillRequestError(
            f"unknown market {name!r} in {universe.path}; markets: {known}"
            + (f" (not loaded: {', '.join(universe.errors)})" if universe.errors else "")
        )
    return market


def check_interval(market: Market, interval: str) -> None:
    if interval not in INTERVALS:
        raise BackfillRequestError(
            f"unknown interval {interval!r}; expected one of {', '.join(INTERVALS)}"
        )
    if interval not in market.intervals:
        raise BackfillRequestError(
            f"market {market.name} is not watched at {interval} in the universe file; "
            f"its intervals: {', '.join(market.intervals)}"
        )


def parse_stages(text: str) -> tuple[str, ...]:
    """``prices,features,anomalies`` -> the named stages in pipeline order."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise BackfillRequestError(
            f"--assets takes a comma-separated list of {', '.join(STAGES)}; got {text!r}"
        )
    if not any(name in PARTITIONED_STAGES for name in names):
        raise BackfillRequestError(
            "the model is not partitioned, so it cannot be backfilled on its own; materialize "
            "it with `dagster asset materialize -m anomaly_pipeline.definitions --select "
            "<market>/<interval>/model`, or add prices, features or anomalies"
        )
    return tuple(stage for stage in STAGES if stage in names)


def select_window_keys(
    market: Market,
    interval: str,
    history_start: pd.Timestamp,
    span: str,
    now: pd.Timestamp,
) -> list[str]:
    """The window keys a span covers, oldest first, the current window included."""
    if span not in SPANS:
        raise BackfillRequestError(f"unknown window {span!r}; expected one of {', '.join(SPANS)}")
    windows_def = window_dimension(bar_partitions(market, interval, history_start))
    keys = list(windows_def.get_partition_keys(current_time=now.to_pydatetime()))
    years = SPANS[span]
    if years is None:
        return keys
    count = years * _WINDOWS_PER_YEAR[interval_spec(interval).window_label]
    return keys[-count:]


def plan_backfill(
    universe: Universe,
    market_name: str,
    interval: str,
    span: str,
    stages: Sequence[str],
    source: PriceSource,
    now: pd.Timestamp | None = None,
) -> BackfillPlan:
    """Every ticker × selected window, minus the partitions ``source`` can never deliver.

    Reachability only matters for partitions whose prices this backfill fetches; later stages
    read what is already stored.
    """
    now = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now).tz_convert("UTC")
    market = resolve_market(universe, market_name)
    check_interval(market, interval)
    history_start = universe.history_start[interval]
    window_keys = select_window_keys(market, interval, history_start, span, now)
    if not window_keys:
        raise BackfillRequestError(
            f"no {interval} windows of {market.name} between history_start "
            f"{history_start.date()} and now"
        )

    partitions_def = bar_partitions(market, interval, history_start)
    candidates = [
        str(partition_key_for(ticker, window_key))
        for ticker in market.tickers
        for window_key in window_keys
    ]
    left_out: list[LeftOutPartition] = []
    if "prices" in stages:
        for window in bar_windows(partitions_def, candidates, market, interval):
            reason = source.unreachable_reason(window, now)
            if reason is not None:
                key = str(window.partition_key)
                _, window_key = split_partition_key(partitions_def, key)
                left_out.append(LeftOutPartition(key, window.ticker, window_key, reason))
    excluded = {item.partition_key for item in left_out}
    return BackfillPlan(
        market=market,
        interval=interval,
        span=span,
        window_keys=window_keys,
        partition_keys=[key for key in candidates if key not in excluded],
        left_out=left_out,
        stages=tuple(stage for stage in STAGES if stage in stages),
        source_name=source.name,
    )
