"""The canonical bar frame every price source returns and every later step relies on.

A canonical frame has a tz-aware UTC ``DatetimeIndex`` named ``timestamp`` holding each bar's
start, sorted ascending and unique, and float64 columns ``open``, ``high``, ``low``, ``close``
and ``volume``. Daily bars are stamped at the exchange's local midnight of their session date,
expressed in UTC.
"""

from __future__ import annotations

import pandas as pd

PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")


class PriceDataError(ValueError):
    """Prices for one ticker, interval and window could not be turned into canonical bars.

    The message always names the ticker, interval and window (or partition) so that a person
    reading a failed run knows exactly which slice of data to look at.
    """

    def __init__(self, ticker: str, interval: str, window: str, reason: str):
        self.ticker = ticker
        self.interval = interval
        self.window = window
        self.reason = reason
        super().__init__(f"{ticker} {interval} {window}: {reason}")


class RateLimitedError(PriceDataError):
    """The source refused the request because too many were made; worth retrying later."""


def empty_bars() -> pd.DataFrame:
    """A canonical frame with no rows."""
    index = pd.DatetimeIndex([], tz="UTC", name="timestamp")
    return pd.DataFrame(
        {column: pd.Series(dtype="float64") for column in PRICE_COLUMNS}, index=index
    )


def is_canonical(bars: pd.DataFrame) -> bool:
    """Whether ``bars`` satisfies the canonical contract described in this module."""
    index = bars.index
    return (
        isinstance(index, pd.DatetimeIndex)
        and str(index.tz) == "UTC"
        and index.name == "timestamp"
        and index.is_monotonic_increasing
        and index.is_unique
        and list(bars.columns) == list(PRICE_COLUMNS)
        and all(bars[column].dtype == "float64" for column in PRICE_COLUMNS)
    )
