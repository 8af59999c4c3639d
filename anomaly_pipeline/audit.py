"""The audit trail: one ``detection_runs`` document per Dagster run and ticker × interval.

A reviewer looking at an anomaly asks which run found it, with which model and from which data.
The anomaly document names its run, trigger, model version and hash; the run's audit document
adds what the run covered and what it saw: partitions, bars in, warm-up bars left out, bars
scored, anomalies found, the model, the runs that stored the prices and features it read, how
long it took, and how it ended.

Two writers fill the collection:

- the anomalies asset writes a ``success`` document per ticker at the end of its step;
- the failed-run sensor (``anomaly_pipeline.audit_sensor``) writes a ``failure`` document per
  ticker × interval a failed run targeted, once the store can be reached.

Document ``_id``s are ``<run id>|<interval>|<ticker>`` (``market:<NAME>`` instead of a ticker
for unpartitioned assets such as the model), so writing again never duplicates. A failure
document never replaces a success document of the same run: the detection of that ticker did
finish even if another step of the run failed.

Documents expire through a TTL index on ``finished_at``: 30 days unless
``ANOMALY_PIPELINE_AUDIT_TTL_DAYS`` says otherwise. Anomaly documents keep their own run id,
trigger, model version and hash, so they stay traceable after their audit document expires.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd
from pymongo import ReplaceOne, UpdateOne
from pymongo.database import Database
from pymongo.errors import OperationFailure

from anomaly_pipeline.modeling.detection import WindowDetection
from anomaly_pipeline.modeling.model_store import ServedModel
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.storage.bar_store import partition_document_id
from anomaly_pipeline.storage.mongo import BAR_FEATURES, DETECTION_RUNS, PRICE_BARS, bson_safe
from anomaly_pipeline.universe import Market

AUDIT_TTL_ENV_VAR = "ANOMALY_PIPELINE_AUDIT_TTL_DAYS"
DEFAULT_AUDIT_TTL_DAYS = 30.0
TTL_INDEX_NAME = "expire_after_ttl"
SUCCESS = "success"
FAILURE = "failure"

_INDEX_OPTIONS_CONFLICT = 85
_INDEX_KEY_SPECS_CONFLICT = 86
# Retention (seconds) whose indexes this process has ensured, per client and database.
_ENSURED: dict[tuple[int, str], int] = {}
_ENSURED_LOCK = threading.Lock()


def audit_ttl_days() -> float:
    """How many days audit documents are kept, from ``ANOMALY_PIPELINE_AUDIT_TTL_DAYS``."""
    raw = os.environ.get(AUDIT_TTL_ENV_VAR)
    if raw is None or not raw.strip():
        return DEFAULT_AUDIT_TTL_DAYS
    try:
        days = float(raw)
    except ValueError:
        raise ValueError(f"{AUDIT_TTL_ENV_VAR}={raw!r} is not a number of days") from None
    if not days > 0:
        raise ValueError(f"{AUDIT_TTL_ENV_VAR}={raw!r}: the retention must be more than 0 days")
    return days


def audit_document_id(run_id: str, interval: str, ticker: str | None, market: str) -> str:
    return f"{run_id}|{interval}|{ticker if ticker is not None else f'market:{market}'}"


def ensure_audit_indexes(database: Database, ttl_days: float) -> None:
    """Create the collection's indexes; move the TTL index to ``ttl_days`` if it differs."""
    collection = database[DETECTION_RUNS]
    collection.create_index([("run_id", 1)], name="run")
    collection.create_index(
        [("ticker", 1), ("interval", 1), ("finished_at", -1)], name="ticker_interval_finished"
    )
    seconds = ttl_seconds(ttl_days)
    existing = collection.index_information().get(TTL_INDEX_NAME)
    if existing is None:
        collection.create_index(
            [("finished_at", 1)], name=TTL_INDEX_NAME, expireAfterSeconds=seconds
        )
        return
    if existing.get("expireAfterSeconds") == seconds:
        return
    try:
        # collMod changes the age in place, so the collection is never without expiry.
        database.command(
            {
                "collMod": DETECTION_RUNS,
                "index": {"name": TTL_INDEX_NAME, "expireAfterSeconds": seconds},
            }
        )
    except OperationFailure:
        collection.drop_index(TTL_INDEX_NAME)
        collection.create_index(
            [("finished_at", 1)], name=TTL_INDEX_NAME, expireAfterSeconds=seconds
        )


