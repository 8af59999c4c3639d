"""Bars from Yahoo Finance through yfinance, batched and aware of Yahoo's refusals.

How ``fetch`` runs:

1. A window that starts further back than Yahoo serves its interval (15m: 60 days, 1h: 730
   days) fails at once, without a request.
2. The other windows are grouped by (interval, start, end); each group is fetched with
   ``yf.download`` in batches of up to ``max_tickers_per_request`` tickers, at most
   ``max_concurrent_requests`` batches at a time. (yfinance still sends one chart request per
   ticker inside a batch; batching saves the per-call set-up and keeps requests sequential.)
3. Each ticker's columns are normalised (see ``normalize.py``) and cut to ``[start, end)``.
4. ``yf.download`` turns every per-ticker failure, rate limiting included, into empty columns,
   so an empty answer is never taken at face value. When the calendar says the market was
   closed for the whole window, empty is the right answer. Otherwise the ticker is asked again
   on its own with errors raised, retried with exponential backoff while Yahoo answers "too
   many requests", and ends as bars, as a legitimate empty window (it ends before the ticker's
   first trade), as a ``RateLimitedError`` or as a ``PriceDataError``. Once one ticker of a
   batch has used up its attempts, the batch's remaining tickers are not asked again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import yfinance as yf
from pydantic import Field, PrivateAttr
from yfinance.exceptions import YFPricesMissingError, YFRateLimitError, YFTzMissingError

from anomaly_pipeline.intervals import INTERVALS
from anomaly_pipeline.prices.frames import PriceDataError, RateLimitedError, empty_bars
from anomaly_pipeline.prices.normalize import normalize_bars, select_ticker
from anomaly_pipeline.prices.source import BarWindow, FetchedBars, PriceSource, explain_empty_window

Outcome = FetchedBars | PriceDataError


def _utc(moment: pd.Timestamp) -> pd.Timestamp:
    moment = pd.Timestamp(moment)
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


def _utc_now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC")


def _default_session() -> Any:
    """One browser-like session per fetch, shared by its batches (None: yfinance's default)."""
    try:
        from curl_cffi import requests as curl_requests
    except ImportError:
        return None
    return curl_requests.Session(impersonate="chrome")


@dataclasses.dataclass
class _Transport:
    """How the source reaches Yahoo and waits; replaced in tests to stay offline and fast."""

    session_factory: Callable[[], Any] = _default_session
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], pd.Timestamp] = _utc_now
    _session: Any = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def session(self) -> Any:
        """One session for the resource's lifetime, so Yahoo's cookie and crumb are reused."""
        with self._lock:
            if self._session is None:
                self._session = self.session_factory()
            return self._session


