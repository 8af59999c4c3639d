"""The detection sensor under the real Dagster daemon: changed bars in, a detection run out.

Starts ``dagster-daemon run`` on the project's workspace, pointed at the test database, after
SET 1h bars were ingested and a model trained, and waits for the daemon's sensor tick to launch
the detection run and the run to clear every pending window.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.instance import local_instance
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets, train

REPOSITORY = Path(__file__).resolve().parents[1]
# Loading the code location, the first tick and a run in subprocesses take a while on a
# loaded machine; this is how long to wait for all of it, not a speed expectation.
WAIT_SECONDS = 600


@pytest.mark.slow
def test_the_daemon_launches_detection_for_changed_bars_once(
    sample_universe, resources, database, mongo, mongo_uri, monkeypatch, tmp_path
):
    monkeypatch.setenv("MONGODB_URI", mongo_uri)
    monkeypatch.setenv("ANOMALY_PIPELINE_DATABASE", mongo.database)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("ANOMALY_PIPELINE_PRICE_SOURCE", raising=False)
    instance = local_instance()

    assets = pipeline_assets(sample_universe, "SET", "1h")
    materialize_range(
        assets,
        ("prices", "features"),
        "SYNA.BK|2025-01",
        "SYNC.BK|2025-03",
        resources=resources,
        instance=instance,
    )
    train(assets, resources=resources, instance=instance)
    state = DetectionState(database)
    assert state.collection.count_documents({"needs_detection": "SET"}) == 3

    with open(tmp_path / "daemon.log", "wb") as daemon_log:
        daemon = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-daemon"),
                "run",
                "-w",
                str(REPOSITORY / "workspace.yaml"),
            ],
            cwd=tmp_path,
            env=os.environ.copy(),
            stdout=daemon_log,
            stderr=subprocess.STDOUT,
            # Its own process group: stopping it must also stop the runs it launched.
            start_new_session=True,
        )
        try:
            runs = _wait_for_detection_run(instance)
            # At least one more tick: nothing else may be launched for the same change.
            time.sleep(90)
            runs = instance.get_runs(dg.RunsFilter(tags={SENSOR_NAME_TAG: "detect_set_sensor"}))
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()

    assert len(runs) == 1, (tmp_path / "daemon.log").read_text()[-3000:]
    run = runs[0]
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert run.job_name == "detect_set_1h"
    assert run.tags["dagster/asset_partition_range_start"] == "SYNA.BK|2025-01"
    assert run.tags["dagster/asset_partition_range_end"] == "SYNC.BK|2025-03"
    assert run.tags[RUN_KEY_TAG].startswith("1h:SYNA.BK|2025-01..SYNC.BK|2025-03:")
    assert state.collection.count_documents({"needs_detection": {"$exists": True}}) == 0
    for ticker in ("SYNA.BK", "SYNB.BK", "SYNC.BK"):
        assert state.get(ticker, "1h")["pending"] == {}
    anomalies = list(database["anomalies"].find())
    assert anomalies
    assert {a["detection_run_id"] for a in anomalies} == {run.run_id}
    assert {a["trigger"] for a in anomalies} == {"sensor"}


def _wait_for_detection_run(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        runs = instance.get_runs(dg.RunsFilter(tags={SENSOR_NAME_TAG: "detect_set_sensor"}))
        if runs and runs[0].is_finished:
            return runs
        time.sleep(5)
    return []
