"""The ``anomalies`` collection: one document per anomalous bar, replaced partition by partition.

MongoDB without a replica set has no multi-document transactions, so a partition's set is
replaced in two idempotent steps: upsert every new document by its deterministic ``_id``, then
delete the partition's documents that are not in the new set. A run killed between or inside
those steps leaves extra or missing documents only until the partition is run again, which
converges to exactly the new set; ``_id``s make duplicates impossible.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from pymongo import UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from anomaly_pipeline.failpoints import failpoint
from anomaly_pipeline.storage.mongo import ANOMALIES, bson_safe

_DUPLICATE_KEY = 11000
# Set by the store itself, never taken from a caller's document.
_TIMESTAMP_FIELDS = ("created_at", "updated_at")


ANOMALY_ID_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def anomaly_id(ticker: str, interval: str, timestamp: pd.Timestamp) -> str:
    """``TICKER|interval|bar start in UTC``, e.g. ``AAPL|15m|2024-03-08T14:30:00Z``."""
    stamp = pd.Timestamp(timestamp).tz_convert("UTC").strftime(ANOMALY_ID_TIME_FORMAT)
    return f"{ticker}|{interval}|{stamp}"


class AnomalyStore:
    def __init__(self, database: Database):
        self.collection = database[ANOMALIES]

    def replace_window(
        self,
        ticker: str,
        interval: str,
        start: pd.Timestamp,
        end: pd.Timestamp,
        documents: Sequence[dict],
    ) -> dict[str, int]:
        """Make the stored anomalies of one ticker and interval in a window equal ``documents``.

        ``created_at`` is set when a bar is first found and kept on every later run.
        """
        # One document per _id even if a caller passes the same bar twice: the last one wins.
        by_id = {document["_id"]: document for document in documents}
        now = bson_safe(pd.Timestamp.now(tz="UTC"))
        # Writers racing on one bar read their clocks before writing and may land in either
        # order: $min and $max keep created_at the earliest time and updated_at the latest, so
        # created_at <= updated_at whoever lands last.
        operations = [
            UpdateOne(
                {"_id": document_id},
                {
                    "$set": bson_safe(
                        {k: v for k, v in document.items() if k not in _TIMESTAMP_FIELDS}
                    ),
                    "$min": {"created_at": now},
                    "$max": {"updated_at": now},
                },
                upsert=True,
            )
            for document_id, document in by_id.items()
        ]
        upserted = 0
        if operations:
            upserted = self._write_with_retry(operations)
        failpoint("anomalies.after_upsert")

        stale = self.collection.delete_many(
            {
                "ticker": ticker,
                "interval": interval,
                "timestamp": {"$gte": start, "$lt": end},
                "_id": {"$nin": list(by_id)},
            }
        )
        return {"written": len(operations), "new": upserted, "removed": stale.deleted_count}

    def _write_with_retry(self, operations: list[UpdateOne]) -> int:
        # Two writers upserting the same new _id can race: one insert wins and the other gets a
        # duplicate-key error. Repeating the upserts then matches the existing document.
        for attempt in range(3):
            try:
                return self.collection.bulk_write(operations, ordered=False).upserted_count
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if attempt == 2 or any(error.get("code") != _DUPLICATE_KEY for error in errors):
                    raise
        raise AssertionError("unreachable")
