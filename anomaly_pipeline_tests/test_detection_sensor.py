"""The detection sensor against a real Dagster instance and a real MongoDB-wire server.

Runs are what the sensor requests, executed through the detection job; the sample SET 1h series
(three tickers, January to March 2025) is the data.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from dagster._core.storage.tags import RUN_KEY_TAG

from anomaly_pipeline.automation.sensors import cover_with_rectangles
from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.partitions import bar_partitions, bar_windows
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.storage.bar_store import BarStore, bars_from_document
from anomaly_pipeline.storage.mongo import PRICE_BARS
from anomaly_pipeline.universe import load_universe
from anomaly_pipeline_tests.automation_runs import (
    automation_definitions,
    evaluate_sensor,
    execute_request,
    requested_partitions,
)
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets, train

SENSOR = "detect_set_sensor"
TICKERS = ("SYNA.BK", "SYNB.BK", "SYNC.BK")
WINDOWS = ("2025-01", "2025-02", "2025-03")
ALL_PARTITIONS = sorted(f"{t}|{w}" for t in TICKERS for w in WINDOWS)


def _ingest(universe, resources, instance, first="SYNA.BK|2025-01", last="SYNC.BK|2025-03"):
    assets = pipeline_assets(universe, "SET", "1h")
    materialize_range(
        assets, ("prices", "features"), first, last, resources=resources, instance=instance
    )


def _run_all(definitions, result, instance):
    for request in result.run_requests:
        execute_request(definitions, request, instance)


@pytest.fixture
def detected(sample_universe, resources, instance, database):
    """SET 1h ingested, trained and detected through the sensor; yields the sensor's cursor."""
    definitions = automation_definitions(sample_universe, resources)
    _ingest(sample_universe, resources, instance)

    before_model = evaluate_sensor(definitions, SENSOR, instance, None)
    # Without a model nothing can be scored: the windows wait, and are not marked as requested.
    assert before_model.run_requests == []
    assert before_model.skip_message == "9 pending window(s) wait for a first model of 1h"

    train(pipeline_assets(sample_universe, "SET", "1h"), resources=resources, instance=instance)
    first = evaluate_sensor(definitions, SENSOR, instance, before_model.cursor)
    # All three tickers × three windows form one rectangle: one ranged run.
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    assert request.job_name == "detect_set_1h"
    assert request.tags["dagster/asset_partition_range_start"] == "SYNA.BK|2025-01"
    assert request.tags["dagster/asset_partition_range_end"] == "SYNC.BK|2025-03"
    assert sorted(requested_partitions(request, sample_universe, "SET", "1h")) == ALL_PARTITIONS
    _run_all(definitions, first, instance)
    return definitions, first.cursor


def test_detection_clears_pending_and_records_what_was_scored(detected, database, instance):
    definitions, cursor = detected
    state = DetectionState(database)
    anomalies = database["anomalies"]
    for ticker in TICKERS:
        document = state.get(ticker, "1h")
        assert document["pending"] == {}
        assert "needs_detection" not in document
        assert document["model_version"] == "SET-1h-1"
        assert document["latest_scored_partition"] == f"{ticker}|2025-03"
        stored_last_bar = max(
            bars_from_document(d).index[-1] for d in database[PRICE_BARS].find({"ticker": ticker})
        )
        assert document["last_bar_scored"] == document["last_bar_ingested"] == stored_last_bar
        for window in WINDOWS:
            entry = document["windows"][window]
            assert entry["scored_content_hash"] == entry["content_hash"]
            assert entry["scored_model_version"] == "SET-1h-1"
            assert entry["anomalies"] == anomalies.count_documents(
                {"partition_key": f"{ticker}|{window}"}
            )
    assert anomalies.count_documents({}) > 0

    idle = evaluate_sensor(definitions, SENSOR, instance, cursor)
    assert idle.run_requests == []
    assert '"requested":[]' in idle.cursor


