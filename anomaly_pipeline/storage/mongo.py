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
from bson import ObjectId
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
        if isinstance(self.uri, dg.EnvVar):
            # Inside a run Dagster resolves the variable; outside (the CLI) this does.
            return self.uri.get_value()
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
    missing, never as a number. numpy integers, floats and booleans become Python ones; mappings,
    lists, tuples and arrays are converted element by element. Datetimes come out tz-aware in UTC,
    truncated to the milliseconds BSON holds. Refused with ValueError naming the field: naive
    datetimes (their zone is unknown), infinite numbers, integers beyond 64 bits and any other
    type (timedeltas, sets, objects), which would otherwise be stored as something else or fail
    inside pymongo with a message that names no field.
    """
    return _bson_value(value, "")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _bson_value(value: Any, path: str) -> Any:
    # bool before int (bool is an int); NaT before datetime (NaT is a datetime).
    if value is None or isinstance(value, (str, bool, ObjectId, bytes)):
        return value
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, Mapping):
        return {
            str(key): _bson_value(item, f"{path}.{key}" if path else str(key))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_bson_value(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _bson_array(value, path)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        number = int(value)
        if not _INT64_MIN <= number <= _INT64_MAX:
            raise ValueError(f"refusing to store {number}{_at(path)}: BSON integers hold 64 bits")
        return number
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return None
        if math.isinf(number):
            raise ValueError(f"refusing to store {number}{_at(path)}: not a finite number")
        return number
    if isinstance(value, (pd.Timestamp, np.datetime64)):
        moment = pd.Timestamp(value)
        if moment is pd.NaT:
            return None
        if moment.tzinfo is None:
            raise ValueError(_naive_message(moment, path))
        # Truncate in UTC: flooring wall time in a zone with DST can hit an ambiguous hour.
        return moment.tz_convert("UTC").floor("ms").to_pydatetime()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(_naive_message(value, path))
        return _utc_datetime(value)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    raise ValueError(
        f"refusing to store a {type(value).__name__}{_at(path)}: BSON has no such type; convert "
        "it to a number, string, list or UTC datetime first"
    )


def _bson_array(values: np.ndarray, path: str) -> Any:
    if values.ndim == 0:
        return _bson_value(values.item(), path)
    if values.ndim > 1:
        return [_bson_array(row, f"{path}[{i}]") for i, row in enumerate(values)]
    if values.dtype.kind == "f":
        # Whole-array checks first: feature and price arrays hold thousands of numbers.
        infinite = np.isinf(values)
        if infinite.any():
            first = int(np.flatnonzero(infinite)[0])
            raise ValueError(
                f"refusing to store {values[first]}{_at(f'{path}[{first}]')}: not a finite number"
            )
        return [None if math.isnan(number) else number for number in values.tolist()]
    if values.dtype.kind == "b":
        return values.tolist()
    # Integers, datetimes and objects one by one, so each gets the checks above.
    return [_bson_value(item, f"{path}[{i}]") for i, item in enumerate(values)]


def _naive_message(moment: dt.datetime, path: str) -> str:
    return f"refusing to store naive datetime {moment.isoformat()}{_at(path)}: zone unknown"


def _at(path: str) -> str:
    return f" at {path}" if path else ""


def _utc_datetime(moment: dt.datetime) -> dt.datetime:
    # BSON dates hold milliseconds; truncate explicitly so what is read back equals what was meant.
    moment = moment.astimezone(dt.timezone.utc)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)