class _Refusal:
    """Shared by the batches of one fetch: set once Yahoo has refused a ticker to the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: RateLimitedError | None = None

    def record(self, error: RateLimitedError) -> None:
        with self._lock:
            if self.error is None:
                self.error = error

    def not_requested(self, window: BarWindow, attempts: int) -> RateLimitedError | None:
        if self.error is None:
            return None
        return RateLimitedError(
            window.ticker,
            window.interval,
            window.describe(),
            f"not requested: Yahoo kept refusing this fetch as rate limited "
            f"({self.error.ticker} used up {attempts} attempts); retry later",
        )


@dataclasses.dataclass(frozen=True)
class _Batch:
    interval: str
    start: pd.Timestamp
    end: pd.Timestamp
    # Upper-case ticker -> the window asked for it.
    windows: dict[str, BarWindow]


class YFinancePriceSource(PriceSource):
    """Yahoo Finance bars via yfinance: adjusted prices, batched, retried when rate limited."""

    max_tickers_per_request: int = Field(
        default=50, ge=1, description="Tickers per yf.download call."
    )
    max_attempts: int = Field(
        default=4,
        ge=1,
        description="Requests per ticker while Yahoo answers 'too many requests'.",
    )
    backoff_seconds: float = Field(
        default=2.0,
        ge=0.0,
        description="Wait before the first retry; doubles before each further retry.",
    )
    max_concurrent_requests: int = Field(
        default=2, ge=1, description="yf.download calls in flight at once."
    )
    request_timeout_seconds: float = Field(
        default=30.0, gt=0.0, description="Timeout of one HTTP request to Yahoo."
    )

    _transport: _Transport = PrivateAttr(default_factory=_Transport)

    def use_transport(
        self,
        *,
        session_factory: Callable[[], Any] | None = None,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], pd.Timestamp] | None = None,
    ) -> YFinancePriceSource:
        """Replace the HTTP session factory, the sleep and the clock (for tests); returns self.

        ``session_factory`` must return a ``requests`` or ``curl_cffi`` Session, the types
        yfinance accepts; it is called once per ``fetch``.
        """
        current = self._transport
        self._transport = _Transport(
            session_factory=session_factory or current.session_factory,
            sleep=sleep or current.sleep,
            clock=clock or current.clock,
        )
        return self

    def unreachable_reason(self, window: BarWindow, now: pd.Timestamp | None = None) -> str | None:
        spec = INTERVALS.get(window.interval)
        if spec is None:
            return f"unknown interval {window.interval!r}; expected one of {', '.join(INTERVALS)}"
        if spec.yahoo_reach is None:
            return None
        now = _utc(now) if now is not None else self._transport.clock()
        oldest = now - spec.yahoo_reach
        start = _utc(window.start)
        if start < oldest:
            return (
                f"Yahoo serves {window.interval} bars only for the last "
                f"{spec.yahoo_reach.days} days; the window starts {start.isoformat()}, "
                f"before {oldest.isoformat()}; load it from a file instead"
            )
        return None

    def fetch(self, windows: Sequence[BarWindow]) -> list[FetchedBars | PriceDataError]:
        windows = list(windows)
        results: list[Outcome | None] = [None] * len(windows)
        now = self._transport.clock()
        groups: dict[tuple[str, pd.Timestamp, pd.Timestamp], dict[str, list[int]]] = {}
        for position, window in enumerate(windows):
            reason = self.unreachable_reason(window, now)
            if reason is not None:
                results[position] = window.error(reason)
                continue
            key = (window.interval, _utc(window.start), _utc(window.end))
            groups.setdefault(key, {}).setdefault(window.ticker.upper(), []).append(position)

        batches: list[_Batch] = []
        for (interval, start, end), positions_by_ticker in groups.items():
            tickers = list(positions_by_ticker)
            for first in range(0, len(tickers), self.max_tickers_per_request):
                chunk = tickers[first : first + self.max_tickers_per_request]
                batch_windows = {t: windows[positions_by_ticker[t][0]] for t in chunk}
                batches.append(_Batch(interval, start, end, batch_windows))

        if batches:
            session = self._transport.session()
            refusal = _Refusal()
            workers = min(self.max_concurrent_requests, len(batches))
            if workers == 1:
                outcomes = [self._fetch_batch(batch, session, refusal) for batch in batches]
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    outcomes = list(
                        pool.map(lambda b: self._fetch_batch(b, session, refusal), batches)
                    )
            for batch, by_ticker in zip(batches, outcomes, strict=True):
                key = (batch.interval, batch.start, batch.end)
                for ticker, outcome in by_ticker.items():
                    for position in groups[key][ticker]:
                        results[position] = _for_window(outcome, windows[position])

        assert all(result is not None for result in results)
        return [result for result in results if result is not None]

    # -----------------------------------------------------------------------------------------

    def _fetch_batch(self, batch: _Batch, session: Any, refusal: _Refusal) -> dict[str, Outcome]:
        # Yahoo refusing this client: more requests would only prolong the refusal.
        raw = None if refusal.error is not None else self._download(batch, session)
        outcomes: dict[str, Outcome] = {}
        pending: list[str] = []
        for ticker, window in batch.windows.items():
            piece = _columns_of(raw, ticker)
            if piece is None:
                pending.append(ticker)
                continue
            try:
                outcome = self._bars_in_window(window, piece)
            except PriceDataError as exc:
                outcomes[ticker] = exc
                continue
            if outcome is None:
                pending.append(ticker)
            else:
                outcomes[ticker] = outcome

        for ticker in pending:
            window = batch.windows[ticker]
            closed = _closed_market_reason(window)
            if closed is not None:
                outcomes[ticker] = FetchedBars(
                    window=window, bars=empty_bars(), empty_reason=closed
                )
                continue
            not_requested = refusal.not_requested(window, self.max_attempts)
            if not_requested is not None:
                outcomes[ticker] = not_requested
                continue
            outcome = self._fetch_alone(window, session)
            if isinstance(outcome, RateLimitedError):
                refusal.record(outcome)
            outcomes[ticker] = outcome
        return outcomes

    def _download(self, batch: _Batch, session: Any) -> pd.DataFrame | None:
        try:
            return yf.download(
                list(batch.windows),
                start=batch.start,
                end=batch.end,
                interval=batch.interval,
                group_by="column",
                auto_adjust=True,
                actions=False,
                threads=False,
                progress=False,
                # Keep each bar's exchange offset; normalisation converts to UTC itself.
                ignore_tz=False,
                multi_level_index=True,
                timeout=self.request_timeout_seconds,
                session=session,
            )
        except Exception:
            # yf.download catches per-ticker failures itself; anything escaping is unexpected,
            # so every ticker is asked again on its own, where the error gets reported.
            return None

    def _bars_in_window(self, window: BarWindow, raw: pd.DataFrame) -> FetchedBars | None:
        normalized = normalize_bars(
            raw,
            ticker=window.ticker,
            interval=window.interval,
            market=window.market,
            window=window.describe(),
        )
        bars = normalized.bars
        bars = bars[(bars.index >= _utc(window.start)) & (bars.index < _utc(window.end))]
        if bars.empty:
            return None
        return FetchedBars(window=window, bars=bars, notes=normalized.notes)

    def _fetch_alone(self, window: BarWindow, session: Any) -> Outcome:
        for attempt in range(1, self.max_attempts + 1):
            try:
                return self._ask_alone(window, session)
            except YFRateLimitError:
                if attempt < self.max_attempts:
                    self._transport.sleep(self.backoff_seconds * 2 ** (attempt - 1))
        return RateLimitedError(
            window.ticker,
            window.interval,
            window.describe(),
            f"Yahoo answered 'too many requests' to all {self.max_attempts} attempts; retry later",
        )

    def _ask_alone(self, window: BarWindow, session: Any) -> Outcome:
        """One request for one ticker, errors raised; YFRateLimitError propagates for a retry."""
        ticker = yf.Ticker(window.ticker, session=session)
        yahoo_said: str | None = None
        known_symbol = True
        try:
            frame = _history(
                ticker,
                start=window.start,
                end=window.end,
                interval=window.interval,
                timeout=self.request_timeout_seconds,
            )
        except YFRateLimitError:
            raise
        except YFTzMissingError as exc:
            frame, yahoo_said, known_symbol = None, exc.rationale, False
        except YFPricesMissingError as exc:
            frame, yahoo_said = None, exc.rationale
        except Exception as exc:
            return window.error(f"yfinance request failed: {type(exc).__name__}: {exc}")

        if frame is not None and len(frame) > 0:
            try:
                outcome = self._bars_in_window(window, frame)
            except PriceDataError as exc:
                return exc
            if outcome is not None:
                return outcome

        first_bar = _first_trade(ticker, self.request_timeout_seconds) if known_symbol else None
        try:
            reason = explain_empty_window(window, first_bar)
        except PriceDataError as exc:
            if yahoo_said:
                return window.error(f"{exc.reason}; Yahoo: {yahoo_said}")
            return exc
        return FetchedBars(window=window, bars=empty_bars(), empty_reason=reason)


def _history(ticker: yf.Ticker, **kwargs: Any) -> pd.DataFrame:
    with warnings.catch_warnings():
        # raise_errors is the per-call way to get exceptions instead of log lines; yfinance
        # marks it deprecated in favour of a process-wide switch we do not want to flip.
        warnings.filterwarnings("ignore", message=".*raise_errors.*", category=DeprecationWarning)
        return ticker.history(auto_adjust=True, actions=False, raise_errors=True, **kwargs)


def _first_trade(ticker: yf.Ticker, timeout: float) -> pd.Timestamp | None:
    """The ticker's first trade from Yahoo's chart metadata; None when Yahoo does not say."""
    try:
        value = ticker.get_history_metadata().get("firstTradeDate")
        if value is None:
            # An error answer (e.g. a range before the listing) carries no metadata; a short
            # recent range does, even when it holds no bars.
            with contextlib.suppress(YFPricesMissingError):
                _history(ticker, period="5d", interval="1d", timeout=timeout)
            value = ticker.get_history_metadata().get("firstTradeDate")
    except YFRateLimitError:
        raise
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return pd.Timestamp(int(value), unit="s", tz="UTC")
    return _utc(pd.Timestamp(value))


def _columns_of(raw: pd.DataFrame | None, ticker: str) -> pd.DataFrame | None:
    """One ticker's columns of a yf.download frame; None when there is nothing of it."""
    if raw is None or len(raw) == 0:
        return None
    try:
        piece = select_ticker(raw, ticker)
    except ValueError:
        return None
    # yf.download aligns all tickers on one index; rows where this ticker has no values at
    # all are that padding, not something Yahoo sent.
    return piece.dropna(how="all")


def _closed_market_reason(window: BarWindow) -> str | None:
    try:
        return explain_empty_window(window, None)
    except PriceDataError:
        return None


def _for_window(outcome: Outcome, window: BarWindow) -> Outcome:
    """The same outcome, labelled with ``window`` (identical windows share one request)."""
    if isinstance(outcome, FetchedBars) and outcome.window is not window:
        return dataclasses.replace(outcome, window=window)
    return outcome
