"""YFinancePriceSource against a fake Yahoo: yfinance 1.7's own code runs, no network is touched.

``FakeYahoo`` answers the HTTP requests yfinance makes (cookie, crumb, consent page and the v8
chart API, plus the quote endpoints yfinance falls back to for unknown symbols) with payloads
of the shape Yahoo's servers send. It is handed to yfinance as a curl_cffi ``Session`` subclass
through the source's ``use_transport`` hook, so ``yf.download`` and ``Ticker.history`` parse,
clean and adjust those payloads exactly as they would live ones.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
import yfinance as yf
import yfinance.cache as yf_cache
from curl_cffi import requests as curl_requests
from curl_cffi.requests.models import Response
from yfinance.data import YfData

from anomaly_pipeline.prices import yfinance_source
from anomaly_pipeline.prices.frames import PriceDataError, RateLimitedError, is_canonical
from anomaly_pipeline.prices.source import BarWindow, FetchedBars
from anomaly_pipeline.prices.yfinance_source import YFinancePriceSource
from anomaly_pipeline.universe import Market

US = Market(
    name="US",
    timezone="America/New_York",
    calendar="XNYS",
    intervals=("1d", "1h", "15m"),
    tickers=("AAPL", "MSFT", "NEWCO", "NOPE"),
)
SET = Market(
    name="SET",
    timezone="Asia/Bangkok",
    calendar="XBKK",
    intervals=("1d", "1h", "15m"),
    tickers=("PTT.BK",),
)

NOW = pd.Timestamp("2024-05-02 00:00", tz="UTC")


def utc(text: str) -> pd.Timestamp:
    stamp = pd.Timestamp(text)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def epoch(text: str) -> int:
    return int(utc(text).timestamp())


# ---------------------------------------------------------------------------------------------
# The fake Yahoo


@dataclass
class Listing:
    """One symbol as Yahoo knows it.

    Bars are tuples (UTC time, open, high, low, close, adjclose, volume).
    """

    timezone: str
    first_trade: int
    # Regular session in local wall-clock time, for the intraday tradingPeriods metadata.
    session: tuple[str, str] = ("09:30", "16:00")
    daily: list[tuple] = field(default_factory=list)
    intraday: list[tuple] = field(default_factory=list)


class FakeYahoo:
    """The parts of Yahoo's web API yfinance 1.7 calls for prices."""

    def __init__(self) -> None:
        self.listings: dict[str, Listing] = {}
        self.chart_requests: list[tuple[str, dict]] = []
        # symbol -> answer "429 Too Many Requests" now?
        self.refusing: Callable[[str], bool] = lambda symbol: False
        self._lock = threading.Lock()

    def answer(self, method: str, url: str, params: dict) -> Response:
        parts = urlsplit(url)
        if parts.hostname == "fc.yahoo.com":
            return _response(url, 404, "")
        if parts.path.endswith("/v1/test/getcrumb"):
            return _response(url, 200, "fake-crumb")
        if "consent" in (parts.hostname or ""):
            return _response(url, 200, "<html><body></body></html>")
        if parts.path.startswith("/v8/finance/chart/"):
            symbol = parts.path.rsplit("/", 1)[1]
            with self._lock:
                self.chart_requests.append((symbol, dict(params)))
            return self._chart(url, symbol, params)
        # yfinance falls back to quote endpoints when the chart API knows no timezone for a
        # symbol; these are Yahoo's answers for a symbol it does not list.
        if parts.path.startswith("/v10/finance/quoteSummary/"):
            symbol = parts.path.rsplit("/", 1)[1]
            error = {"code": "Not Found", "description": f"Quote not found for symbol: {symbol}"}
            return _response(
                url, 404, json.dumps({"quoteSummary": {"result": None, "error": error}})
            )
        if parts.path.endswith("/v7/finance/quote"):
            return _response(url, 200, json.dumps({"quoteResponse": {"result": [], "error": None}}))
        if "/fundamentals-timeseries/" in parts.path:
            return _response(url, 200, json.dumps({"timeseries": {"result": [], "error": None}}))
        error = {"code": "Not Found", "description": "HTTP 404 Not Found"}
        return _response(url, 404, json.dumps({"finance": {"result": None, "error": error}}))

    def requests_for(self, symbol: str) -> list[dict]:
        return [params for name, params in self.chart_requests if name == symbol]

    def _chart(self, url: str, symbol: str, params: dict) -> Response:
        if self.refusing(symbol):
            return _response(url, 429, "Too Many Requests")
        listing = self.listings.get(symbol)
        if listing is None:
            error = {"code": "Not Found", "description": "No data found, symbol may be delisted"}
            return _response(url, 404, json.dumps({"chart": {"result": None, "error": error}}))
        interval = params.get("interval", "1d")
        if "range" in params:
            rows: list[tuple] = []
        else:
            start, end = int(params["period1"]), int(params["period2"])
            if end <= listing.first_trade:
                description = f"Data doesn't exist for startDate = {start}, endDate = {end}"
                error = {"code": "Bad Request", "description": description}
                return _response(url, 400, json.dumps({"chart": {"result": None, "error": error}}))
            source = listing.daily if interval == "1d" else listing.intraday
            rows = [row for row in source if start <= epoch(row[0]) < end]
        result: dict = {"meta": _meta(symbol, listing, interval, rows)}
        if rows:
            result["timestamp"] = [epoch(row[0]) for row in rows]
            columns = list(zip(*rows, strict=True))
            result["indicators"] = {
                "quote": [
                    {
                        "open": list(columns[1]),
                        "high": list(columns[2]),
                        "low": list(columns[3]),
                        "close": list(columns[4]),
                        "volume": list(columns[6]),
                    }
                ]
            }
            if interval == "1d":
                result["indicators"]["adjclose"] = [{"adjclose": list(columns[5])}]
        else:
            result["indicators"] = {"quote": [{}], "adjclose": [{}]}
        return _response(url, 200, json.dumps({"chart": {"result": [result], "error": None}}))


