"""What reaches MongoDB: plain BSON types only, and one document per bar however writers race.

- numpy and pandas values (int64, float32, bool_, NA, NaT, NaN) are converted on every write
  path; naive datetimes, infinities and types BSON cannot hold are refused naming the field.
- Every document the pipeline writes, read back as raw BSON bytes, holds only strings, doubles,
  32/64-bit integers, booleans, nulls, UTC datetimes, ObjectIds and arrays or documents of
  those, plus binary exactly where a column or a GridFS chunk is documented to be binary.
  No double anywhere is NaN: a missing number is stored as null.
- Writers racing to create the same anomaly, and one batch holding the same bar twice, leave one
  correct document and let no duplicate-key error escape.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import struct
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import dagster as dg
import numpy as np
import pandas as pd
import pymongo
import pytest
from bson import ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.storage.anomaly_store import AnomalyStore, anomaly_id
from anomaly_pipeline.storage.mongo import MongoResource, bson_safe
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets

# BSON element type codes (bsonspec.org) and the name each is reported by.
BSON_TYPE_NAMES = {
    0x01: "double",
    0x02: "string",
    0x03: "document",
    0x04: "array",
    0x05: "binary",
    0x07: "objectId",
    0x08: "bool",
    0x09: "datetime",
    0x0A: "null",
    0x10: "int32",
    0x12: "int64",
}
PLAIN_TYPES = {"double", "string", "objectId", "bool", "datetime", "null", "int32", "int64"}
# Binary on purpose: partition columns as little-endian float64 and their bar times as int64
# nanoseconds (storage/bar_store.py), and GridFS chunks of the model bytes.
BINARY_FLOAT_COLUMNS = ("price_bars.columns.", "bar_features.columns.")
BINARY_TIMESTAMPS = ("price_bars.timestamps", "bar_features.timestamps")
BINARY_OTHER = ("model_blobs.chunks.data",)


def raw_elements(
    raw: bytes, prefix: str = "", in_array: bool = False
) -> Iterator[tuple[str, str, bytes]]:
    """(path, BSON type name, value bytes) of every element of a raw BSON document.

    Paths read like ``features.rsi_14`` or ``timestamps[3]``. Read straight from the bytes, so no
    decoding step can turn one type into another on the way.
    """
    position, end = 4, len(raw) - 1
    while position < end:
        code = raw[position]
        key_end = raw.index(b"\x00", position + 1)
        key = raw[position + 1 : key_end].decode()
        position = key_end + 1
        path = f"{prefix}[{key}]" if in_array else (f"{prefix}.{key}" if prefix else key)
        name = BSON_TYPE_NAMES.get(code)
        assert name is not None, f"unexpected BSON type {code:#04x} at {path}"
        if name in ("document", "array"):
            (length,) = struct.unpack_from("<i", raw, position)
            yield path, name, b""
            yield from raw_elements(raw[position : position + length], path, name == "array")
            position += length
        elif name in ("string", "binary"):
            (length,) = struct.unpack_from("<i", raw, position)
            # A string ends in a NUL byte; a binary value has a subtype byte before its data.
            start = position + 4 if name == "string" else position + 5
            stop = start + length - 1 if name == "string" else start + length
            yield path, name, raw[start:stop]
            position = stop + 1 if name == "string" else stop
        else:
            size = FIXED_SIZES[name]
            yield path, name, raw[position : position + size]
            position += size


FIXED_SIZES = {
    "double": 8,
    "objectId": 12,
    "bool": 1,
    "datetime": 8,
    "null": 0,
    "int32": 4,
    "int64": 8,
}


def walk_database(database) -> dict[str, dict[str, list[bytes]]]:
    """Every element of every document of every collection: path -> type name -> value bytes.

    Array positions are folded into ``[]`` so that a path names a field, not an element.
    """
    found: dict[str, dict[str, list[bytes]]] = defaultdict(lambda: defaultdict(list))
    raw_codec = CodecOptions(document_class=RawBSONDocument)
    for name in database.list_collection_names():
        for document in database.get_collection(name, codec_options=raw_codec).find():
            for path, type_name, value in raw_elements(bytes(document.raw), name):
                found[re.sub(r"\[\d+\]", "[]", path)][type_name].append(value)
    return found


# --- bson_safe, value by value ---------------------------------------------------------------


def _raw_types(collection, document_id) -> dict[str, tuple[str, bytes]]:
    raw = collection.with_options(
        codec_options=CodecOptions(document_class=RawBSONDocument)
    ).find_one({"_id": document_id})
    return {path: (kind, value) for path, kind, value in raw_elements(bytes(raw.raw))}


def test_numpy_and_pandas_values_are_stored_as_plain_bson(database):
    fall_back = pd.Timestamp("2024-11-03 01:30:00.123456789").tz_localize(
        "America/New_York", ambiguous=False
    )
    document = {
        "_id": "values",
        "int64": np.int64(2**40),
        "int32": np.int32(7),
        "float32": np.float32(0.1),
        "bool": np.bool_(True),
        "missing": [pd.NA, pd.NaT, float("nan"), np.float64("nan"), np.datetime64("NaT")],
        "fall_back": fall_back,
        "bangkok": dt.datetime(2025, 1, 2, 9, 30, 0, 999999, tzinfo=ZoneInfo("Asia/Bangkok")),
        "day": dt.date(2024, 2, 29),
        "nested": {
            "floats": np.array([1.0, np.nan, 2.5], dtype=np.float32),
            "ints": np.array([3, 2**33], dtype=np.int64),
            "flags": np.array([True, False]),
            "mixed": [np.int64(1), {"deep": np.bool_(False), "stamp": fall_back}],
            "matrix": np.arange(4, dtype=np.int64).reshape(2, 2),
        },
    }
    database["scratch"].insert_one(bson_safe(document))
    stored = _raw_types(database["scratch"], "values")

    def double(path: str) -> float:
        kind, value = stored[path]
        assert kind == "double", path
        return struct.unpack("<d", value)[0]

    def integer(path: str, kind: str) -> int:
        assert stored[path][0] == kind, path
        return int.from_bytes(stored[path][1], "little", signed=True)

    def moment(path: str) -> dt.datetime:
        assert stored[path][0] == "datetime", path
        millis = int.from_bytes(stored[path][1], "little", signed=True)
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=millis)

    assert integer("int64", "int64") == 2**40
    assert integer("int32", "int32") == 7
    assert double("float32") == float(np.float32(0.1)) == 0.10000000149011612
    assert stored["bool"] == ("bool", b"\x01")
    assert [kind for path, (kind, _) in stored.items() if path.startswith("missing[")] == [
        "null"
    ] * 5
    # 01:30 on the second pass through the hour is 06:30 UTC; BSON keeps milliseconds.
    assert moment("fall_back") == dt.datetime(2024, 11, 3, 6, 30, 0, 123000, tzinfo=dt.UTC)
    assert moment("bangkok") == dt.datetime(2025, 1, 2, 2, 30, 0, 999000, tzinfo=dt.UTC)
    assert moment("day") == dt.datetime(2024, 2, 29, tzinfo=dt.UTC)
    assert [double(f"nested.floats[{i}]") for i in (0, 2)] == [1.0, 2.5]
    assert stored["nested.floats[1]"][0] == "null"
    assert integer("nested.ints[0]", "int32") == 3
    assert integer("nested.ints[1]", "int64") == 2**33
    assert [stored[f"nested.flags[{i}]"] for i in (0, 1)] == [("bool", b"\x01"), ("bool", b"\x00")]
    assert integer("nested.mixed[0]", "int32") == 1
    assert stored["nested.mixed[1].deep"] == ("bool", b"\x00")
    assert moment("nested.mixed[1].stamp") == moment("fall_back")
    assert [integer(f"nested.matrix[{i}][{j}]", "int32") for i in (0, 1) for j in (0, 1)] == [
        0,
        1,
        2,
        3,
    ]
    # Converting twice changes nothing.
    assert bson_safe(bson_safe(document)) == bson_safe(document)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"window": {"start": dt.datetime(2024, 1, 2, 9, 30)}},
            "refusing to store naive datetime 2024-01-02T09:30:00 at window.start: zone unknown",
        ),
        (
            {"bars": [pd.Timestamp("2024-01-02 09:30")]},
            "refusing to store naive datetime 2024-01-02T09:30:00 at bars[0]: zone unknown",
        ),
        (
            {"stamps": np.array(["2024-01-02T09:30"], dtype="datetime64[ns]")},
            "refusing to store naive datetime 2024-01-02T09:30:00 at stamps[0]: zone unknown",
        ),
        ({"score": float("inf")}, "refusing to store inf at score: not a finite number"),
        (
            {"features": {"rsi": np.array([50.0, -np.inf])}},
            "refusing to store -inf at features.rsi[1]: not a finite number",
        ),
        ({"count": 2**64}, "refusing to store 18446744073709551616 at count: BSON integers"),
        ({"age": pd.Timedelta(hours=1)}, "refusing to store a Timedelta at age: BSON has no"),
        ({"tickers": {"MSFT"}}, "refusing to store a set at tickers: BSON has no such type"),
    ],
)
def test_values_bson_cannot_hold_faithfully_are_refused_naming_the_field(value, message):
    with pytest.raises(ValueError) as refused:
        bson_safe(value)
    assert str(refused.value).startswith(message)


# --- Every document the pipeline writes ------------------------------------------------------

# One small ranged run per market and interval of the sample, enough rows to train each model.
SAMPLE_RANGES = {
    ("US", "1d"): ("MSFT|1986", "MSFT|1988"),
    ("SET", "15m"): ("SYNA.BK|2025-01", "SYNA.BK|2025-02"),
    ("SET", "1h"): ("SYNA.BK|2025-01", "SYNB.BK|2025-03"),
    ("CRYPTO", "15m"): ("SYNX-USD|2025-01", "SYNX-USD|2025-01"),
    ("CRYPTO", "1h"): ("SYNX-USD|2025-01", "SYNX-USD|2025-01"),
}
# Fields that may be null, each because the value is optional, never a number gone missing.
NULLABLE_FIELDS = {
    # A partition with bars has no reason to be empty.
    "price_bars.empty_reason",
    # Train on all history and up to now unless a window was asked for.
    "models.training_window.requested_start",
    "models.training_window.requested_end",
    # The audit record of a run: no error when it succeeded, no schedule or sensor name when a
    # person started it.
    "detection_runs.error",
    "detection_runs.trigger_name",
}


@pytest.fixture(scope="module")
def pipeline_database(mongo_uri, sample_universe) -> Iterator:
    """A database holding what the sample pipeline writes for a few partitions of each market."""
    mongo = MongoResource(uri=mongo_uri, database=f"test_walk_{uuid.uuid4().hex[:12]}")
    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(),
    }
    assets = {pair: pipeline_assets(sample_universe, *pair) for pair in SAMPLE_RANGES}
    with dg.instance_for_test() as instance:
        for pair, (first, last) in SAMPLE_RANGES.items():
            materialize_range(
                assets[pair], ("prices", "features"), first, last,
                resources=resources, instance=instance,
            )  # fmt: skip
        # One run trains every model: each is an unpartitioned asset.
        dg.materialize(
            [stage["model"] for stage in assets.values()], resources=resources, instance=instance
        )
        for pair, (first, last) in SAMPLE_RANGES.items():
            materialize_range(
                assets[pair], ("anomalies",), first, last, resources=resources, instance=instance
            )
    database = mongo.get_database()
    yield database
    database.client.drop_database(mongo.database)


@pytest.fixture(scope="module")
def stored_elements(pipeline_database) -> dict[str, dict[str, list[bytes]]]:
    return walk_database(pipeline_database)


def test_every_stored_value_is_a_plain_bson_type(pipeline_database, stored_elements):
    found = stored_elements
    collections = {path.split(".")[0] for path in found}
    assert {"price_bars", "bar_features", "models", "anomalies", "model_blobs"} <= collections
    assert pipeline_database["anomalies"].count_documents({}) > 0
    assert pipeline_database["models"].count_documents({}) == len(SAMPLE_RANGES)

    wrong = {
        path: sorted(kinds)
        for path, kinds in found.items()
        if set(kinds) - PLAIN_TYPES - {"document", "array"}
        and not (set(kinds) == {"binary"} and _binary_on_purpose(path))
    }
    assert wrong == {}


def _binary_on_purpose(path: str) -> bool:
    return (
        path.startswith(BINARY_FLOAT_COLUMNS)
        or path in BINARY_TIMESTAMPS
        or path.endswith(BINARY_OTHER)
    )


def test_no_number_is_nan_and_nulls_are_only_optional_fields(pipeline_database, stored_elements):
    found = stored_elements
    nan_doubles = {
        path
        for path, kinds in found.items()
        for value in kinds.get("double", [])
        if math.isnan(struct.unpack("<d", value)[0])
    }
    assert nan_doubles == set()

    # Binary columns hold float64 numbers: none NaN or infinite either.
    for path, kinds in found.items():
        if path.startswith(BINARY_FLOAT_COLUMNS):
            for value in kinds["binary"]:
                assert np.isfinite(np.frombuffer(value, dtype="<f8")).all(), path
        if path in BINARY_TIMESTAMPS:
            for value in kinds["binary"]:
                stamps = np.frombuffer(value, dtype="<i8")
                assert (np.diff(stamps) > 0).all(), path

    null_paths = {path for path, kinds in found.items() if "null" in kinds}
    assert null_paths <= NULLABLE_FIELDS, null_paths - NULLABLE_FIELDS
    # Nothing numeric is ever null: scores, thresholds, prices and features are all present.
    for path in ("anomalies.anomaly_score", "anomalies.threshold", "anomalies.close"):
        assert set(found[path]) == {"double"}, path
    assert {
        k for p, kinds in found.items() if p.startswith("anomalies.features.") for k in kinds
    } == {"double"}


def test_datetimes_are_utc_instants_in_the_data_range(pipeline_database, stored_elements):
    found = stored_elements
    first = dt.datetime(1986, 1, 1, tzinfo=dt.UTC)
    latest = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    for path, kinds in found.items():
        for value in kinds.get("datetime", []):
            millis = int.from_bytes(value, "little", signed=True)
            moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=millis)
            assert first <= moment <= latest, (path, moment)
    # An anomaly's timestamp is the bar start its _id names, to the second.
    for anomaly in pipeline_database["anomalies"].find():
        assert anomaly["_id"] == anomaly_id(
            anomaly["ticker"], anomaly["interval"], pd.Timestamp(anomaly["timestamp"])
        )


def test_gridfs_file_metadata_is_plain_bson(pipeline_database, stored_elements):
    found = stored_elements
    files = {
        path: set(kinds) for path, kinds in found.items() if path.startswith("model_blobs.files")
    }
    assert files == {
        "model_blobs.files._id": {"objectId"},
        "model_blobs.files.length": {"int64"},
        "model_blobs.files.chunkSize": {"int32"},
        "model_blobs.files.uploadDate": {"datetime"},
        "model_blobs.files.filename": {"string"},
    }
    assert set(found["models.blob_id"]) == {"objectId"}


# --- Racing writers and repeated bars -----------------------------------------------------------

WRITERS = 8
ROUNDS = 20


def _anomaly(ticker: str, stamp: pd.Timestamp, writer: int) -> dict:
    return {
        "_id": anomaly_id(ticker, "1h", stamp),
        "ticker": ticker,
        "interval": "1h",
        "market": "CRYPTO",
        "timestamp": stamp,
        "close": 100.0 + writer,
        "anomaly_score": 0.6 + writer / 100,
        "features": {"log_return_1": float(writer)},
        "detection_run_id": f"writer-{writer}",
        "partition_key": f"{ticker}|2025-01",
    }


def test_writers_racing_to_create_the_same_anomaly_leave_one_whole_document(mongo_uri, mongo):
    window_start = pd.Timestamp("2025-01-01", tz="UTC")
    window_end = pd.Timestamp("2025-02-01", tz="UTC")
    barrier = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        # A client of its own per writer: separate connections, so the upserts really race.
        client = pymongo.MongoClient(mongo_uri, tz_aware=True)
        store = AnomalyStore(client[mongo.database])
        try:
            # Each round every writer upserts one bar nobody has stored yet, plus the earlier ones.
            for round_number in range(ROUNDS):
                documents = [
                    _anomaly("SYNX-USD", window_start + pd.Timedelta(hours=hour), writer)
                    for hour in range(round_number + 1)
                ]
                barrier.wait(timeout=60)
                store.replace_window("SYNX-USD", "1h", window_start, window_end, documents)
        except BaseException as exc:  # collected so the test fails with the writer's error
            errors.append(exc)
            barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    stored = list(mongo.get_database()["anomalies"].find(sort=[("timestamp", 1)]))
    assert [d["_id"] for d in stored] == [
        anomaly_id("SYNX-USD", "1h", window_start + pd.Timedelta(hours=h)) for h in range(ROUNDS)
    ]
    for document in stored:
        # Whole documents of one writer, never fields of two.
        writer = int(document["detection_run_id"].removeprefix("writer-"))
        expected = _anomaly("SYNX-USD", pd.Timestamp(document["timestamp"]), writer)
        assert {key: document[key] for key in expected} == expected
        assert document["created_at"] <= document["updated_at"]


def test_one_batch_holding_a_bar_twice_stores_the_later_one(database):
    store = AnomalyStore(database)
    stamp = pd.Timestamp("2025-01-06 03:00", tz="UTC")
    first, second = _anomaly("SYNX-USD", stamp, 1), _anomaly("SYNX-USD", stamp, 2)
    # The same bar once more, its time given in Bangkok: the same _id.
    third = _anomaly("SYNX-USD", stamp.tz_convert("Asia/Bangkok"), 3)
    assert first["_id"] == second["_id"] == third["_id"]

    counts = store.replace_window(
        "SYNX-USD",
        "1h",
        pd.Timestamp("2025-01-01", tz="UTC"),
        pd.Timestamp("2025-02-01", tz="UTC"),
        [first, second, third],
    )
    assert counts == {"written": 1, "new": 1, "removed": 0}
    stored = list(database["anomalies"].find())
    assert len(stored) == 1
    assert stored[0]["detection_run_id"] == "writer-3"
    assert stored[0]["anomaly_score"] == 0.63
    assert stored[0]["close"] == 103.0
    assert stored[0]["timestamp"] == dt.datetime(2025, 1, 6, 3, tzinfo=dt.UTC)


def test_rewriting_a_bar_keeps_its_first_created_at(database):
    store = AnomalyStore(database)
    stamp = pd.Timestamp("2025-01-06 03:00", tz="UTC")
    window = (pd.Timestamp("2025-01-01", tz="UTC"), pd.Timestamp("2025-02-01", tz="UTC"))
    store.replace_window("SYNX-USD", "1h", *window, [_anomaly("SYNX-USD", stamp, 1)])
    created = database["anomalies"].find_one()["created_at"]
    store.replace_window("SYNX-USD", "1h", *window, [_anomaly("SYNX-USD", stamp, 2)])
    stored = database["anomalies"].find_one()
    assert stored["created_at"] == created
    assert stored["updated_at"] >= created
    assert stored["detection_run_id"] == "writer-2"
    assert isinstance(stored["_id"], str) and not isinstance(stored["_id"], ObjectId)
