"""Bars from a directory of exported files: offline work, tests and replays.

The directory holds one file per ticker and interval, named ``<TICKER>_<interval>.csv`` or
``.parquet`` (for example ``MSFT_1d.csv`` or ``PTT.BK_15m.parquet``), in any shape
``normalize_bars`` accepts, including frames saved straight from yfinance. The file is the whole
truth for its ticker: a window before its first bar holds nothing, and a window after its last
bar in which the market traded is an error, not an empty partition.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from pydantic import Field

from anomaly_pipeline.prices.frames import PriceDataError
from anomaly_pipeline.prices.normalize import normalize_bars, read_bar_file
from anomaly_pipeline.prices.source import BarWindow, FetchedBars, PriceSource, explain_empty_window
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.universe import Market

_FILE_CACHE: dict[tuple[str, int], tuple[pd.DataFrame, tuple[str, ...]]] = {}
_CACHE_LOCK = threading.Lock()


class FilesPriceSource(PriceSource):
    """Reads ``<TICKER>_<interval>.csv|parquet`` files from ``directory``."""

    directory: str = Field(
        default=str(SAMPLE_DATA_DIR), description="Folder of exported bar files."
    )
    naive_timezone: str | None = Field(
        default=None,
        description="Zone of naive timestamps in the files; default: each market's timezone.",
    )

    def fetch(self, windows: Sequence[BarWindow]) -> list[FetchedBars | PriceDataError]:
        return [self._fetch_one(window) for window in windows]

    def file_for(self, ticker: str, interval: str) -> Path | None:
        for suffix in (".parquet", ".csv"):
            path = Path(self.directory) / f"{ticker}_{interval}{suffix}"
            if path.exists():
                return path
        return None

    def coverage(
        self, ticker: str, interval: str, market: Market
    ) -> tuple[pd.Timestamp, pd.Timestamp]:
        """First and last bar of a ticker's file."""
        probe = BarWindow(
            ticker,
            interval,
            market,
            pd.Timestamp.min.tz_localize("UTC"),
            pd.Timestamp.max.tz_localize("UTC"),
            "coverage",
        )
        path = self.file_for(ticker, interval)
        if path is None:
            raise probe.error(f"no file {ticker}_{interval}.csv or .parquet in {self.directory}")
        bars, _ = self._load(path, probe)
        if bars.empty:
            raise probe.error(f"{path.name} holds no bars")
        return bars.index[0], bars.index[-1]

    def _fetch_one(self, window: BarWindow) -> FetchedBars | PriceDataError:
        path = self.file_for(window.ticker, window.interval)
        if path is None:
            return window.error(
                f"no file {window.ticker}_{window.interval}.csv or .parquet in {self.directory}"
            )
        try:
            all_bars, notes = self._load(path, window)
        except PriceDataError as exc:
            return exc
        bars = all_bars[(all_bars.index >= window.start) & (all_bars.index < window.end)]
        if not bars.empty:
            return FetchedBars(window=window, bars=bars, notes=notes)

        first_bar = all_bars.index[0] if len(all_bars) else None
        if first_bar is not None and window.start > all_bars.index[-1]:
            # Past the end of the export: the file cannot say whether the market traded.
            last = all_bars.index[-1].isoformat()
            try:
                reason = explain_empty_window(window, first_bar=None)
            except PriceDataError:
                return window.error(f"{path.name} ends at {last}, before this window")
            return FetchedBars(window=window, bars=bars, empty_reason=reason)
        try:
            reason = explain_empty_window(window, first_bar=first_bar)
        except PriceDataError as exc:
            return exc
        return FetchedBars(window=window, bars=bars, empty_reason=reason)

    def _load(self, path: Path, window: BarWindow) -> tuple[pd.DataFrame, tuple[str, ...]]:
        # A file is parsed once per process and modification time, not once per partition.
        key = (str(path), path.stat().st_mtime_ns)
        with _CACHE_LOCK:
            cached = _FILE_CACHE.get(key)
        if cached is None:
            normalized = normalize_bars(
                read_bar_file(path),
                ticker=window.ticker,
                interval=window.interval,
                market=window.market,
                window=f"file {path.name}",
                naive_timezone=self.naive_timezone,
            )
            cached = (normalized.bars, normalized.notes)
            with _CACHE_LOCK:
                _FILE_CACHE[key] = cached
        return cached
