"""MongoDB access: the Dagster resource, collection names, indexes and BSON-safe values.

pymongo is the only client. Production points ``MONGODB_URI`` at a real MongoDB; without it the
resource starts (or finds) the local server under the pipeline home. Connection strings are
never logged or put in metadata: they may hold credentials.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pymongo
from bson.codec_options import CodecOptions
from pydantic import Field
from pymongo.database import Database

from anomaly_pipeline.settings import DEFAULT_DATABASE, pipeline_home
from anomaly_pipeline.storage.local_server import LocalMongoServer

PRICE_BARS = "price_bars"
BAR_FEATURES = "bar_features"
ANOMALIES = "anomalies"
MODELS = "models"
MODEL_BLOBS = "model_blobs"
DETECTION_RUNS = "detection_runs"
DETECTION_METADATA = "detection_metadata"
ANOMALY_VERIFICATIONS = "anomaly_verifications"

_CLIENTS: dict[tuple[int, str], pymongo.MongoClient] = {}
_INDEXED: set[tuple[int, str, str]] = set()
_LOCK = threading.Lock()


class MongoResource(dg.ConfigurableResource):
    """The MongoDB database that holds prices, features, models, anomalies and the audit trail."""

    uri: str | None = Field(
        default=None,
        description="MongoDB connection URI; when empty, the local server under `home` is used.",
    )
    database: str = DEFAULT_DATABASE
    home: str | None = Field(
        default=None, description="Pipeline home for the local server (default: current home)."
    )
    server_selection_timeout_ms: int = 10_000

    def get_database(self) -> Database:
        """The database, with indexes in place; clients are shared per process."""
        uri = self.resolved_uri()
        key = (os.getpid(), uri)
        with _LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                client = pymongo.MongoClient(
                    uri,
                    tz_aware=True,
                    tzinfo=dt.timezone.utc,
                    serverSelectionTimeoutMS=self.server_selection_timeout_ms,
                    appname="anomaly_pipeline",
                )
                _CLIENTS[key] = client
            database = client.get_database(
                self.database, codec_options=CodecOptions(tz_aware=True, tzinfo=dt.timezone.utc)
            )
            if (os.getpid(), uri, self.database) not in _INDEXED:
                ensure_indexes(database)
                _INDEXED.add((os.getpid(), uri, self.database))
        return database

    def resolved_uri(self) -> str:
        if self.uri:
            return self.uri
        home = Path(self.home) if self.home else pipeline_home()
        return LocalMongoServer(home).ensure_running()

    def describe_location(self) -> str:
        """Where the data is, safe to print: never the URI itself, which may hold credentials."""
        if self.uri:
            return f"MongoDB from MONGODB_URI, database {self.database!r}"
        home = Path(self.home) if self.home else pipeline_home()
        storage = LocalMongoServer(home).storage_path
        return f"local server, data in {storage}, database {self.database!r}"


def ensure_indexes(database: Database) -> None:
    """Create every index the pipeline relies on; safe to call again."""
    for collection in (PRICE_BARS, BAR_FEATURES):
        database[collection].create_index(
            [("ticker", 1), ("interval", 1), ("window_start", 1)], name="ticker_interval_window"
        )
    anomalies = database[ANOMALIES]
    anomalies.create_index([("ticker", 1), ("interval", 1), ("timestamp", 1)], name="bar")
    anomalies.create_index([("anomaly_score", -1)], name="score")
    anomalies.create_index([("partition_key", 1), ("interval", 1)], name="partition")
    anomalies.create_index([("model_hash", 1)], name="model_hash")
    anomalies.create_index([("detection_run_id", 1)], name="run")
    database[MODELS].create_index(
        [("market", 1), ("interval", 1), ("sequence", -1)],
        name="market_interval_sequence",
        unique=True,
    )
    database[MODELS].create_index([("sha256", 1)], name="sha256")


def bson_safe(value: Any) -> Any:
    """``value`` with numpy, pandas and float edge cases turned into plain BSON types.

    NaN, NaT and pandas NA become None (stored as null) on purpose: a missing value must read as
    missing, never as a number. Datetimes come out tz-aware in UTC.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(key): bson_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [bson_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return [bson_safe(item) for item in value.tolist()]
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return None if math.isnan(number) else number
    if isinstance(value, pd.Timestamp):
        return _utc_datetime(value.to_pydatetime())
    if isinstance(value, np.datetime64):
        return bson_safe(pd.Timestamp(value))
    if isinstance(value, dt.datetime):
        return _utc_datetime(value)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    return value


def _utc_datetime(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError(f"refusing to store naive datetime {moment.isoformat()}: zone unknown")
    # BSON dates hold milliseconds; truncate explicitly so what is read back equals what was meant.
    moment = moment.astimezone(dt.timezone.utc)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)
