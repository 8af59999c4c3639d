"""Detection state written by the real prices asset, and the sensor's fast path at scale.

Expected bar counts and timestamps come from the sample CSV files read here with pandas; the
3,000-document fast path runs against the real local server and a real Dagster instance.
"""

from __future__ import annotations

import copy
import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from anomaly_pipeline.automation.sensors import detection_sensor_name
from anomaly_pipeline.automation.state import DetectionState, bars_content_hash
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.model_store import ModelStore
from anomaly_pipeline.modeling.training import train_model
from anomaly_pipeline.partitions import bar_partitions, bar_windows
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.universe import load_universe
from anomaly_pipeline_tests.automation_runs import automation_definitions, evaluate_sensor
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets

BANGKOK = "Asia/Bangkok"
WINDOWS = ("2025-01", "2025-02", "2025-03")


def _csv_bars(directory, ticker: str, interval: str) -> pd.DataFrame:
    frame = pd.read_csv(directory / f"{ticker}_{interval}.csv")
    frame.index = pd.DatetimeIndex(
        pd.to_datetime(frame.pop("timestamp"), utc=True), name="timestamp"
    )
    return frame.astype("float64")


def _bangkok_month(bars: pd.DataFrame, month: str) -> pd.DataFrame:
    start = pd.Timestamp(f"{month}-01", tz=BANGKOK)
    end = start + pd.offsets.MonthBegin(1)
    return bars[(bars.index >= start) & (bars.index < end)]


def _ingest(sample_universe, resources, instance, first: str, last: str):
    assets = pipeline_assets(sample_universe, "SET", "1h")
    return materialize_range(
        assets, ("prices",), first, last, resources=resources, instance=instance
    )


def _bars_changed_metadata(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {
        str(event.partition): event.materialization.metadata["bars_changed"].value
        for event in result.get_asset_materialization_events()
    }


def test_ingestion_records_each_window_and_identical_bars_create_no_work(
    sample_universe, resources, instance, database, tmp_path
):
    csv = _csv_bars(SAMPLE_DATA_DIR, "SYNA.BK", "1h")
    first = _ingest(sample_universe, resources, instance, "SYNA.BK|2025-01", "SYNA.BK|2025-03")
    state = DetectionState(database).get("SYNA.BK", "1h")

    assert (state["ticker"], state["interval"], state["market"]) == ("SYNA.BK", "1h", "SET")
    assert state["bars_seen"] == len(csv) == 434
    assert state["last_bar_ingested"] == csv.index[-1].to_pydatetime()
    assert state["needs_detection"] == "SET"
    assert set(state["pending"]) == set(WINDOWS)
    for month in WINDOWS:
        expected = _bangkok_month(csv, month)
        entry = state["windows"][month]
        assert entry["partition_key"] == f"SYNA.BK|{month}"
        assert entry["bars"] == len(expected)
        assert entry["changes"] == 1
        # What was fetched, what is stored and what is recorded hash alike.
        stored = BarStore(database).read_bars(
            "SYNA.BK", "1h", expected.index[0], expected.index[-1] + pd.Timedelta(hours=1)
        )
        assert entry["content_hash"] == bars_content_hash(expected) == bars_content_hash(stored)
        assert state["pending"][month]["partition_key"] == f"SYNA.BK|{month}"
    assert sum(state["windows"][m]["bars"] for m in WINDOWS) == state["bars_seen"]
    assert _bars_changed_metadata(first) == {f"SYNA.BK|{m}": True for m in WINDOWS}

    again = _ingest(sample_universe, resources, instance, "SYNA.BK|2025-01", "SYNA.BK|2025-03")
    assert _bars_changed_metadata(again) == {f"SYNA.BK|{m}": False for m in WINDOWS}
    assert DetectionState(database).get("SYNA.BK", "1h") == state

    # One revised volume in February: only February changes, with a new token.
    changed_dir = tmp_path / "files"
    shutil.copytree(SAMPLE_DATA_DIR, changed_dir)
    revised = pd.read_csv(changed_dir / "SYNA.BK_1h.csv")
    row = revised.index[revised["timestamp"] == "2025-02-10T05:00:00Z"][0]
    revised.loc[row, "volume"] += 1000
    revised.to_csv(changed_dir / "SYNA.BK_1h.csv", index=False)
    resources = {**resources, "price_source": FilesPriceSource(directory=str(changed_dir))}

    third = _ingest(sample_universe, resources, instance, "SYNA.BK|2025-01", "SYNA.BK|2025-03")
    assert _bars_changed_metadata(third) == {
        "SYNA.BK|2025-01": False,
        "SYNA.BK|2025-02": True,
        "SYNA.BK|2025-03": False,
    }
    after = DetectionState(database).get("SYNA.BK", "1h")
    assert after["windows"]["2025-02"]["changes"] == 2
    assert after["windows"]["2025-02"]["content_hash"] == bars_content_hash(
        _bangkok_month(_csv_bars(changed_dir, "SYNA.BK", "1h"), "2025-02")
    )
    assert (
        after["windows"]["2025-02"]["content_hash"] != state["windows"]["2025-02"]["content_hash"]
    )
    assert after["pending"]["2025-02"]["token"] != state["pending"]["2025-02"]["token"]
    for month in ("2025-01", "2025-03"):
        assert after["windows"][month] == state["windows"][month]
        assert after["pending"][month] == state["pending"][month]
    assert after["bars_seen"] == 434


# ---------------------------------------------------------------------------------------------
# The fast path at scale: 1,000 tickers × 3 intervals.

BIG_TICKERS = [f"T{i:04d}" for i in range(1000)]
BIG_INTERVALS = ("15m", "1h", "1d")


@pytest.fixture
def big_universe(tmp_path):
    path = tmp_path / "universe.yaml"
    path.write_text(
        "history_start:\n  15m: '2025-01-01'\n  1h: '2025-01-01'\n  1d: '2020-01-01'\n"
        "markets:\n  BIG:\n    timezone: UTC\n    calendar: null\n"
        f"    intervals: [{', '.join(BIG_INTERVALS)}]\n"
        f"    tickers: [{', '.join(BIG_TICKERS)}]\n"
    )
    return load_universe(path)


def _synthetic_bars(start: pd.Timestamp, count: int, step: pd.Timedelta, seed: int):
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, count)))
    index = pd.DatetimeIndex([start + i * step for i in range(count)], name="timestamp")
    return pd.DataFrame(
        {
            "open": close,
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "volume": rng.integers(1_000, 5_000, count).astype("float64"),
        },
        index=index,
    )


