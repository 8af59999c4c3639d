"""Detection gives the same stored anomalies however the history is cut into runs.

One database detects a history in one go; another builds it window by window, the way the
schedules and the sensor do in production, or one partition per run. Every stored anomaly must
match field by field, apart from the run id and the write times.
"""

from __future__ import annotations

import uuid

import dagster as dg
import pytest

from anomaly_pipeline.automation.schedules import ingestion_run_requests
from anomaly_pipeline.automation.sensors import detection_sensor_name
from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.model_store import ModelStore, ModelStoreResource
from anomaly_pipeline.modeling.training import train_model
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline_tests.automation_runs import (
    automation_definitions,
    comparable_anomalies,
    evaluate_sensor,
    execute_request,
)
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets, train

WINDOWS = ("2025-01", "2025-02", "2025-03")


@pytest.fixture
def second_database(mongo_uri):
    """Resources on a database of their own, next to the test's ``resources``."""
    mongo = MongoResource(uri=mongo_uri, database=f"test_{uuid.uuid4().hex[:12]}")
    yield {"mongo": mongo, "model_store": ModelStoreResource(mongo=mongo)}
    mongo.get_database().client.drop_database(mongo.database)


def _copy_current_model(source, target, market: str, interval: str, tickers) -> str:
    """Train, in ``target``, the model ``source``'s model asset trained: same rows, same bytes."""
    features = BarStore(source).read_features(tickers, interval)
    trained = train_model(features[list(FEATURE_NAMES)])
    record, _ = ModelStore(target).save(
        market,
        interval,
        trained,
        training_window={},
        tickers=list(tickers),
        params={},
        run_id="copied",
    )
    assert record["sha256"] == ModelStore(source).current_record(market, interval)["sha256"]
    return record["_id"]


def test_window_by_window_through_schedule_and_sensor_matches_one_go(
    sample_universe, resources, second_database, instance
):
    market = sample_universe.markets["SET"]
    sensor = detection_sensor_name(market)

    # One go: the whole history ingested in one ranged run, then one detection run.
    whole = automation_definitions(sample_universe, resources)
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
    one_go = evaluate_sensor(whole, sensor, instance, None)
    assert len(one_go.run_requests) == 1
    execute_request(whole, one_go.run_requests[0], instance)

    # Window by window: the month's ingestion run (what the schedule requests at a tick in that
    # month), then whatever the sensor requests. The model is in place from the start.
    step_resources = {**second_database, "price_source": resources["price_source"]}
    steps = automation_definitions(sample_universe, step_resources)
    reference_db = resources["mongo"].get_database()
    step_db = step_resources["mongo"].get_database()
    _copy_current_model(reference_db, step_db, "SET", "1h", market.tickers)
    cursor = None
    requested = []
    for window in WINDOWS:
        (ingestion,) = ingestion_run_requests(market, "1h", window)
        execute_request(steps, ingestion.with_replaced_attrs(job_name="ingest_set_1h"), instance)
        tick = evaluate_sensor(steps, sensor, instance, cursor)
        for request in tick.run_requests:
            requested.append(request.tags.get("dagster/asset_partition_range_start"))
            execute_request(steps, request, instance)
        cursor = tick.cursor
    # Each month's three tickers were detected in one run, once.
    assert requested == ["SYNA.BK|2025-01", "SYNA.BK|2025-02", "SYNA.BK|2025-03"]

    expected = comparable_anomalies(reference_db)
    assert len(expected) > 0
    assert comparable_anomalies(step_db) == expected

    # The detection state agrees too: same bars, same scored bars, same model, nothing pending.
    for ticker in market.tickers:
        reference = DetectionState(reference_db).get(ticker, "1h")
        stepped = DetectionState(step_db).get(ticker, "1h")
        for field in (
            "bars_seen",
            "last_bar_ingested",
            "last_bar_scored",
            "model_hash",
            "latest_scored_partition",
            "pending",
        ):
            assert stepped[field] == reference[field], field
        for window in WINDOWS:
            for field in (
                "content_hash",
                "bars",
                "scored_content_hash",
                "scored_bars",
                "anomalies",
                "scored_model_hash",
            ):
                assert stepped["windows"][window][field] == reference["windows"][window][field]


def test_one_partition_per_run_stores_the_same_documents_as_ranged_runs(
    sample_universe, resources, second_database, instance
):
    ticker, interval = "SYNX-USD", "1h"
    assets = pipeline_assets(sample_universe, "CRYPTO", interval)
    first, last = f"{ticker}|{WINDOWS[0]}", f"{ticker}|{WINDOWS[-1]}"
    materialize_range(
        assets, ("prices", "features"), first, last, resources=resources, instance=instance
    )
    train(assets, resources=resources, instance=instance)
    materialize_range(assets, ("anomalies",), first, last, resources=resources, instance=instance)

    single = {**second_database, "price_source": resources["price_source"]}
    reference_db = resources["mongo"].get_database()
    single_db = single["mongo"].get_database()
    _copy_current_model(reference_db, single_db, "CRYPTO", interval, [ticker])
    for window in WINDOWS:
        dg.materialize(
            [assets["prices"], assets["features"], assets["anomalies"]],
            partition_key=f"{ticker}|{window}",
            resources=single,
            instance=instance,
        )

    expected = comparable_anomalies(reference_db)
    assert len(expected) > 0
    assert comparable_anomalies(single_db) == expected
    run_fields = {"run_id", "ingested_at", "computed_at"}
    for collection in ("price_bars", "bar_features"):
        stored = {
            d["_id"]: {k: v for k, v in d.items() if k not in run_fields}
            for d in single_db[collection].find()
        }
        assert stored == {
            d["_id"]: {k: v for k, v in d.items() if k not in run_fields}
            for d in reference_db[collection].find()
        }
