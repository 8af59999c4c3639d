"""Runs killed with SIGKILL at chosen points, then run again, leave no gap and no duplicate.

Each run goes through ``dg.materialize`` in a child process that kills itself at a failpoint
(``ANOMALY_PIPELINE_KILL_AT``), exactly like a machine losing power there. The reference is the
same history ingested and detected without interruption in another database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import pytest

from anomaly_pipeline.automation.sensors import detection_sensor_name
from anomaly_pipeline.automation.state import bars_content_hash
from anomaly_pipeline.failpoints import KILL_AT_ENV_VAR
from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import PACKAGED_UNIVERSE, load_universe
from anomaly_pipeline_tests.automation_runs import (
    automation_definitions,
    comparable_anomalies,
    evaluate_sensor,
    requested_partitions,
)
from anomaly_pipeline_tests.pipeline_runs import pipeline_assets, train

FIRST, LAST = "SYNA.BK|2025-01", "SYNC.BK|2025-03"
ALL_PARTITIONS = sorted(
    f"{t}|{w}" for t in ("SYNA.BK", "SYNB.BK", "SYNC.BK") for w in ("2025-01", "2025-02", "2025-03")
)
INGESTION = ("prices", "features")
DETECTION = ("features", "anomalies")
REPOSITORY = Path(__file__).resolve().parents[1]


def run_child(mongo: MongoResource, stages, kill_at: str | None = None) -> int:
    """Materialize ``stages`` over FIRST..LAST in a child process; its return code."""
    spec = {
        "uri": mongo.uri,
        "database": mongo.database,
        "market": "SET",
        "interval": "1h",
        "stages": list(stages),
        "first": FIRST,
        "last": LAST,
    }
    environment = {k: v for k, v in os.environ.items() if k != KILL_AT_ENV_VAR}
    if kill_at:
        environment[KILL_AT_ENV_VAR] = kill_at
    child = subprocess.run(
        [sys.executable, "-m", "anomaly_pipeline_tests.crash_runner", json.dumps(spec)],
        env=environment,
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if child.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed with {child.returncode}:\n{child.stderr[-3000:]}")
    return child.returncode


@pytest.fixture(scope="module")
def reference(mongo_uri):
    """Anomalies and state of the uninterrupted history."""
    mongo = MongoResource(uri=mongo_uri, database=f"test_{uuid.uuid4().hex[:12]}")
    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(),
    }
    assert run_child(mongo, INGESTION) == 0
    with dg.instance_for_test() as instance:
        train(
            pipeline_assets(load_universe(PACKAGED_UNIVERSE), "SET", "1h"),
            resources=resources,
            instance=instance,
        )
    assert run_child(mongo, DETECTION) == 0
    database = mongo.get_database()
    yield (
        comparable_anomalies(database),
        {d["_id"]: d for d in database["detection_metadata"].find()},
    )
    database.client.drop_database(mongo.database)


def assert_state_matches_storage(database) -> None:
    """Every state document agrees with the stored bars and anomalies; nothing is pending."""
    bar_store = BarStore(database)
    documents = list(database["detection_metadata"].find())
    assert sorted(d["_id"] for d in documents) == ["SYNA.BK|1h", "SYNB.BK|1h", "SYNC.BK|1h"]
    for document in documents:
        assert document["pending"] == {}
        assert "needs_detection" not in document
        stored = {
            d["partition_key"]: d
            for d in database["price_bars"].find({"ticker": document["ticker"]})
        }
        assert sorted(e["partition_key"] for e in document["windows"].values()) == sorted(stored)
        assert document["bars_seen"] == sum(d["bar_count"] for d in stored.values())
        for entry in document["windows"].values():
            bars = bar_store.read_bars(document["ticker"], "1h", entry["start"], entry["end"])
            assert entry["content_hash"] == entry["scored_content_hash"] == bars_content_hash(bars)
            assert entry["bars"] == stored[entry["partition_key"]]["bar_count"]
            assert entry["anomalies"] == database["anomalies"].count_documents(
                {"partition_key": entry["partition_key"]}
            )


STATE_FIELDS = (
    "bars_seen",
    "last_bar_ingested",
    "last_bar_scored",
    "model_hash",
    "latest_scored_partition",
)


@pytest.mark.parametrize(
    "kill_at",
    [
        # Bars of the first window written, the state not yet told.
        "detection_state.before_ingestion_record",
        # Inside replacing the first window's anomalies: new ones upserted, stale not yet removed.
        "anomalies.after_upsert",
        # The first window's anomalies replaced, its pending mark not yet cleared.
        "detection_state.before_detection_record",
    ],
)
def test_a_killed_run_run_again_converges(
    kill_at, reference, sample_universe, resources, mongo, database, instance
):
    expected_anomalies, expected_state = reference
    definitions = automation_definitions(sample_universe, resources)
    sensor = detection_sensor_name(sample_universe.markets["SET"])

    if kill_at == "detection_state.before_ingestion_record":
        assert run_child(mongo, INGESTION, kill_at) == -signal.SIGKILL
        # It died after writing the first window's bars and before recording them.
        assert database["price_bars"].count_documents({}) == 1
        assert database["detection_metadata"].count_documents({}) == 0
    assert run_child(mongo, INGESTION) == 0
    train(pipeline_assets(sample_universe, "SET", "1h"), resources=resources, instance=instance)

    # No gap: every partition is waiting for detection, whatever the ingestion went through.
    tick = evaluate_sensor(definitions, sensor, instance, None)
    assert [requested_partitions(r, sample_universe, "SET", "1h") for r in tick.run_requests] == [
        ALL_PARTITIONS
    ]

    if kill_at != "detection_state.before_ingestion_record":
        assert run_child(mongo, DETECTION, kill_at) == -signal.SIGKILL
        pending = {
            key
            for d in database["detection_metadata"].find()
            for key in (e["partition_key"] for e in d["pending"].values())
        }
        assert pending == set(ALL_PARTITIONS)
    assert run_child(mongo, DETECTION) == 0

    assert comparable_anomalies(database) == expected_anomalies
    assert_state_matches_storage(database)
    for document in database["detection_metadata"].find():
        for field in STATE_FIELDS:
            assert document[field] == expected_state[document["_id"]][field], field
    assert evaluate_sensor(definitions, sensor, instance, tick.cursor).run_requests == []