def _seed_state_documents(universe, database) -> dict[str, dict]:
    """One real state document per interval, written by the real code, cloned to every ticker.

    Returns the current model record per interval.
    """
    market = universe.markets["BIG"]
    state = DetectionState(database)
    models = {}
    for n, interval in enumerate(BIG_INTERVALS):
        rng = np.random.default_rng(n)
        trained = train_model(
            pd.DataFrame(rng.normal(size=(600, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))
        )
        record, _ = ModelStore(database).save(
            "BIG", interval, trained, training_window={}, tickers=[], params={}, run_id="seed"
        )
        models[interval] = record

        partitions = bar_partitions(market, interval, universe.history_start[interval])
        window = bar_windows(partitions, [f"T0000|{_window_of(interval)}"], market, interval)[0]
        bars = _synthetic_bars(window.start, 50, pd.Timedelta(minutes=15), seed=n)
        state.record_ingestion(window, bars, run_id="seed")
        state.record_detection(
            window,
            scored_bars=bars,
            model_version=record["_id"],
            model_hash=record["sha256"],
            anomalies=0,
            run_id="seed",
        )
        template = state.get("T0000", interval)
        assert template["pending"] == {} and "needs_detection" not in template
        clones = []
        for ticker in BIG_TICKERS[1:]:
            clone = copy.deepcopy(template)
            clone["_id"], clone["ticker"] = f"{ticker}|{interval}", ticker
            clone["latest_scored_partition"] = f"{ticker}|{_window_of(interval)}"
            for entry in clone["windows"].values():
                entry["partition_key"] = entry["partition_key"].replace("T0000", ticker)
            clones.append(clone)
        state.collection.insert_many(clones)
    assert state.collection.count_documents({}) == 3000
    return models


def _window_of(interval: str) -> str:
    return "2025" if interval == "1d" else "2025-06"


def _write_counts(database) -> tuple[int, int, int]:
    counters = database.command("serverStatus")["opcounters"]
    return counters["insert"], counters["update"], counters["delete"]


def test_fast_path_over_3000_documents_requests_exactly_what_changed(
    big_universe, mongo, resources, instance
):
    database = mongo.get_database()
    _seed_state_documents(big_universe, database)
    definitions = automation_definitions(big_universe, resources)
    name = detection_sensor_name(big_universe.markets["BIG"])

    # First look: every ticker was scored by the current model, nothing is pending.
    first = evaluate_sensor(definitions, name, instance, None)
    assert first.run_requests == []
    assert first.cursor is not None

    # Nothing new: no run, no write to the database, the cursor unchanged.
    writes_before = _write_counts(database)
    idle = evaluate_sensor(definitions, name, instance, first.cursor)
    assert idle.run_requests == []
    assert idle.skip_message == "nothing new for BIG"
    assert idle.cursor == first.cursor
    assert _write_counts(database) == writes_before

    # New bars for one ticker and interval: exactly that partition is requested.
    market = big_universe.markets["BIG"]
    partitions = bar_partitions(market, "1h", big_universe.history_start["1h"])
    window = bar_windows(partitions, ["T0500|2025-06"], market, "1h")[0]
    bars = _synthetic_bars(window.start, 60, pd.Timedelta(hours=1), seed=99)
    assert DetectionState(database).record_ingestion(window, bars, run_id="new bars") is True

    changed = evaluate_sensor(definitions, name, instance, idle.cursor)
    assert len(changed.run_requests) == 1
    request = changed.run_requests[0]
    assert request.job_name == "detect_big_1h"
    assert request.partition_key == "T0500|2025-06"
    assert request.asset_selection is None

    # The same tick evaluated again asks for the same run key, which Dagster launches once.
    replay = evaluate_sensor(definitions, name, instance, idle.cursor)
    assert [r.run_key for r in replay.run_requests] == [request.run_key]

    # The next tick knows the request was made.
    after = evaluate_sensor(definitions, name, instance, changed.cursor)
    assert after.run_requests == []
