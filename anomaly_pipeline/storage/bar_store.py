"""Prices and features in MongoDB, one document per partition.

Each partition (ticker, interval, window) is one document holding its bars column by column.
Writing a partition is a single ``replace_one``, which MongoDB applies atomically, so a run
killed mid-write leaves the partition either as it was or fully replaced, never half-written.
Few large documents also suit the local server far better than one document per bar.

Columns are stored as BSON binary holding little-endian float64 values, and bar times as
little-endian int64 nanoseconds since the epoch (UTC). A month of 15m crypto bars is about 3,000
values per column: as BSON arrays that costs a Python object per value on every write and read,
and writes to the local server took about ten times longer than the same data as binary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from bson import Binary
from pymongo.database import Database

from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.prices.frames import PRICE_COLUMNS, empty_bars
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.storage.mongo import BAR_FEATURES, PRICE_BARS, bson_safe


def partition_document_id(ticker: str, interval: str, window_start: pd.Timestamp) -> str:
    return f"{ticker}|{interval}|{pd.Timestamp(window_start).tz_convert('UTC').isoformat()}"


class BarStore:
    """Reads and writes the ``price_bars`` and ``bar_features`` collections."""

    def __init__(self, database: Database):
        self.database = database

    def write_bars(
        self,
        window: BarWindow,
        bars: pd.DataFrame,
        *,
        run_id: str,
        source: str,
        empty_reason: str | None,
        notes: Sequence[str] = (),
    ) -> None:
        document = {
            **_window_fields(window),
            "bar_count": len(bars),
            "empty_reason": empty_reason,
            "normalisation_notes": list(notes),
            "source": source,
            "run_id": run_id,
            "ingested_at": pd.Timestamp.now(tz="UTC"),
            **_encode_columns(bars, PRICE_COLUMNS),
        }
        self.database[PRICE_BARS].replace_one(
            {"_id": document["_id"]}, bson_safe(document), upsert=True
        )

    def write_features(
        self, window: BarWindow, features: pd.DataFrame, *, warmup_excluded: int, run_id: str
    ) -> None:
        document = {
            **_window_fields(window),
            "row_count": len(features),
            "warmup_excluded": warmup_excluded,
            "feature_names": list(FEATURE_NAMES),
            "run_id": run_id,
            "computed_at": pd.Timestamp.now(tz="UTC"),
            **_encode_columns(features, FEATURE_NAMES),
        }
        self.database[BAR_FEATURES].replace_one(
            {"_id": document["_id"]}, bson_safe(document), upsert=True
        )

    def partition_document(self, collection: str, window: BarWindow) -> dict | None:
        return self.database[collection].find_one(
            {"_id": partition_document_id(window.ticker, window.interval, window.start)}
        )

    def read_bars(
        self, ticker: str, interval: str, start: pd.Timestamp, end: pd.Timestamp
    ) -> pd.DataFrame:
        """Stored bars with ``start <= timestamp < end``."""
        documents = self.database[PRICE_BARS].find(
            {
                "ticker": ticker,
                "interval": interval,
                "window_start": {"$lt": end},
                "window_end": {"$gt": start},
            },
            sort=[("window_start", 1)],
        )
        bars = _frame_from_documents(documents, PRICE_COLUMNS)
        return bars[(bars.index >= start) & (bars.index < end)]

    def bars_before(
        self, ticker: str, interval: str, before: pd.Timestamp, count: int
    ) -> pd.DataFrame:
        """The last ``count`` stored bars before ``before`` (fewer at the start of history)."""
        chunks: list[pd.DataFrame] = []
        held = 0
        cursor = self.database[PRICE_BARS].find(
            {"ticker": ticker, "interval": interval, "window_start": {"$lt": before}},
            sort=[("window_start", -1)],
        )
        for document in cursor:
            chunk = _frame_from_documents([document], PRICE_COLUMNS)
            chunk = chunk[chunk.index < before]
            chunks.append(chunk)
            held += len(chunk)
            if held >= count:
                break
        if not chunks:
            return empty_bars()
        return pd.concat(chunks[::-1]).sort_index().iloc[-count:] if count else empty_bars()

    def read_features(
        self,
        tickers: Iterable[str],
        interval: str,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """Stored features of several tickers with a ``ticker`` column, by ticker then time."""
        query: dict = {"ticker": {"$in": list(tickers)}, "interval": interval}
        if end is not None:
            query["window_start"] = {"$lt": end}
        if start is not None:
            query["window_end"] = {"$gt": start}
        frames = []
        for document in self.database[BAR_FEATURES].find(
            query, sort=[("ticker", 1), ("window_start", 1)]
        ):
            frame = _frame_from_documents([document], FEATURE_NAMES)
            frame.insert(0, "ticker", document["ticker"])
            frames.append(frame)
        if not frames:
            return pd.DataFrame(columns=["ticker", *FEATURE_NAMES], index=empty_bars().index)
        features = pd.concat(frames)
        if start is not None:
            features = features[features.index >= start]
        if end is not None:
            features = features[features.index < end]
        return features


def _window_fields(window: BarWindow) -> dict:
    return {
        "_id": partition_document_id(window.ticker, window.interval, window.start),
        "ticker": window.ticker,
        "interval": window.interval,
        "market": window.market.name,
        "partition_key": str(window.partition_key),
        "window_start": window.start,
        "window_end": window.end,
    }


COLUMN_ENCODING = "float64-le; timestamps int64-le ns UTC"


def bars_from_document(document: dict) -> pd.DataFrame:
    """The canonical bar frame stored in one ``price_bars`` document."""
    return _frame_from_documents([document], PRICE_COLUMNS)


def features_from_document(document: dict) -> pd.DataFrame:
    """The feature frame stored in one ``bar_features`` document."""
    return _frame_from_documents([document], FEATURE_NAMES)


def _encode_columns(frame: pd.DataFrame, columns: Sequence[str]) -> dict:
    # Binary columns bypass bson_safe, so the finiteness it would enforce is checked here.
    for column in columns:
        values = frame[column].to_numpy(dtype="float64")
        finite = np.isfinite(values)
        if not finite.all():
            row = int(np.argmin(finite))
            raise ValueError(
                f"refusing to store {column}={values[row]} at {frame.index[row].isoformat()}: "
                "not a finite number"
            )
    return {
        "encoding": COLUMN_ENCODING,
        "timestamps": Binary(frame.index.asi8.astype("<i8").tobytes()),
        "columns": {
            column: Binary(frame[column].to_numpy(dtype="<f8").tobytes()) for column in columns
        },
    }


def _frame_from_documents(documents: Iterable[dict], columns: Sequence[str]) -> pd.DataFrame:
    stamps: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {column: [] for column in columns}
    for document in documents:
        stamps.append(np.frombuffer(document["timestamps"], dtype="<i8"))
        for column in columns:
            values[column].append(np.frombuffer(document["columns"][column], dtype="<f8"))
    index = pd.DatetimeIndex(
        pd.to_datetime(np.concatenate(stamps) if stamps else np.empty(0, "<i8"), utc=True),
        name="timestamp",
    )
    return pd.DataFrame(
        {
            column: np.concatenate(values[column]).astype("float64") if stamps else np.empty(0)
            for column in columns
        },
        index=index,
    )