def _meta(symbol: str, listing: Listing, interval: str, rows: list[tuple]) -> dict:
    zone = ZoneInfo(listing.timezone)
    last = utc(rows[-1][0]) if rows else utc("2024-03-01")
    offset = int(last.tz_convert(zone).utcoffset().total_seconds())
    abbreviation = last.tz_convert(zone).tzname()
    period = {"timezone": abbreviation, "start": epoch("2024-03-01"), "end": epoch("2024-03-02")}
    meta = {
        "currency": "USD",
        "symbol": symbol,
        "exchangeName": "NMS",
        "fullExchangeName": "NasdaqGS",
        "instrumentType": "EQUITY",
        "firstTradeDate": listing.first_trade,
        "regularMarketTime": int(last.timestamp()),
        "hasPrePostMarketData": True,
        "gmtoffset": offset,
        "timezone": abbreviation,
        "exchangeTimezoneName": listing.timezone,
        "regularMarketPrice": rows[-1][4] if rows else 1.0,
        "priceHint": 2,
        "currentTradingPeriod": {
            name: {**period, "gmtoffset": offset} for name in ("pre", "regular", "post")
        },
        "dataGranularity": interval,
        "range": "",
        "validRanges": ["1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max"],
    }
    if interval != "1d" and rows:
        days = sorted({utc(row[0]).tz_convert(zone).date() for row in rows})
        periods = []
        for day in days:
            opens = pd.Timestamp(f"{day} {listing.session[0]}", tz=listing.timezone)
            closes = pd.Timestamp(f"{day} {listing.session[1]}", tz=listing.timezone)
            local_offset = int(opens.utcoffset().total_seconds())
            periods.append(
                [
                    {
                        "timezone": opens.tzname(),
                        "start": int(opens.timestamp()),
                        "end": int(closes.timestamp()),
                        "gmtoffset": local_offset,
                    }
                ]
            )
        meta["tradingPeriods"] = periods
    return meta


def _response(url: str, status: int, body: str) -> Response:
    response = Response()
    response.status_code = status
    response.ok = status < 400
    response.reason = HTTPStatus(status).phrase
    response.content = body.encode()
    response.url = url
    response.headers["Content-Type"] = "application/json" if body.startswith("{") else "text/html"
    return response