def ttl_seconds(ttl_days: float) -> int:
    return max(1, round(ttl_days * 86_400))


@dataclass(frozen=True)
class FailedRunTarget:
    """What a failed run meant to produce for one ticker (or a whole market) and interval."""

    market: Market
    interval: str
    ticker: str | None
    stages: tuple[str, ...]
    windows: tuple[BarWindow, ...] = ()
    failed_steps: tuple[Mapping[str, str], ...] = field(default_factory=tuple)


class AuditTrail:
    """Reads and writes the ``detection_runs`` collection."""

    def __init__(self, database: Database, ttl_days: float | None = None):
        self.database = database
        self.collection = database[DETECTION_RUNS]
        self.ttl_days = audit_ttl_days() if ttl_days is None else ttl_days
        # Index checks cost round trips; do them again only when the retention changes.
        key = (id(database.client), database.name)
        seconds = ttl_seconds(self.ttl_days)
        with _ENSURED_LOCK:
            ensured = _ENSURED.get(key) == seconds
        if not ensured:
            ensure_audit_indexes(database, self.ttl_days)
            with _ENSURED_LOCK:
                _ENSURED[key] = seconds

    def record_detection(
        self,
        *,
        run: dg.DagsterRun,
        trigger: str,
        run_started_at: dt.datetime | None,
        market: Market,
        interval: str,
        model: ServedModel,
        detections: Sequence[WindowDetection],
        detection_seconds: float,
    ) -> list[dict]:
        """Write one success document per ticker of ``detections``; returns the documents."""
        finished_at = pd.Timestamp.now(tz="UTC").to_pydatetime()
        windows = [detection.window for detection in detections]
        prices = self._partition_documents(
            PRICE_BARS, windows, {"bar_count": 1, "run_id": 1, "source": 1}
        )
        features = self._partition_documents(
            BAR_FEATURES, windows, {"warmup_excluded": 1, "run_id": 1}
        )

        by_ticker: dict[str, list[WindowDetection]] = {}
        for detection in detections:
            by_ticker.setdefault(detection.window.ticker, []).append(detection)

        documents: list[dict] = []
        for ticker, ticker_detections in by_ticker.items():
            partitions = []
            for detection in ticker_detections:
                document_id = _partition_id(detection.window)
                price_document = prices.get(document_id, {})
                feature_document = features.get(document_id, {})
                partitions.append(
                    {
                        **_window_fields(detection.window),
                        "bars_in": price_document.get("bar_count"),
                        "warmup_excluded": feature_document.get("warmup_excluded"),
                        "bars_scored": detection.scored_bars,
                        "anomalies": len(detection.documents),
                        "prices_run_id": price_document.get("run_id"),
                        "price_source": price_document.get("source"),
                        "features_run_id": feature_document.get("run_id"),
                    }
                )
            document = {
                **_run_fields(run, trigger, market, interval, ticker),
                "status": SUCCESS,
                "stages": ["anomalies"],
                **_coverage_fields(partitions),
                "bars_in": _total(partitions, "bars_in"),
                "warmup_excluded": _total(partitions, "warmup_excluded"),
                "bars_scored": _total(partitions, "bars_scored"),
                "anomalies_found": _total(partitions, "anomalies"),
                "model_version": model.version,
                "model_hash": model.sha256,
                "model_threshold": model.threshold,
                **_timing_fields(run_started_at, finished_at),
                "detection_seconds": round(detection_seconds, 3),
                "error": None,
            }
            documents.append(document)
        if documents:
            # One round trip for every ticker of the step (a ranged run can hold hundreds).
            self.collection.bulk_write(
                [
                    ReplaceOne({"_id": document["_id"]}, bson_safe(document), upsert=True)
                    for document in documents
                ],
                ordered=False,
            )
        return documents

    def record_failure(
        self,
        *,
        run: dg.DagsterRun,
        trigger: str,
        run_started_at: dt.datetime | None,
        finished_at: dt.datetime,
        targets: Iterable[FailedRunTarget],
        run_error: str | None,
    ) -> int:
        """Write a failure document per target that has none yet; returns how many were new."""
        operations = []
        for target in targets:
            step_errors = [step["message"] for step in target.failed_steps]
            partitions = [_window_fields(window) for window in target.windows]
            document = {
                **_run_fields(run, trigger, target.market, target.interval, target.ticker),
                "status": FAILURE,
                "stages": list(target.stages),
                **_coverage_fields(partitions),
                "bars_in": None,
                "warmup_excluded": None,
                "bars_scored": None,
                "anomalies_found": None,
                "model_version": None,
                "model_hash": None,
                "model_threshold": None,
                **_timing_fields(run_started_at, finished_at),
                "detection_seconds": None,
                "error": {
                    "message": step_errors[0] if step_errors else run_error,
                    "failed_steps": [dict(step) for step in target.failed_steps],
                    "run_message": run_error,
                },
            }
            # $setOnInsert: a success document of the same run and ticker stays as it is, and a
            # sensor tick that repeats after a crash changes nothing.
            operations.append(
                UpdateOne(
                    {"_id": document["_id"]}, {"$setOnInsert": bson_safe(document)}, upsert=True
                )
            )
        if not operations:
            return 0
        return self.collection.bulk_write(operations, ordered=False).upserted_count

    def documents_for_run(self, run_id: str) -> list[dict]:
        return list(self.collection.find({"run_id": run_id}, sort=[("interval", 1), ("ticker", 1)]))

    def run_ids_with_prefix(self, prefix: str, limit: int = 10) -> list[str]:
        query = {"run_id": {"$regex": "^" + re.escape(prefix)}}
        return sorted(self.collection.distinct("run_id", query))[:limit]

    def _partition_documents(
        self, collection: str, windows: Sequence[BarWindow], projection: dict
    ) -> dict[str, dict]:
        ids = [_partition_id(window) for window in windows]
        if not ids:
            return {}
        cursor = self.database[collection].find({"_id": {"$in": ids}}, projection)
        return {document["_id"]: document for document in cursor}