def test_changed_bars_request_their_window_and_the_next_one(
    detected, sample_universe, resources, instance, database, tmp_path
):
    definitions, cursor = detected
    files = tmp_path / "files"
    shutil.copytree(SAMPLE_DATA_DIR, files)
    revised = pd.read_csv(files / "SYNB.BK_1h.csv")
    row = revised.index[revised["timestamp"] == "2025-02-13T04:00:00Z"][0]
    revised.loc[row, "volume"] += 5000
    revised.to_csv(files / "SYNB.BK_1h.csv", index=False)
    resources = {**resources, "price_source": FilesPriceSource(directory=str(files))}
    definitions = automation_definitions(sample_universe, resources)

    # The whole universe is fetched again, as the ingestion schedule would.
    _ingest(sample_universe, resources, instance)
    result = evaluate_sensor(definitions, SENSOR, instance, cursor)

    # February changed, and March's features read February's last bars.
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert requested_partitions(request, sample_universe, "SET", "1h") == [
        "SYNB.BK|2025-02",
        "SYNB.BK|2025-03",
    ]
    reasons = {
        key: entry["reason"]
        for key, entry in DetectionState(database).get("SYNB.BK", "1h")["pending"].items()
    }
    assert reasons == {"2025-02": "bars changed", "2025-03": "previous window changed"}

    # A tick evaluated twice asks for the same run key; the cursor makes the next tick quiet.
    assert evaluate_sensor(definitions, SENSOR, instance, cursor).run_requests[0].run_key == (
        request.run_key
    )
    assert evaluate_sensor(definitions, SENSOR, instance, result.cursor).run_requests == []

    _run_all(definitions, result, instance)
    assert DetectionState(database).get("SYNB.BK", "1h")["pending"] == {}
    assert evaluate_sensor(definitions, SENSOR, instance, result.cursor).run_requests == []


def test_a_new_model_redetects_only_each_tickers_latest_window(
    detected, sample_universe, resources, instance, database
):
    definitions, cursor = detected
    january_before = {
        d["_id"]: d
        for d in database["anomalies"].find(
            {"timestamp": {"$lt": pd.Timestamp("2025-02-01", tz="UTC")}}
        )
    }
    train(
        pipeline_assets(sample_universe, "SET", "1h"),
        resources=resources,
        instance=instance,
        run_config={"ops": {"set__1h__model": {"config": {"flag_rate": 0.03}}}},
    )
    assert database["models"].find_one({"_id": "SET-1h-2"}) is not None

    result = evaluate_sensor(definitions, SENSOR, instance, cursor)
    assert len(result.run_requests) == 1
    assert requested_partitions(result.run_requests[0], sample_universe, "SET", "1h") == [
        "SYNA.BK|2025-03",
        "SYNB.BK|2025-03",
        "SYNC.BK|2025-03",
    ]
    _run_all(definitions, result, instance)

    state = DetectionState(database)
    new_hash = database["models"].find_one({"_id": "SET-1h-2"})["sha256"]
    for ticker in TICKERS:
        document = state.get(ticker, "1h")
        assert (document["model_version"], document["model_hash"]) == ("SET-1h-2", new_hash)
        assert document["windows"]["2025-03"]["scored_model_version"] == "SET-1h-2"
        assert document["windows"]["2025-01"]["scored_model_version"] == "SET-1h-1"
        assert document["pending"] == {}
    march = list(database["anomalies"].find({"partition_key": {"$regex": r"\|2025-03$"}}))
    assert march and {d["model_version"] for d in march} == {"SET-1h-2"}
    # Older windows keep the findings of the model that scored them.
    january_after = {
        d["_id"]: d
        for d in database["anomalies"].find(
            {"timestamp": {"$lt": pd.Timestamp("2025-02-01", tz="UTC")}}
        )
    }
    assert january_after == january_before

    assert evaluate_sensor(definitions, SENSOR, instance, result.cursor).run_requests == []


def test_universe_changes_need_no_code_change(
    detected, sample_universe, resources, instance, database, tmp_path
):
    _, cursor = detected
    # SYND.BK joins (its file is a copy of SYNA.BK's), SYNB.BK and SYNC.BK leave.
    files = tmp_path / "files"
    shutil.copytree(SAMPLE_DATA_DIR, files)
    shutil.copy(files / "SYNA.BK_1h.csv", files / "SYND.BK_1h.csv")
    universe_file = tmp_path / "universe.yaml"
    universe_file.write_text(
        "history_start:\n  1h: '2025-01-01'\n"
        "markets:\n  SET:\n    timezone: Asia/Bangkok\n    calendar: XBKK\n"
        "    intervals: [1h]\n    tickers: [SYNA.BK, SYND.BK]\n"
    )
    universe = load_universe(universe_file)
    resources = {**resources, "price_source": FilesPriceSource(directory=str(files))}
    definitions = automation_definitions(universe, resources)
    removed_anomalies = database["anomalies"].count_documents({"ticker": "SYNC.BK"})

    # Changed bars are recorded for the departed SYNC.BK (by a run of the older deployment).
    market = sample_universe.markets["SET"]
    partitions = bar_partitions(market, "1h", sample_universe.history_start["1h"])
    window = bar_windows(partitions, ["SYNC.BK|2025-03"], market, "1h")[0]
    bars = BarStore(database).read_bars("SYNC.BK", "1h", window.start, window.end)
    bars.loc[bars.index[5], "volume"] += 100
    assert DetectionState(database).record_ingestion(window, bars, run_id="older deployment")
    departed = DetectionState(database).get("SYNC.BK", "1h")
    assert departed["needs_detection"] == "SET"

    _ingest(universe, resources, instance, "SYND.BK|2025-01", "SYND.BK|2025-03")

    result = evaluate_sensor(definitions, SENSOR, instance, cursor)
    assert len(result.run_requests) == 1
    assert requested_partitions(result.run_requests[0], universe, "SET", "1h") == [
        "SYND.BK|2025-01",
        "SYND.BK|2025-02",
        "SYND.BK|2025-03",
    ]
    _run_all(definitions, result, instance)

    # SYND.BK holds what SYNA.BK holds: the same bars, the same model, the same findings.
    synd = {
        d["timestamp"]: d["anomaly_score"]
        for d in database["anomalies"].find({"ticker": "SYND.BK"})
    }
    syna = {
        d["timestamp"]: d["anomaly_score"]
        for d in database["anomalies"].find({"ticker": "SYNA.BK"})
    }
    assert synd == syna
    # The departed ticker keeps its history and findings, and nothing is launched for it.
    assert database["anomalies"].count_documents({"ticker": "SYNC.BK"}) == removed_anomalies
    assert DetectionState(database).get("SYNC.BK", "1h") == departed
    assert evaluate_sensor(definitions, SENSOR, instance, result.cursor).run_requests == []