class FakeSession(curl_requests.Session):
    """A curl_cffi Session, the kind yfinance uses, whose every request goes to FakeYahoo.

    Subclassing the real class matters: yfinance accepts only curl_cffi or requests sessions
    and catches curl_cffi's own HTTPError type.
    """

    def __init__(self, yahoo: FakeYahoo) -> None:
        super().__init__()
        self.yahoo = yahoo

    def request(self, method, url, params=None, **kwargs):  # type: ignore[override]
        return self.yahoo.answer(method, url, dict(params or {}))


@pytest.fixture
def yahoo(monkeypatch: pytest.MonkeyPatch):
    """A fresh fake Yahoo; yfinance's disk caches and in-process response cache are bypassed."""
    monkeypatch.setattr(yf_cache._TzCacheManager, "_tz_cache", yf_cache._TzCacheDummy())
    monkeypatch.setattr(yf_cache._CookieCacheManager, "_Cookie_cache", yf_cache._CookieCacheDummy())
    shared = YfData()
    saved = (shared._session, shared._crumb, shared._cookie, shared._cookie_strategy)
    YfData.cache_get.cache_clear()
    fake = FakeYahoo()
    yield fake
    YfData.cache_get.cache_clear()
    shared._session, shared._crumb, shared._cookie, shared._cookie_strategy = saved


@pytest.fixture
def slept() -> list[float]:
    return []


@pytest.fixture
def source(yahoo: FakeYahoo, slept: list[float]) -> YFinancePriceSource:
    return YFinancePriceSource().use_transport(
        session_factory=lambda: FakeSession(yahoo), sleep=slept.append, clock=lambda: NOW
    )


def window(
    ticker: str, interval: str, start: str, end: str, market: Market = US, key: str = "k"
) -> BarWindow:
    return BarWindow(
        ticker=ticker,
        interval=interval,
        market=market,
        start=utc(start),
        end=utc(end),
        partition_key=key,
    )


def daily_row(day: str, raw: tuple[float, float, float, float], adj: float, volume: int) -> tuple:
    """A Yahoo daily bar: stamped at the 09:30 New York open, raw OHLC plus adjusted close."""
    stamp = pd.Timestamp(f"{day} 09:30", tz="America/New_York").tz_convert("UTC")
    return (stamp.isoformat(), *raw, adj, volume)


def bars_of(rows: list[tuple[str, float, float, float, float, float]]) -> pd.DataFrame:
    index = pd.DatetimeIndex([utc(row[0]) for row in rows], name="timestamp")
    values = [row[1:] for row in rows]
    return pd.DataFrame(values, index=index, columns=["open", "high", "low", "close", "volume"])


def intraday_row(stamp: str, price: float, volume: int) -> tuple:
    return (stamp, price, price + 1.0, price - 1.0, price + 0.5, price + 0.5, volume)


def listed(yahoo: FakeYahoo, symbol: str, **kwargs) -> Listing:
    listing = Listing(
        kwargs.pop("timezone", "America/New_York"), epoch("1980-12-12 14:30"), **kwargs
    )
    yahoo.listings[symbol] = listing
    return listing


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], pd.Timestamp, str]]:
    """Every yf.download call the source makes (tickers, start, interval); the real one runs."""
    calls: list[tuple[list[str], pd.Timestamp, str]] = []
    real = yf.download

    def spy(tickers, **kwargs):
        calls.append((sorted(tickers), kwargs["start"], kwargs["interval"]))
        return real(tickers, **kwargs)

    monkeypatch.setattr(yfinance_source.yf, "download", spy)
    return calls


MARCH_4_TO_6 = ("2024-03-04 05:00", "2024-03-06 05:00")