def run_started_at(instance: dg.DagsterInstance, run_id: str) -> dt.datetime | None:
    """When the run started, from the instance's run record (None before it started)."""
    record = instance.get_run_record_by_id(run_id)
    if record is None or record.start_time is None:
        return None
    return dt.datetime.fromtimestamp(record.start_time, tz=dt.timezone.utc)


def _partition_id(window: BarWindow) -> str:
    return partition_document_id(window.ticker, window.interval, window.start)


def _run_fields(
    run: dg.DagsterRun, trigger: str, market: Market, interval: str, ticker: str | None
) -> dict:
    return {
        "_id": audit_document_id(run.run_id, interval, ticker, market.name),
        "run_id": run.run_id,
        "dagster_job": run.job_name,
        "trigger": trigger,
        "trigger_name": _trigger_name(run.tags),
        "market": market.name,
        "interval": interval,
        "ticker": ticker,
    }


def _trigger_name(tags: Mapping[str, str]) -> str | None:
    """The backfill id, schedule or sensor name behind a run, when it has one."""
    for tag in ("dagster/backfill", "dagster/schedule_name", "dagster/sensor_name"):
        if tag in tags:
            return tags[tag]
    return None


def _window_fields(window: BarWindow) -> dict:
    return {
        "partition_key": str(window.partition_key),
        "window_start": window.start,
        "window_end": window.end,
    }


def _coverage_fields(partitions: Sequence[Mapping]) -> dict:
    return {
        "partition_keys": [partition["partition_key"] for partition in partitions],
        "partitions": list(partitions),
        "window_start": min((p["window_start"] for p in partitions), default=None),
        "window_end": max((p["window_end"] for p in partitions), default=None),
    }


def _timing_fields(started_at: dt.datetime | None, finished_at: dt.datetime) -> dict:
    return {
        "run_started_at": started_at,
        "finished_at": finished_at,
        "duration_seconds": (
            round((finished_at - started_at).total_seconds(), 3) if started_at else None
        ),
    }


def _total(partitions: Sequence[Mapping], field_name: str) -> int | None:
    values = [partition[field_name] for partition in partitions]
    # An unknown part makes the total unknown rather than silently smaller.
    return None if any(value is None for value in values) else int(sum(values))
