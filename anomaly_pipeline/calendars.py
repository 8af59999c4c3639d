"""Trading sessions per market, from the exchange_calendars library.

Used to tell a window in which the market was closed (zero bars is the right answer) from a
window in which it traded but a source returned nothing (an error), and to keep schedules
inside each market's own sessions.
"""

from __future__ import annotations

from functools import lru_cache

import exchange_calendars
import pandas as pd

from anomaly_pipeline.universe import Market

# exchange_calendars builds 20 years of sessions by default; daily history reaches 1980.
_CALENDAR_START = "1980-01-01"


@lru_cache(maxsize=16)
def exchange_calendar(code: str) -> exchange_calendars.ExchangeCalendar:
    end = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=400)).strftime("%Y-%m-%d")
    try:
        return exchange_calendars.get_calendar(code, start=_CALENDAR_START, end=end)
    except ValueError:
        # Some calendars cannot reach back to 1980; their own earliest date is the honest limit.
        return exchange_calendars.get_calendar(code, end=end)


def trading_sessions(market: Market, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """Sessions whose trading hours overlap ``[start, end)``, with UTC ``open`` and ``close``.

    A market without a calendar trades around the clock; it gets one session per UTC day.
    """
    start, end = _utc(start), _utc(end)
    if market.calendar is None:
        days = pd.date_range(start.floor("D"), end, freq="D", inclusive="left", tz="UTC")
        schedule = pd.DataFrame({"open": days, "close": days + pd.Timedelta(days=1)}, index=days)
    else:
        calendar = exchange_calendar(market.calendar)
        first = max(
            start.tz_convert(None).normalize() - pd.Timedelta(days=1), calendar.first_session
        )
        last = min(end.tz_convert(None).normalize() + pd.Timedelta(days=1), calendar.last_session)
        if first > last:
            return pd.DataFrame(columns=["open", "close"])
        schedule = calendar.schedule.loc[first:last, ["open", "close"]]
    return schedule[(schedule["close"] > start) & (schedule["open"] < end)]


def market_was_open(market: Market, start: pd.Timestamp, end: pd.Timestamp) -> bool:
    """Whether the market traded at any moment of ``[start, end)``."""
    return not trading_sessions(market, start, end).empty


def calendar_covers(market: Market, start: pd.Timestamp) -> bool:
    """Whether the market's calendar knows the sessions around ``start``."""
    if market.calendar is None:
        return True
    return _utc(start).tz_convert(None) >= exchange_calendar(market.calendar).first_session


def _utc(moment: pd.Timestamp) -> pd.Timestamp:
    moment = pd.Timestamp(moment)
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")