def test_one_download_per_batch_gives_adjusted_daily_bars_at_new_york_midnight(
    yahoo: FakeYahoo, source: YFinancePriceSource, downloads: list
) -> None:
    listed(
        yahoo,
        "AAPL",
        daily=[
            daily_row("2024-03-04", (100.0, 102.0, 99.0, 101.0), 50.5, 1000),
            daily_row("2024-03-05", (101.0, 103.0, 100.0, 102.0), 51.0, 2000),
        ],
    )
    listed(yahoo, "MSFT", daily=[daily_row("2024-03-05", (400.0, 404.0, 396.0, 402.0), 402.0, 7)])

    aapl, msft = source.fetch(
        [window("AAPL", "1d", *MARCH_4_TO_6), window("MSFT", "1d", *MARCH_4_TO_6)]
    )

    assert downloads == [(["AAPL", "MSFT"], utc("2024-03-04 05:00"), "1d")]
    assert isinstance(aapl, FetchedBars) and isinstance(msft, FetchedBars)
    # Adjusted basis (factor 0.5 on AAPL), stamped at New York midnight (05:00 UTC in winter).
    expected_aapl = bars_of(
        [
            ("2024-03-04 05:00", 50.0, 51.0, 49.5, 50.5, 1000.0),
            ("2024-03-05 05:00", 50.5, 51.5, 50.0, 51.0, 2000.0),
        ]
    )
    pd.testing.assert_frame_equal(aapl.bars, expected_aapl)
    pd.testing.assert_frame_equal(
        msft.bars, bars_of([("2024-03-05 05:00", 400.0, 404.0, 396.0, 402.0, 7.0)])
    )
    assert is_canonical(aapl.bars) and is_canonical(msft.bars)
    assert aapl.empty_reason is None and aapl.notes == ()


def test_batches_split_by_range_and_by_max_tickers_per_request(
    yahoo: FakeYahoo, source: YFinancePriceSource, downloads: list
) -> None:
    for symbol in ("AAPL", "MSFT"):
        listed(yahoo, symbol, daily=[daily_row("2024-03-05", (10.0, 11.0, 9.0, 10.0), 10.0, 5)])
    source = source.model_copy(update={"max_tickers_per_request": 1}).use_transport(
        session_factory=lambda: FakeSession(yahoo), clock=lambda: NOW
    )
    later = ("2024-03-05 05:00", "2024-03-06 05:00")
    results = source.fetch(
        [
            window("AAPL", "1d", *MARCH_4_TO_6, key="a"),
            window("MSFT", "1d", *MARCH_4_TO_6),
            window("AAPL", "1d", *later),
            window("AAPL", "1d", *MARCH_4_TO_6, key="b"),  # same range again: shares a request
        ]
    )

    assert sorted((tuple(t), s) for t, s, _ in downloads) == [
        (("AAPL",), utc("2024-03-04 05:00")),
        (("AAPL",), utc("2024-03-05 05:00")),
        (("MSFT",), utc("2024-03-04 05:00")),
    ]
    assert all(isinstance(result, FetchedBars) for result in results)
    assert [result.window.partition_key for result in results] == ["a", "k", "k", "b"]
    assert [len(result.bars) for result in results] == [1, 1, 1, 1]


# Case 3: windows beyond Yahoo's reach fail without a request ---------------------------------


@pytest.mark.parametrize(
    ("interval", "days_back", "reachable"),
    [
        ("15m", 59, True),
        ("15m", 61, False),
        ("1h", 729, True),
        ("1h", 731, False),
        ("1d", 9000, True),
    ],
)
def test_unreachable_reason_follows_yahoo_reach(
    interval: str, days_back: int, reachable: bool
) -> None:
    start = NOW - pd.Timedelta(days=days_back)
    bar_window = BarWindow("AAPL", interval, US, start, start + pd.Timedelta(days=1), "p")
    reason = YFinancePriceSource().unreachable_reason(bar_window, NOW)
    if reachable:
        assert reason is None
    else:
        reach_days = {"15m": 60, "1h": 730}[interval]
        assert reason is not None
        assert f"Yahoo serves {interval} bars only for the last {reach_days} days" in reason
        assert f"the window starts {start.isoformat()}" in reason


