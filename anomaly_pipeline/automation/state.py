"""Detection state: what has been ingested and scored, per ticker and interval, in MongoDB.

Collection ``detection_metadata`` holds one document per ticker and interval (``_id``
``TICKER|interval``, e.g. ``MSFT|1d``). For every partition window it records the content hash
of the stored bars and, once the window was scored, the hash of the bars that were scored and
the model that scored them. The document also carries what the sensors need to decide, with
stored state only, what to run next:

* ``pending``: the windows whose bars changed and have not been scored since, each with a
  token that is new for every change (it makes the sensor's run keys unique per change);
* ``needs_detection``: the market name while ``pending`` is not empty, absent otherwise. It is
  the one indexed field the sensor queries, so "is anything new?" is a single index lookup
  that returns nothing when nothing is new;
* ``model_version`` and ``model_hash`` of the model that scored the latest scored window, to
  compare with the one current model record of the market and interval.

Crash safety. Ingestion records a window after its bars were written and compares the new
content hash with the one recorded here, not with the stored bars: a run killed between the two
writes leaves the old hash here, so running it again finds the change and marks the window
pending. Detection clears a pending window only after the window's anomalies were replaced,
and only when the bars it scored are the bars recorded here, so a change that lands while a
detection runs stays pending. Every write is an idempotent upsert or a conditional update.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
from pymongo import UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from anomaly_pipeline.failpoints import failpoint
from anomaly_pipeline.intervals import interval_spec
from anomaly_pipeline.prices.frames import PRICE_COLUMNS
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.storage.mongo import DETECTION_METADATA, bson_safe

_ATTEMPTS = 5
_INDEXED: set[tuple[int, int, str]] = set()
_INDEX_LOCK = threading.Lock()


def state_id(ticker: str, interval: str) -> str:
    """``TICKER|interval``, the ``_id`` of a ticker's detection state."""
    return f"{ticker}|{interval}"


def window_key(window: BarWindow) -> str:
    """The window part of a partition key (``1987``, ``2025-02``), from the window's start."""
    spec = interval_spec(window.interval)
    return window.start.tz_convert(window.market.timezone).strftime(spec.window_format)


def next_window_key(window: BarWindow) -> str:
    """The key of the window that starts where ``window`` ends."""
    spec = interval_spec(window.interval)
    return window.end.tz_convert(window.market.timezone).strftime(spec.window_format)


def bars_content_hash(bars: pd.DataFrame) -> str:
    """SHA-256 of bar timestamps (milliseconds, as stored) and OHLCV values.

    Bars fetched from a source and the same bars read back from MongoDB hash alike: BSON keeps
    float64 exactly and dates to the millisecond, and every NaN is hashed as one canonical NaN.
    """
    digest = hashlib.sha256()
    if len(bars):
        stamps = pd.DatetimeIndex(bars.index).tz_convert("UTC").as_unit("ns").asi8 // 1_000_000
    else:
        stamps = np.empty(0, dtype="int64")
    digest.update(np.ascontiguousarray(stamps, dtype="<i8").tobytes())
    values = bars[list(PRICE_COLUMNS)].to_numpy(dtype="float64")
    values = np.where(np.isnan(values), np.nan, values)
    digest.update(np.ascontiguousarray(values, dtype="<f8").tobytes())
    return digest.hexdigest()


