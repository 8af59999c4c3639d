"""The interface every price source implements, and the rule for windows with no bars.

A source turns a window (ticker, interval, time range) into canonical bars. Zero bars is a
legitimate answer only when the market was closed for the whole window or the window ends
before the ticker's first bar; any other empty answer is an error, so that a partition is
never marked done while holding nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd

from anomaly_pipeline.calendars import market_was_open
from anomaly_pipeline.prices.frames import PriceDataError
from anomaly_pipeline.universe import Market


@dataclass(frozen=True)
class BarWindow:
    """One partition's worth of bars to fetch: ``start <= timestamp < end`` (UTC)."""

    ticker: str
    interval: str
    market: Market
    start: pd.Timestamp
    end: pd.Timestamp
    partition_key: str

    def describe(self) -> str:
        return f"partition {self.partition_key} [{self.start.isoformat()}, {self.end.isoformat()})"

    def error(self, reason: str) -> PriceDataError:
        return PriceDataError(self.ticker, self.interval, self.describe(), reason)


@dataclass(frozen=True)
class FetchedBars:
    window: BarWindow
    bars: pd.DataFrame
    # Set when the window legitimately holds no bars, saying why (shown in asset metadata).
    empty_reason: str | None = None
    # What normalisation changed (duplicates dropped, rows repaired), for logs and metadata.
    notes: tuple[str, ...] = field(default_factory=tuple)


class PriceSource(dg.ConfigurableResource, ABC):
    """Fetches canonical bars for many windows; implementations may batch requests."""

    @abstractmethod
    def fetch(self, windows: Sequence[BarWindow]) -> list[FetchedBars | PriceDataError]:
        """One result per window, in order: bars, or the error that names what went wrong."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def unreachable_reason(self, window: BarWindow, now: pd.Timestamp | None = None) -> str | None:
        """Why this source can never deliver ``window`` (None when it can)."""
        return None


def explain_empty_window(window: BarWindow, first_bar: pd.Timestamp | None) -> str:
    """Why an empty answer for ``window`` is correct; raises when it is not.

    ``first_bar`` is the ticker's first bar known to the source, or None when unknown.
    """
    if first_bar is not None and window.end <= first_bar:
        return f"window ends before {window.ticker}'s first bar ({first_bar.isoformat()})"
    if not market_was_open(window.market, window.start, window.end):
        return f"market {window.market.name} was closed for the whole window"
    raise window.error("the source returned no bars although the market was open")