def test_15m_window_59_days_back_is_fetched_and_61_days_back_fails_unasked(
    yahoo: FakeYahoo, source: YFinancePriceSource, downloads: list
) -> None:
    # NOW is 2024-05-02; 59 days back is Monday 2024-03-04, 61 days back Saturday 2024-03-02.
    listed(
        yahoo,
        "AAPL",
        intraday=[
            intraday_row("2024-03-04 14:30", 170.0, 500),
            intraday_row("2024-03-04 14:45", 171.0, 600),
        ],
    )
    listed(yahoo, "MSFT", intraday=[intraday_row("2024-03-02 15:00", 1.0, 1)])
    near = window("AAPL", "15m", "2024-03-04 00:00", "2024-03-05 00:00")
    far = window("MSFT", "15m", "2024-03-02 00:00", "2024-03-03 00:00")

    fetched, refused = source.fetch([near, far])

    assert isinstance(fetched, FetchedBars)
    pd.testing.assert_frame_equal(
        fetched.bars,
        bars_of(
            [
                ("2024-03-04 14:30", 170.0, 171.0, 169.0, 170.5, 500.0),
                ("2024-03-04 14:45", 171.0, 172.0, 170.0, 171.5, 600.0),
            ]
        ),
    )
    assert isinstance(refused, PriceDataError) and not isinstance(refused, RateLimitedError)
    message = str(refused)
    assert "MSFT" in message and "15m" in message and far.describe() in message
    assert "last 60 days" in message
    assert yahoo.requests_for("MSFT") == []
    assert downloads == [(["AAPL"], utc("2024-03-04 00:00"), "15m")]


# Case 4: empty answers ------------------------------------------------------------------------


def test_weekend_only_window_of_a_bangkok_ticker_is_legitimately_empty(
    yahoo: FakeYahoo, source: YFinancePriceSource
) -> None:
    listed(yahoo, "PTT.BK", timezone="Asia/Bangkok", session=("10:00", "16:30"))
    # Saturday 2 and Sunday 3 March 2024, Bangkok midnight to midnight.
    weekend = window("PTT.BK", "1h", "2024-03-01 17:00", "2024-03-03 17:00", market=SET)

    (result,) = source.fetch([weekend])

    assert isinstance(result, FetchedBars)
    assert result.empty_reason == "market SET was closed for the whole window"
    assert result.bars.empty and is_canonical(result.bars)


def test_unknown_ticker_on_a_trading_day_is_an_error(
    yahoo: FakeYahoo, source: YFinancePriceSource
) -> None:
    asked = window("NOPE", "1d", *MARCH_4_TO_6)

    (result,) = source.fetch([asked])

    assert isinstance(result, PriceDataError) and not isinstance(result, RateLimitedError)
    message = str(result)
    assert message.startswith(f"NOPE 1d {asked.describe()}: ")
    assert "no bars although the market was open" in message


def test_listed_ticker_without_bars_while_the_market_was_open_is_an_error(
    yahoo: FakeYahoo, source: YFinancePriceSource
) -> None:
    listed(yahoo, "AAPL", daily=[daily_row("2024-02-01", (1.0, 1.0, 1.0, 1.0), 1.0, 1)])
    asked = window("AAPL", "1d", *MARCH_4_TO_6)

    (result,) = source.fetch([asked])

    assert isinstance(result, PriceDataError)
    assert str(result).startswith(f"AAPL 1d {asked.describe()}: ")
    assert "market was open" in str(result)


def test_window_before_the_first_trade_is_legitimately_empty(
    yahoo: FakeYahoo, source: YFinancePriceSource
) -> None:
    yahoo.listings["NEWCO"] = Listing("America/New_York", epoch("2024-06-03 13:30"))

    (result,) = source.fetch([window("NEWCO", "1d", *MARCH_4_TO_6)])

    assert isinstance(result, FetchedBars)
    assert result.bars.empty
    assert result.empty_reason == "window ends before NEWCO's first bar (2024-06-03T13:30:00+00:00)"


# Case 5: rate limiting ------------------------------------------------------------------------


def test_rate_limited_ticker_is_retried_with_exponential_backoff_until_yahoo_answers(
    yahoo: FakeYahoo, source: YFinancePriceSource, slept: list[float]
) -> None:
    listed(yahoo, "AAPL", daily=[daily_row("2024-03-05", (10.0, 12.0, 9.0, 11.0), 11.0, 300)])
    # Yahoo refuses until the source has waited twice.
    yahoo.refusing = lambda symbol: len(slept) < 2

    (result,) = source.fetch([window("AAPL", "1d", *MARCH_4_TO_6)])

    assert slept == [2.0, 4.0]
    assert isinstance(result, FetchedBars)
    pd.testing.assert_frame_equal(
        result.bars, bars_of([("2024-03-05 05:00", 10.0, 12.0, 9.0, 11.0, 300.0)])
    )