class DetectionState:
    """Reads and writes the ``detection_metadata`` collection."""

    def __init__(self, database: Database):
        self.collection = database[DETECTION_METADATA]
        _ensure_indexes(database)

    def record_ingestion(self, window: BarWindow, bars: pd.DataFrame, *, run_id: str) -> bool:
        """Record that ``bars`` are now stored for ``window``; True when they changed.

        Identical bars record nothing, so re-ingesting a window creates no work. Changed bars
        mark the window pending, and also the next window when it was already scored: its
        features read the last bars of this one.
        """
        failpoint("detection_state.before_ingestion_record")
        inside = bars[(bars.index >= window.start) & (bars.index < window.end)]
        content_hash = bars_content_hash(inside)
        key, following = window_key(window), next_window_key(window)
        document_id = state_id(window.ticker, window.interval)

        for _ in range(_ATTEMPTS):
            current = self.collection.find_one(
                {"_id": document_id},
                {
                    f"windows.{key}": 1,
                    f"windows.{following}.scored_at": 1,
                    f"windows.{following}.partition_key": 1,
                },
            )
            windows = (current or {}).get("windows", {})
            entry = windows.get(key)
            if entry is not None and entry.get("content_hash") == content_hash:
                return False

            now = pd.Timestamp.now(tz="UTC")
            fields = {
                "ticker": window.ticker,
                "interval": window.interval,
                "market": window.market.name,
                f"windows.{key}.partition_key": str(window.partition_key),
                f"windows.{key}.start": window.start,
                f"windows.{key}.end": window.end,
                f"windows.{key}.content_hash": content_hash,
                f"windows.{key}.bars": len(inside),
                f"windows.{key}.ingested_at": now,
                f"windows.{key}.ingest_run_id": run_id,
                f"pending.{key}": _pending_entry(window.partition_key, "bars changed", now),
                "needs_detection": window.market.name,
                "last_run_id": run_id,
                "updated_at": now,
            }
            next_entry = windows.get(following)
            if next_entry and next_entry.get("scored_at") is not None:
                fields[f"pending.{following}"] = _pending_entry(
                    next_entry["partition_key"], "previous window changed", now
                )
            update: dict = {
                "$set": bson_safe(fields),
                "$inc": {
                    "bars_seen": len(inside) - (entry or {}).get("bars", 0),
                    f"windows.{key}.changes": 1,
                },
            }
            if len(inside):
                update["$max"] = bson_safe({"last_bar_ingested": inside.index.max()})

            # Only a document still holding what was read is updated, so two writers of the same
            # ticker never lose each other's counts; the loser reads again.
            expected = entry.get("content_hash") if entry else {"$exists": False}
            try:
                result = self.collection.update_one(
                    {"_id": document_id, f"windows.{key}.content_hash": expected},
                    update,
                    upsert=current is None,
                )
            except DuplicateKeyError:
                continue
            if result.matched_count or result.upserted_id is not None:
                return True
        raise RuntimeError(
            f"{window.ticker} {window.interval} partition {window.partition_key}: the detection "
            f"state kept changing under this run; {_ATTEMPTS} attempts to record it failed"
        )

    def record_detection(
        self,
        window: BarWindow,
        *,
        scored_bars: pd.DataFrame,
        model_version: str,
        model_hash: str,
        anomalies: int,
        run_id: str,
    ) -> None:
        """Record that ``window``'s anomalies were replaced after scoring ``scored_bars``.

        Call it only after the window's anomalies are stored: it clears the window's pending
        mark, which is what tells the sensors the work is done.
        """
        failpoint("detection_state.before_detection_record")
        key = window_key(window)
        document_id = state_id(window.ticker, window.interval)
        content_hash = bars_content_hash(scored_bars)
        now = pd.Timestamp.now(tz="UTC")

        record = {
            "$set": bson_safe(
                {
                    "ticker": window.ticker,
                    "interval": window.interval,
                    "market": window.market.name,
                    f"windows.{key}.partition_key": str(window.partition_key),
                    f"windows.{key}.start": window.start,
                    f"windows.{key}.end": window.end,
                    f"windows.{key}.scored_content_hash": content_hash,
                    f"windows.{key}.scored_bars": len(scored_bars),
                    f"windows.{key}.anomalies": anomalies,
                    f"windows.{key}.scored_model_version": model_version,
                    f"windows.{key}.scored_model_hash": model_hash,
                    f"windows.{key}.scored_at": now,
                    f"windows.{key}.scored_run_id": run_id,
                    "last_run_id": run_id,
                    "updated_at": now,
                }
            )
        }
        if len(scored_bars):
            record["$max"] = bson_safe({"last_bar_scored": scored_bars.index.max()})
        operations = [
            UpdateOne({"_id": document_id}, record, upsert=True),
            # The pair's model is the one that scored its latest window: a backfill of older
            # windows must not hide that the latest one still needs the current model.
            UpdateOne(
                {
                    "_id": document_id,
                    "$or": [
                        {"latest_scored_start": {"$lte": bson_safe(window.start)}},
                        {"latest_scored_start": {"$exists": False}},
                    ],
                },
                {
                    "$set": bson_safe(
                        {
                            "latest_scored_partition": str(window.partition_key),
                            "latest_scored_window": key,
                            "latest_scored_start": window.start,
                            "model_version": model_version,
                            "model_hash": model_hash,
                        }
                    )
                },
            ),
            # Bars that changed after this run read them keep the window pending.
            UpdateOne(
                {"_id": document_id, f"windows.{key}.content_hash": content_hash},
                {"$unset": {f"pending.{key}": ""}},
            ),
            UpdateOne({"_id": document_id, "pending": {}}, {"$unset": {"needs_detection": ""}}),
        ]
        for attempt in range(_ATTEMPTS):
            try:
                self.collection.bulk_write(operations, ordered=True)
                return
            except BulkWriteError as exc:
                # Two runs creating the same document race on its _id; the updates are
                # idempotent, so repeating them is safe.
                duplicate = all(
                    error.get("code") == 11000 for error in exc.details.get("writeErrors", [])
                )
                if not duplicate or attempt == _ATTEMPTS - 1:
                    raise

    def mark_for_model(self, documents: Iterable[dict], *, version: str, model_hash: str) -> int:
        """Mark the latest scored window of each of ``documents`` pending for a new model.

        ``documents`` come from ``pair_documents``. A document whose latest window was scored
        by ``model_hash`` in the meantime is left alone. Returns how many were marked.
        """
        now = pd.Timestamp.now(tz="UTC")
        operations = [
            UpdateOne(
                {"_id": document["_id"], "model_hash": document.get("model_hash")},
                {
                    "$set": bson_safe(
                        {
                            f"pending.{document['latest_scored_window']}": {
                                "partition_key": document["latest_scored_partition"],
                                # The same token however often it is marked: one run per model.
                                "token": f"model-{version}",
                                "reason": f"model {version} is current",
                                "since": now,
                            },
                            "needs_detection": document["market"],
                        }
                    )
                },
            )
            for document in documents
            if document.get("model_hash") != model_hash
        ]
        if not operations:
            return 0
        return self.collection.bulk_write(operations, ordered=False).modified_count

    def pending_documents(self, market: str) -> Iterator[dict]:
        """State of the market's tickers that have windows waiting for detection."""
        return self.collection.find(
            {"needs_detection": market}, {"ticker": 1, "interval": 1, "pending": 1}
        )

    def pair_documents(self, market: str, interval: str) -> Iterator[dict]:
        """Model and latest scored window of every ticker of one market and interval."""
        return self.collection.find(
            {"market": market, "interval": interval},
            {
                "ticker": 1,
                "market": 1,
                "model_version": 1,
                "model_hash": 1,
                "latest_scored_partition": 1,
                "latest_scored_window": 1,
            },
        )

    def summaries(self, market: str) -> Iterator[dict]:
        """Freshness fields of every ticker of a market (no per-window details)."""
        return self.collection.find(
            {"market": market},
            {
                "ticker": 1,
                "interval": 1,
                "last_bar_ingested": 1,
                "last_bar_scored": 1,
                "bars_seen": 1,
                "model_version": 1,
                "pending": 1,
                "updated_at": 1,
            },
        )

    def get(self, ticker: str, interval: str) -> dict | None:
        return self.collection.find_one({"_id": state_id(ticker, interval)})


def _pending_entry(partition_key: str, reason: str, since: pd.Timestamp) -> dict:
    return {
        "partition_key": str(partition_key),
        "token": uuid.uuid4().hex[:12],
        "reason": reason,
        "since": since,
    }


def _ensure_indexes(database: Database) -> None:
    marker = (os.getpid(), id(database.client), database.name)
    with _INDEX_LOCK:
        if marker in _INDEXED:
            return
        collection = database[DETECTION_METADATA]
        # Sparse: only documents with work are in it, so an idle market is an empty lookup.
        collection.create_index([("needs_detection", 1)], name="needs_detection", sparse=True)
        collection.create_index([("market", 1), ("interval", 1)], name="market_interval")
        _INDEXED.add(marker)
