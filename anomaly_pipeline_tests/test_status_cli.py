"""``anomaly-pipeline status`` against a real database and a real Dagster instance.

The schedule and sensor states are set the way the UI and ``dagster schedule start`` set them:
through the instance, for the schedule and sensor of a loaded code location.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster._core.test_utils import in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._daemon.types import DaemonHeartbeat

from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.cli import main
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.instance import local_instance
from anomaly_pipeline.modeling.model_store import ModelStore
from anomaly_pipeline.modeling.training import train_model
from anomaly_pipeline.partitions import bar_partitions, bar_windows
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.storage.bar_store import BarStore

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def pipeline_environment(monkeypatch, tmp_path, mongo_uri, mongo):
    monkeypatch.setenv("MONGODB_URI", mongo_uri)
    monkeypatch.setenv("ANOMALY_PIPELINE_DATABASE", mongo.database)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("ANOMALY_PIPELINE_PRICE_SOURCE", raising=False)
    return mongo.get_database()


def _csv_bars(ticker: str) -> pd.DataFrame:
    frame = pd.read_csv(SAMPLE_DATA_DIR / f"{ticker}_1h.csv")
    frame.index = pd.DatetimeIndex(
        pd.to_datetime(frame.pop("timestamp"), utc=True), name="timestamp"
    )
    return frame.astype("float64")


def test_status_reports_models_freshness_and_automation(
    pipeline_environment, sample_universe, mongo_uri, capsys
):
    database = pipeline_environment
    market = sample_universe.markets["SET"]
    partitions = bar_partitions(market, "1h", sample_universe.history_start["1h"])

    # SET 1h: a model, SYNA.BK ingested for three months and scored for two.
    bars = _csv_bars("SYNA.BK")
    noise = np.random.default_rng(1).normal(size=(600, len(FEATURE_NAMES)))
    trained = train_model(pd.DataFrame(noise, columns=list(FEATURE_NAMES)))
    record, _ = ModelStore(database).save(
        "SET", "1h", trained, training_window={}, tickers=["SYNA.BK"], params={}, run_id="test"
    )
    state = DetectionState(database)
    windows = bar_windows(partitions, [f"SYNA.BK|2025-0{m}" for m in (1, 2, 3)], market, "1h")
    for window in windows:
        inside = bars[(bars.index >= window.start) & (bars.index < window.end)]
        BarStore(database).write_bars(window, inside, run_id="t", source="test", empty_reason=None)
        state.record_ingestion(window, inside, run_id="t")
    for window in windows[:2]:
        inside = bars[(bars.index >= window.start) & (bars.index < window.end)]
        state.record_detection(
            window,
            scored_bars=inside,
            model_version=record["_id"],
            model_hash=record["sha256"],
            anomalies=0,
            run_id="t",
        )
    last_february_bar = bars[bars.index < windows[1].end].index[-1]

    # One schedule started and one sensor stopped, as an operator would; the daemon beating.
    instance = local_instance()
    origin = LoadableTargetOrigin(
        module_name="anomaly_pipeline.definitions", working_directory=str(REPOSITORY)
    )
    with in_process_test_workspace(instance, origin) as workspace:
        (location,) = workspace.code_locations
        (repository,) = location.get_repositories().values()
        instance.start_schedule(repository.get_schedule("ingest_set_1h_schedule"))
        sensor = repository.get_sensor("detect_us_sensor")
        instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
    instance.add_daemon_heartbeat(
        DaemonHeartbeat(timestamp=time.time(), daemon_type="SENSOR", daemon_id="d", errors=[])
    )

    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["database"]["reachable"] is True
    assert report["database"]["where"] == (f"MongoDB from MONGODB_URI, database '{database.name}'")
    models = {(m["market"], m["interval"]): m for m in report["models"]}
    assert models[("SET", "1h")]["version"] == "SET-1h-1"
    assert models[("SET", "1h")]["sha256"] == record["sha256"]
    assert models[("US", "1d")]["version"] is None

    rows = {(r["market"], r["interval"]): r for r in report["freshness"]}
    set_1h = rows[("SET", "1h")]
    assert (set_1h["tickers"], set_1h["tracked"]) == (3, 1)
    assert set_1h["last_bar_ingested"] == bars.index[-1].strftime("%Y-%m-%dT%H:%M:%SZ")
    assert set_1h["last_bar_scored"] == last_february_bar.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert set_1h["detection_lag"] == (bars.index[-1] - last_february_bar).total_seconds()
    assert set_1h["pending_partitions"] == 1
    assert rows[("US", "1d")]["tracked"] == 0

    automation = {(a["kind"], a["name"]): a for a in report["automation"]}
    assert automation[("schedule", "ingest_set_1h_schedule")]["running"] is True
    assert automation[("schedule", "ingest_set_1h_schedule")]["decided_by"] == "set"
    assert automation[("schedule", "ingest_us_1d_schedule")]["running"] is False
    assert automation[("schedule", "ingest_us_1d_schedule")]["decided_by"] == "default"
    assert automation[("sensor", "detect_us_sensor")]["running"] is False
    assert automation[("sensor", "detect_us_sensor")]["decided_by"] == "set"
    assert automation[("sensor", "detect_set_sensor")]["running"] is True
    assert len(automation) == 11
    assert report["daemon"]["running"] is True

    # The text form says the same, and never shows the connection string.
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert mongo_uri not in text and "127.0.0.1" not in text
    assert "  SET      1h   SET-1h-1" in text
    states = {
        line.split()[1]: " ".join(line.split()[2:])
        for line in text.splitlines()
        if line.startswith(("  schedule ", "  sensor "))
    }
    assert states["ingest_set_1h_schedule"].startswith("running 3 11-17 * * 1,2,3,4,5")
    assert states["ingest_us_1d_schedule"].startswith("stopped (default) 30 16 * * 1,2,3,4,5")
    assert states["detect_us_sensor"] == "stopped"
    assert states["detect_set_sensor"] == "running (default)"


def test_status_without_a_local_server_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MONGODB_URI", raising=False)
    monkeypatch.setenv("ANOMALY_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))

    assert main(["status", "--json"]) == 1  # unreachable store: non-zero for monitoring
    report = json.loads(capsys.readouterr().out)
    assert report["database"] == {
        "reachable": False,
        "where": (
            f"local server, data in {tmp_path / 'home' / 'mongodb'}, database 'anomaly_pipeline'"
        ),
        "reason": "the local server is not running; start it with `anomaly-pipeline db start`",
    }
    assert report["models"] == [] and report["freshness"] == []
    # It only looked: no server was started under the home.
    assert not (tmp_path / "home" / "mongodb-server.json").exists()
    assert report["daemon"] == {"running": False, "last_heartbeat": None}