def test_persistent_rate_limiting_ends_in_rate_limited_errors_never_in_empty_success(
    yahoo: FakeYahoo, source: YFinancePriceSource, slept: list[float]
) -> None:
    for symbol in ("AAPL", "MSFT"):
        listed(yahoo, symbol, daily=[daily_row("2024-03-05", (1.0, 1.0, 1.0, 1.0), 1.0, 1)])
    yahoo.refusing = lambda symbol: True
    aapl_window = window("AAPL", "1d", *MARCH_4_TO_6)
    msft_window = window("MSFT", "1d", *MARCH_4_TO_6)

    aapl, msft = source.fetch([aapl_window, msft_window])

    assert slept == [2.0, 4.0, 8.0]  # four attempts, three waits
    assert isinstance(aapl, RateLimitedError) and isinstance(msft, RateLimitedError)
    assert str(aapl).startswith(f"AAPL 1d {aapl_window.describe()}: ")
    assert "all 4 attempts" in str(aapl)
    assert str(msft).startswith(f"MSFT 1d {msft_window.describe()}: ")
    assert "not requested" in str(msft)
    # Once AAPL used up its attempts, MSFT was not asked again.
    last_aapl = max(i for i, (name, _) in enumerate(yahoo.chart_requests) if name == "AAPL")
    assert all(name != "MSFT" for name, _ in yahoo.chart_requests[last_aapl:])


def test_once_yahoo_refused_a_ticker_to_the_end_later_batches_are_not_sent(
    yahoo: FakeYahoo, slept: list[float], downloads: list
) -> None:
    yahoo.refusing = lambda symbol: True
    source = YFinancePriceSource(max_tickers_per_request=1, max_concurrent_requests=1)
    source.use_transport(
        session_factory=lambda: FakeSession(yahoo), sleep=slept.append, clock=lambda: NOW
    )

    results = source.fetch([window(t, "1d", *MARCH_4_TO_6) for t in ("AAPL", "MSFT", "IBM")])

    assert [type(result) for result in results] == [RateLimitedError] * 3
    assert "all 4 attempts" in str(results[0])
    assert all("not requested" in str(result) for result in results[1:])
    assert [tickers for tickers, _, _ in downloads] == [["AAPL"]]
    assert {name for name, _ in yahoo.chart_requests} == {"AAPL"}


def test_rate_limiting_does_not_turn_a_closed_market_window_into_an_error(
    yahoo: FakeYahoo, source: YFinancePriceSource, slept: list[float]
) -> None:
    yahoo.refusing = lambda symbol: True
    weekend = window("AAPL", "1h", "2024-03-02 05:00", "2024-03-04 05:00")

    (result,) = source.fetch([weekend])

    assert isinstance(result, FetchedBars)
    assert result.empty_reason == "market US was closed for the whole window"
    assert slept == []


# Case 7 end to end: yfinance's own handling of Yahoo's live daily row, then ours ---------------


def test_live_daily_row_next_to_the_official_one_yields_one_bar(
    yahoo: FakeYahoo, source: YFinancePriceSource
) -> None:
    live = pd.Timestamp("2024-03-05 15:42", tz="America/New_York").tz_convert("UTC")
    listed(
        yahoo,
        "AAPL",
        daily=[
            daily_row("2024-03-04", (10.0, 11.0, 9.0, 10.0), 10.0, 100),
            daily_row("2024-03-05", (10.0, 12.0, 9.5, 11.0), 11.0, 1000),
            (live.isoformat(), 10.0, 12.5, 9.5, 11.5, 11.5, 1500),
        ],
    )

    (result,) = source.fetch([window("AAPL", "1d", *MARCH_4_TO_6)])

    assert isinstance(result, FetchedBars)
    pd.testing.assert_frame_equal(
        result.bars,
        bars_of(
            [
                ("2024-03-04 05:00", 10.0, 11.0, 9.0, 10.0, 100.0),
                ("2024-03-05 05:00", 10.0, 12.5, 9.5, 11.5, 1500.0),
            ]
        ),
    )
