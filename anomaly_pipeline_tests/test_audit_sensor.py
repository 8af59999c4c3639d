"""The failed-run audit sensor, evaluated against real Dagster instances holding failed runs.

One test runs the sensor through Dagster's own sensor daemon code while MongoDB is down and
again once a server answers on the same port, to show that a failure from an outage is audited
exactly once and that failed ticks keep the cursor where it was.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import pymongo
import pytest
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from dagster._core.test_utils import freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.sensor import execute_sensor_iteration

from anomaly_pipeline.assets import build_pipeline_assets
from anomaly_pipeline.audit import AuditTrail, FailedRunTarget
from anomaly_pipeline.audit_sensor import SENSOR_NAME, build_failed_run_audit_sensor
from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.prices.frames import PriceDataError
from anomaly_pipeline.prices.source import BarWindow, FetchedBars, PriceSource
from anomaly_pipeline.storage.mongo import MongoResource

RANGE = ("SYNY-USD|2025-01", "SYNY-USD|2025-02")
RANGE_TAGS = {ASSET_PARTITION_RANGE_START_TAG: RANGE[0], ASSET_PARTITION_RANGE_END_TAG: RANGE[1]}
UTC = dt.timezone.utc
WINDOW_BOUNDS = [
    (dt.datetime(2025, 1, 1, tzinfo=UTC), dt.datetime(2025, 2, 1, tzinfo=UTC)),
    (dt.datetime(2025, 2, 1, tzinfo=UTC), dt.datetime(2025, 3, 1, tzinfo=UTC)),
]
# Read by anomaly_pipeline_tests/audit_sensor_location.py when the test loads it.
LOCATION_URI_ENV_VAR = "AUDIT_SENSOR_TEST_MONGODB_URI"
LOCATION_DATABASE_ENV_VAR = "AUDIT_SENSOR_TEST_DATABASE"


class FeedDownPriceSource(PriceSource):
    """A price source whose feed is down: every fetch raises."""

    def fetch(self, windows: Sequence[BarWindow]) -> list[FetchedBars | PriceDataError]:
        raise ConnectionError("price feed down for maintenance")


def _crypto_1h(universe):
    return dict(
        zip(
            ("prices", "features", "model", "anomalies"),
            build_pipeline_assets(universe.markets["CRYPTO"], "1h", universe),
            strict=True,
        )
    )


def _last_failure_storage_id(instance: dg.DagsterInstance) -> str:
    records = instance.fetch_run_status_changes(dg.DagsterEventType.RUN_FAILURE, limit=1).records
    return str(records[0].storage_id)


def test_failed_run_is_audited_with_its_partitions_and_error(
    sample_universe, mongo, database, instance
):
    assets = _crypto_1h(sample_universe)
    failed = dg.materialize(
        [assets["prices"], assets["features"]],
        resources={"mongo": mongo, "price_source": FeedDownPriceSource()},
        instance=instance,
        tags=RANGE_TAGS,
        raise_on_error=False,
    )
    assert not failed.success
    run_record = instance.get_run_record_by_id(failed.run_id)

    sensor = build_failed_run_audit_sensor(sample_universe)
    tick = sensor.evaluate_tick(
        dg.build_sensor_context(instance=instance, resources={"mongo": mongo})
    )
    assert tick.cursor == _last_failure_storage_id(instance)
    assert tick.skip_message.startswith("audited 1 failed run(s), 1 new document(s)")

    (audit,) = database["detection_runs"].find()
    assert audit["_id"] == f"{failed.run_id}|1h|SYNY-USD"
    assert audit["run_id"] == failed.run_id
    assert audit["status"] == "failure"
    assert audit["trigger"] == "manual"
    assert (audit["market"], audit["interval"], audit["ticker"]) == ("CRYPTO", "1h", "SYNY-USD")
    assert audit["stages"] == ["prices", "features"]
    assert audit["partition_keys"] == list(RANGE)
    assert [(p["window_start"], p["window_end"]) for p in audit["partitions"]] == WINDOW_BOUNDS
    assert (audit["window_start"], audit["window_end"]) == (
        WINDOW_BOUNDS[0][0],
        WINDOW_BOUNDS[1][1],
    )
    # The prices asset words the failure; the source's own error must be in it.
    assert "ConnectionError: price feed down for maintenance" in audit["error"]["message"]
    assert audit["error"]["failed_steps"] == [
        {"step": "crypto__1h__prices", "message": audit["error"]["message"]}
    ]
    assert "crypto__1h__prices" in audit["error"]["run_message"]
    for unknown in ("bars_in", "warmup_excluded", "bars_scored", "anomalies_found", "model_hash"):
        assert audit[unknown] is None
    started = dt.datetime.fromtimestamp(run_record.start_time, tz=dt.timezone.utc)
    ended = dt.datetime.fromtimestamp(run_record.end_time, tz=dt.timezone.utc)
    assert abs((audit["run_started_at"] - started).total_seconds()) < 0.001
    assert abs((audit["finished_at"] - ended).total_seconds()) < 0.001
    assert audit["duration_seconds"] == pytest.approx((ended - started).total_seconds(), abs=0.002)

    # The next tick starts after that failure: nothing new, nothing written twice.
    again = sensor.evaluate_tick(
        dg.build_sensor_context(instance=instance, cursor=tick.cursor, resources={"mongo": mongo})
    )
    assert again.skip_message == "no runs failed since the last tick"
    assert database["detection_runs"].count_documents({}) == 1


def test_failed_model_run_is_audited_per_market(sample_universe, mongo, database, instance):
    assets = _crypto_1h(sample_universe)
    failed = dg.materialize(
        [assets["model"]],
        resources={"model_store": ModelStoreResource(mongo=mongo)},
        instance=instance,
        raise_on_error=False,
    )
    assert not failed.success

    sensor = build_failed_run_audit_sensor(sample_universe)
    sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources={"mongo": mongo}))

    (audit,) = database["detection_runs"].find()
    assert audit["_id"] == f"{failed.run_id}|1h|market:CRYPTO"
    assert (audit["ticker"], audit["stages"], audit["partition_keys"]) == (None, ["model"], [])
    assert audit["error"]["message"].startswith("CRYPTO 1h model: only 0 feature rows")


def test_runs_outside_the_pipeline_are_not_audited(sample_universe, mongo, database, instance):
    @dg.asset
    def unrelated() -> None:
        raise RuntimeError("not a pipeline asset")

    assert not dg.materialize([unrelated], instance=instance, raise_on_error=False).success
    sensor = build_failed_run_audit_sensor(sample_universe)
    tick = sensor.evaluate_tick(
        dg.build_sensor_context(instance=instance, resources={"mongo": mongo})
    )
    assert "skipped 1 run(s) outside the pipeline" in tick.skip_message
    assert tick.cursor == _last_failure_storage_id(instance)
    assert database["detection_runs"].count_documents({}) == 0


def test_failure_document_never_replaces_a_success_of_the_same_run(sample_universe, database):
    market = sample_universe.markets["CRYPTO"]
    trail = AuditTrail(database)
    success = {"_id": "run-1|1h|SYNX-USD", "run_id": "run-1", "status": "success"}
    database["detection_runs"].insert_one(success)

    written = trail.record_failure(
        run=dg.DagsterRun(job_name="job", run_id="run-1", tags={}),
        trigger="manual",
        run_started_at=None,
        finished_at=dt.datetime.now(dt.timezone.utc),
        targets=[
            FailedRunTarget(market=market, interval="1h", ticker="SYNX-USD", stages=("anomalies",)),
            FailedRunTarget(market=market, interval="1h", ticker="SYNY-USD", stages=("anomalies",)),
        ],
        run_error="step crypto__1h__prices failed",
    )
    assert written == 1
    assert database["detection_runs"].find_one({"_id": "run-1|1h|SYNX-USD"}) == success
    assert database["detection_runs"].find_one({"_id": "run-1|1h|SYNY-USD"})["status"] == "failure"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(port: int, storage: Path) -> subprocess.Popen:
    executable = Path(sys.executable).parent / "secantusd-py"
    command = [
        str(executable) if executable.exists() else shutil.which("secantusd-py"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--storage-path", str(storage),
        "--standalone",
        "--log-level", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=500)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.admin.command("ping")
            client.close()
            return process
        except pymongo.errors.PyMongoError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.2)


def _stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_failure_during_an_outage_is_audited_once_the_store_is_back(
    sample_universe, instance, tmp_path, monkeypatch
):
    port = _free_port()
    database_name = "audit_outage"
    # The run and the sensor use the same server but separate clients (distinct URIs), so the
    # run's short server-selection timeout does not carry over to the sensor.
    run_mongo = MongoResource(
        uri=f"mongodb://127.0.0.1:{port}/?directConnection=true",
        database=database_name,
        server_selection_timeout_ms=300,
    )
    monkeypatch.setenv(
        LOCATION_URI_ENV_VAR,
        f"mongodb://127.0.0.1:{port}/?directConnection=true&connectTimeoutMS=1000",
    )
    monkeypatch.setenv(LOCATION_DATABASE_ENV_VAR, database_name)

    assets = _crypto_1h(sample_universe)
    failed = dg.materialize(
        [assets["prices"], assets["features"]],
        resources={"mongo": run_mongo, "price_source": FeedDownPriceSource()},
        instance=instance,
        tags=RANGE_TAGS,
        raise_on_error=False,
    )
    assert not failed.success

    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(
            module_name="anomaly_pipeline_tests.audit_sensor_location", attribute="defs"
        )
    )
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as workspace:
        location = next(
            iter(workspace.create_request_context().get_code_location_entries().values())
        ).code_location
        sensor = next(iter(location.get_repositories().values())).get_sensor(SENSOR_NAME)

        def tick(at: dt.datetime):
            with freeze_time(at):
                list(
                    execute_sensor_iteration(
                        workspace,
                        logging.getLogger("audit-sensor-test"),
                        threadpool_executor=None,
                        submit_threadpool_executor=None,
                    )
                )
            latest = instance.get_ticks(sensor.get_remote_origin_id(), sensor.selector_id)[0]
            state = instance.get_instigator_state(sensor.get_remote_origin_id(), sensor.selector_id)
            return latest, state.instigator_data.cursor

        now = dt.datetime.now(dt.timezone.utc)
        down_tick, down_cursor = tick(now)
        assert down_tick.status == TickStatus.FAILURE
        # Dagster wraps the sensor's error; the reason is in the chain it records.
        assert "could not reach MongoDB to audit 1 failed run(s)" in down_tick.error.to_string()
        assert down_cursor is None

        server = _start_server(port, tmp_path / "mongodb")
        try:
            # The sensor runs at most once a minute: each tick is evaluated a minute later.
            up_tick, up_cursor = tick(now + dt.timedelta(seconds=61))
            assert up_tick.status == TickStatus.SKIPPED
            assert up_tick.skip_reason.startswith("audited 1 failed run(s), 1 new document(s)")
            assert up_cursor == _last_failure_storage_id(instance)

            client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", tz_aware=True)
            (audit,) = client[database_name]["detection_runs"].find()
            assert audit["run_id"] == failed.run_id
            assert audit["status"] == "failure"
            assert audit["partition_keys"] == list(RANGE)
            message = audit["error"]["message"]
            assert "ServerSelectionTimeoutError" in message
            assert f"127.0.0.1:{port}: [Errno 111] Connection refused" in message
            assert audit["error"]["failed_steps"][0]["step"] == "crypto__1h__prices"

            later_tick, later_cursor = tick(now + dt.timedelta(seconds=122))
            assert later_tick.skip_reason == "no runs failed since the last tick"
            assert later_cursor == up_cursor
            assert client[database_name]["detection_runs"].count_documents({}) == 1
            client.close()
        finally:
            _stop_server(server)