def test_a_failed_detection_run_is_requested_again(sample_universe, resources, instance, database):
    definitions = automation_definitions(sample_universe, resources)
    _ingest(sample_universe, resources, instance)
    train(pipeline_assets(sample_universe, "SET", "1h"), resources=resources, instance=instance)

    # A corrupt stored bar makes the features step fail for the whole ranged run. Written
    # straight to the bar store, as a faulty writer would: the detection state does not change.
    market = sample_universe.markets["SET"]
    partitions = bar_partitions(market, "1h", sample_universe.history_start["1h"])
    window = bar_windows(partitions, ["SYNB.BK|2025-02"], market, "1h")[0]
    bar_store = BarStore(database)
    good = bar_store.read_bars("SYNB.BK", "1h", window.start, window.end)
    corrupt = good.copy()
    corrupt.iloc[3, corrupt.columns.get_loc("close")] = -1.0
    bar_store.write_bars(window, corrupt, run_id="faulty", source="test", empty_reason=None)

    first = evaluate_sensor(definitions, SENSOR, instance, None)
    request = first.run_requests[0]
    failed = execute_request(
        definitions,
        request,
        instance,
        extra_tags={RUN_KEY_TAG: request.run_key},
        raise_on_error=False,
    )
    assert not failed.success
    assert database["anomalies"].count_documents({}) == 0

    retry = evaluate_sensor(definitions, SENSOR, instance, first.cursor)
    assert len(retry.run_requests) == 1
    assert retry.run_requests[0].run_key == f"{request.run_key}:attempt-2"
    assert (
        sorted(requested_partitions(retry.run_requests[0], sample_universe, "SET", "1h"))
        == ALL_PARTITIONS
    )

    bar_store.write_bars(window, good, run_id="repaired", source="test", empty_reason=None)
    execute_request(
        definitions,
        retry.run_requests[0],
        instance,
        extra_tags={RUN_KEY_TAG: retry.run_requests[0].run_key},
    )
    assert (
        database["detection_metadata"].count_documents({"needs_detection": {"$exists": True}}) == 0
    )
    assert evaluate_sensor(definitions, SENSOR, instance, retry.cursor).run_requests == []


def test_rectangles_cover_exactly_the_cells_and_respect_the_run_size():
    cells = {(t, w) for t in range(10) for w in range(3)} | {(4, 7), (5, 8)} | {(0, 5), (2, 5)}
    rectangles = cover_with_rectangles(cells, max_partitions=12)
    covered = [
        (t, w)
        for r in rectangles
        for t in range(r.first_ticker, r.last_ticker + 1)
        for w in range(r.first_window, r.last_window + 1)
    ]
    assert sorted(covered) == sorted(cells)
    assert all(r.size <= 12 for r in rectangles)
    # 10 tickers × 3 windows in pieces of at most 12 (10 × 1 each), then the four single cells.
    assert [(r.first_ticker, r.last_ticker, r.first_window, r.last_window) for r in rectangles] == [
        (0, 9, 0, 0),
        (0, 9, 1, 1),
        (0, 9, 2, 2),
        (0, 0, 5, 5),
        (2, 2, 5, 5),
        (4, 4, 7, 7),
        (5, 5, 8, 8),
    ]
    one_ticker_history = cover_with_rectangles({(3, w) for w in range(40)}, max_partitions=500)
    assert [
        (r.first_ticker, r.last_ticker, r.first_window, r.last_window) for r in one_ticker_history
    ] == [(3, 3, 0, 39)]
