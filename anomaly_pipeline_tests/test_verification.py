"""Verification of stored anomalies against the model that found them and the current model.

Expected scores are computed here without the project's scoring code: the model bytes are read
from GridFS, checked against their SHA-256 and scored with scikit-learn directly.
"""

from __future__ import annotations

import hashlib
import io
import json

import dagster as dg
import gridfs
import joblib
import numpy as np
import pandas as pd
import pytest
from bson import Binary

from anomaly_pipeline.cli import main
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.verification import (
    ANOMALY_ID_TAG,
    SCORE_TOLERANCE,
    VerificationStore,
    build_verification_job,
    verification_run_config,
    verify_anomaly,
)
from anomaly_pipeline_tests.msft_history import (
    INTERVAL,
    TICKER,
    MsftHistory,
    built_history,
    copy_history,
)

ANOMALIES_KEY = dg.AssetKey(["us", "1d", "anomalies"])


@pytest.fixture(scope="module")
def msft_base(mongo_uri, sample_universe):
    with built_history(mongo_uri, sample_universe) as history:
        yield history


@pytest.fixture
def msft(msft_base, resources, instance) -> MsftHistory:
    return copy_history(msft_base, resources, instance)


def stored_anomalies(history: MsftHistory) -> list[dict]:
    return list(history.database["anomalies"].find().sort("_id", 1))


def stored_row_index(document: dict, timestamp) -> int | None:
    """Where ``timestamp`` is in a partition document (times are int64 ns UTC as binary)."""
    times = pd.to_datetime(np.frombuffer(document["timestamps"], dtype="<i8"), utc=True)
    rows = np.flatnonzero(times == pd.Timestamp(timestamp))
    return int(rows[0]) if len(rows) else None


def stored_column(document: dict, name: str) -> np.ndarray:
    return np.frombuffer(document["columns"][name], dtype="<f8")


def stored_feature_row(history: MsftHistory, timestamp) -> list[float]:
    """The bar's row in ``bar_features``, found by scanning the partition documents."""
    for document in history.database["bar_features"].find({"ticker": TICKER}):
        row = stored_row_index(document, timestamp)
        if row is not None:
            return [float(stored_column(document, name)[row]) for name in FEATURE_NAMES]
    raise AssertionError(f"no stored features for {timestamp}")


def independent_score(history: MsftHistory, version: str, row: list[float]) -> tuple[float, float]:
    """(score, threshold) of ``row`` under stored model ``version``, read straight from GridFS."""
    record = history.database["models"].find_one({"_id": version})
    blob = (
        gridfs.GridFSBucket(history.database, bucket_name="model_blobs")
        .open_download_stream(record["blob_id"])
        .read()
    )
    assert hashlib.sha256(blob).hexdigest() == record["sha256"]
    artifact = joblib.load(io.BytesIO(blob))
    frame = pd.DataFrame([row], columns=record["feature_names"])
    return float(-artifact["forest"].score_samples(frame)[0]), float(artifact["threshold"])


def delete_model(history: MsftHistory, version: str) -> None:
    record = history.database["models"].find_one_and_delete({"_id": version})
    gridfs.GridFSBucket(history.database, bucket_name="model_blobs").delete(record["blob_id"])


def run_verification(history: MsftHistory, anomaly_id: str) -> dg.ExecuteInProcessResult:
    job = build_verification_job(history.universe)
    return job.execute_in_process(
        run_config=verification_run_config(anomaly_id),
        resources=history.resources,
        instance=history.instance,
        tags={ANOMALY_ID_TAG: anomaly_id},
        raise_on_error=False,
    )


def test_every_anomaly_is_reproduced_exactly_by_the_model_that_found_it(msft):
    anomalies = stored_anomalies(msft)
    assert len(anomalies) >= 5
    for anomaly in anomalies:
        verification = verify_anomaly(msft.resources["model_store"], anomaly["_id"], run_id="r")

        assert verification.features_source == "recomputed"
        assert verification.features_match is True
        assert verification.max_feature_difference == 0.0
        assert stored_feature_row(msft, anomaly["timestamp"]) == [
            anomaly["features"][name] for name in FEATURE_NAMES
        ]

        assert verification.original.version == anomaly["model_version"] == "US-1d-1"
        assert verification.original.sha256 == anomaly["model_hash"]
        assert abs(verification.original.score - anomaly["anomaly_score"]) <= SCORE_TOLERANCE
        assert verification.reproduced is True

        assert verification.current.sha256 == anomaly["model_hash"]
        assert verification.model_changed is False
        assert verification.still_anomalous is True
        assert abs(verification.score_change) <= SCORE_TOLERANCE


def test_the_job_records_the_check_in_mongodb_and_in_dagster_without_rewriting(msft):
    anomaly = stored_anomalies(msft)[0]
    before = msft.database["anomalies"].find_one({"_id": anomaly["_id"]})

    result = run_verification(msft, anomaly["_id"])

    assert result.success
    stored = msft.database["anomaly_verifications"].find_one({"anomaly_id": anomaly["_id"]})
    assert stored["_id"] == f"{anomaly['_id']}|{result.run_id}"
    assert stored["run_id"] == result.run_id
    assert stored["original_model"]["version"] == "US-1d-1"
    assert stored["original_model"]["sha256"] == anomaly["model_hash"]
    assert abs(stored["original_model"]["score"] - anomaly["anomaly_score"]) <= SCORE_TOLERANCE
    assert stored["current_model"]["sha256"] == anomaly["model_hash"]
    assert stored["reproduced"] is True
    assert stored["features_match"] is True
    assert stored["still_anomalous"] is True
    assert result.output_for_node("verify_stored_anomaly") == stored

    # The run's own metadata says the same.
    (output_event,) = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = output_event.step_output_data.metadata
    assert metadata["anomaly_id"].value == anomaly["_id"]
    assert metadata["reproduced"].value is True
    assert metadata["original_model_hash"].value == anomaly["model_hash"]
    assert metadata["current_model_version"].value == "US-1d-1"
    assert metadata["original_score"].value == stored["original_model"]["score"]
    run = msft.instance.get_run_by_id(result.run_id)
    assert run.job_name == "verify_anomaly"
    assert run.tags[ANOMALY_ID_TAG] == anomaly["_id"]

    # Shown on the anomaly's partition as an observation; nothing was materialized.
    observations = msft.instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=ANOMALIES_KEY, asset_partitions=[anomaly["partition_key"]]),
        limit=10,
    ).records
    assert [record.run_id for record in observations] == [result.run_id]
    observed = observations[0].asset_observation.metadata
    assert observed["anomaly_id"].value == anomaly["_id"]
    assert observed["still_anomalous"].value is True
    assert result.get_asset_materialization_events() == []
    assert msft.database["anomalies"].find_one({"_id": anomaly["_id"]}) == before


def test_an_unknown_anomaly_fails_the_run_and_records_nothing(msft):
    result = run_verification(msft, "MSFT|1d|2999-01-01T00:00:00Z")

    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert "no stored anomaly has _id 'MSFT|1d|2999-01-01T00:00:00Z'" in (
        failure.step_failure_data.error.message
    )
    assert msft.database["anomaly_verifications"].count_documents({}) == 0


def test_drift_after_retraining_on_other_data(msft):
    msft.train(train_start="1988-01-01")
    first, second = msft.database["models"].find(sort=[("sequence", 1)])
    assert (first["_id"], second["_id"]) == ("US-1d-1", "US-1d-2")
    assert second["sha256"] != first["sha256"]
    assert second["training_window"]["requested_start"] == pd.Timestamp("1988-01-01", tz="UTC")

    score_changes = []
    for anomaly in stored_anomalies(msft):
        verification = verify_anomaly(msft.resources["model_store"], anomaly["_id"], run_id="r")
        expected_score, expected_threshold = independent_score(
            msft, "US-1d-2", stored_feature_row(msft, anomaly["timestamp"])
        )

        # The model that found it is untouched and still reproduces the stored score.
        assert verification.original.version == "US-1d-1"
        assert verification.reproduced is True
        # Today's model is the new one, with its own score and threshold.
        assert verification.current.version == "US-1d-2"
        assert verification.current.sha256 == second["sha256"]
        assert verification.model_changed is True
        assert verification.current.score == pytest.approx(expected_score, abs=1e-12)
        assert verification.current.threshold == expected_threshold
        assert verification.still_anomalous is (expected_score > expected_threshold)
        assert verification.score_change == pytest.approx(
            expected_score - anomaly["anomaly_score"], abs=1e-12
        )
        score_changes.append(verification.score_change)
    assert max(abs(change) for change in score_changes) > 1e-3


def test_a_deleted_original_model_is_reported_and_the_current_one_still_scores(msft):
    msft.train(train_start="1988-01-01")
    delete_model(msft, "US-1d-1")
    anomaly = stored_anomalies(msft)[0]

    result = run_verification(msft, anomaly["_id"])

    assert result.success
    stored = result.output_for_node("verify_stored_anomaly")
    assert stored["original_model"]["available"] is False
    assert stored["original_model"]["version"] == "US-1d-1"
    assert stored["original_model"]["sha256"] == anomaly["model_hash"]
    assert stored["original_model"]["score"] is None
    assert "model US-1d-1 is no longer in the store" in stored["original_model"]["note"]
    assert stored["reproduced"] is None
    assert "unavailable" in stored["summary"]

    expected_score, expected_threshold = independent_score(
        msft, "US-1d-2", stored_feature_row(msft, anomaly["timestamp"])
    )
    assert stored["current_model"]["version"] == "US-1d-2"
    assert stored["current_model"]["score"] == pytest.approx(expected_score, abs=1e-12)
    assert stored["still_anomalous"] is (expected_score > expected_threshold)

    (output_event,) = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = output_event.step_output_data.metadata
    assert metadata["original_model_available"].value is False
    assert "reproduced" not in metadata
    assert "is no longer in the store" in metadata["notes"].value


def test_a_reused_version_name_with_other_bytes_is_not_taken_for_the_original(msft):
    # With every model gone, the next training starts again at sequence 1 with other bytes.
    delete_model(msft, "US-1d-1")
    msft.train(train_start="1988-01-01")
    anomaly = stored_anomalies(msft)[0]
    reused = msft.database["models"].find_one({"_id": "US-1d-1"})
    assert reused["sha256"] != anomaly["model_hash"]

    verification = verify_anomaly(msft.resources["model_store"], anomaly["_id"], run_id="r")

    assert verification.original.available is False
    assert "US-1d-1 now names other bytes" in verification.original.note
    assert verification.current.version == "US-1d-1"
    assert verification.current.sha256 == reused["sha256"]
    assert verification.model_changed is True


def test_the_same_bytes_saved_under_a_later_version_count_as_the_original(msft):
    msft.train(train_start="1988-01-01")
    delete_model(msft, "US-1d-1")
    msft.train()  # all history again: the same rows give the same bytes, now as US-1d-3
    anomaly = stored_anomalies(msft)[0]
    assert msft.database["models"].find_one({"_id": "US-1d-3"})["sha256"] == anomaly["model_hash"]

    verification = verify_anomaly(msft.resources["model_store"], anomaly["_id"], run_id="r")

    assert verification.original.version == "US-1d-3"
    assert "the same bytes are stored as US-1d-3" in verification.original.note
    assert verification.reproduced is True
    assert verification.model_changed is False


def test_changed_prices_show_as_changed_features_and_an_unreproduced_score(msft):
    anomaly = stored_anomalies(msft)[0]
    prices = msft.database["price_bars"].find_one(
        {"ticker": TICKER, "partition_key": anomaly["partition_key"]}
    )
    close = stored_column(prices, "close").copy()
    close[stored_row_index(prices, anomaly["timestamp"])] *= 1.05
    msft.database["price_bars"].update_one(
        {"_id": prices["_id"]}, {"$set": {"columns.close": Binary(close.astype("<f8").tobytes())}}
    )

    verification = verify_anomaly(msft.resources["model_store"], anomaly["_id"], run_id="r")

    assert verification.features_source == "recomputed"
    assert verification.features_match is False
    assert verification.max_feature_difference > 1e-3
    assert verification.original.version == "US-1d-1"
    assert verification.reproduced is False
    assert abs(verification.original_score_difference) > SCORE_TOLERANCE
    assert "prices or features changed" in verification.summary()


def test_without_stored_prices_the_anomalys_own_features_are_scored(msft):
    anomaly = stored_anomalies(msft)[0]
    msft.database["price_bars"].delete_one(
        {"ticker": TICKER, "partition_key": anomaly["partition_key"]}
    )

    verification = verify_anomaly(msft.resources["model_store"], anomaly["_id"], run_id="r")

    assert verification.features_source == "stored"
    assert verification.features_match is None
    assert "no longer in price_bars" in verification.features_note
    assert abs(verification.original.score - anomaly["anomaly_score"]) <= SCORE_TOLERANCE
    assert verification.reproduced is True


def test_verifications_survive_replacing_the_anomalys_partition(msft):
    anomaly = stored_anomalies(msft)[0]
    first = run_verification(msft, anomaly["_id"])
    first_check = msft.database["anomaly_verifications"].find_one({"run_id": first.run_id})

    # The same model again: the partition is replaced, the anomaly document rewritten.
    detection = msft.materialize(("anomalies",))
    assert msft.database["anomalies"].find_one({"_id": anomaly["_id"]})["detection_run_id"] == (
        detection.run_id
    )
    assert msft.database["anomaly_verifications"].find_one({"run_id": first.run_id}) == first_check

    # A new model: the check predicts whether re-detection keeps the bar, and every earlier
    # check is still there whatever the partition now holds.
    msft.train(train_start="1988-01-01")
    second = run_verification(msft, anomaly["_id"])
    still_anomalous = second.output_for_node("verify_stored_anomaly")["still_anomalous"]
    msft.materialize(("anomalies",))

    kept = msft.database["anomalies"].find_one({"_id": anomaly["_id"]})
    assert (kept is not None) is still_anomalous
    history = VerificationStore(msft.database).history(anomaly["_id"])
    assert [check["run_id"] for check in history] == [second.run_id, first.run_id]
    assert [check["current_model"]["version"] for check in history] == ["US-1d-2", "US-1d-1"]


def test_cli_verify_runs_the_job_on_the_local_instance_and_prints_it(
    msft, mongo_uri, monkeypatch, tmp_path, capsys
):
    anomaly = stored_anomalies(msft)[0]
    home = tmp_path / "dagster"
    monkeypatch.setenv("MONGODB_URI", mongo_uri)
    monkeypatch.setenv("ANOMALY_PIPELINE_DATABASE", msft.resources["mongo"].database)
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    assert main(["verify", anomaly["_id"]]) == 0
    printed = capsys.readouterr().out
    assert main(["verify", anomaly["_id"], "--json"]) == 0
    printed_json = json.loads(capsys.readouterr().out)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={ANOMALY_ID_TAG: anomaly["_id"]}))
    assert len(runs) == 2
    assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
    assert {run.job_name for run in runs} == {"verify_anomaly"}

    text_run, json_run = runs[1], runs[0]  # newest first
    text_check = msft.database["anomaly_verifications"].find_one({"run_id": text_run.run_id})
    assert f"Verification of {anomaly['_id']} (Dagster run {text_run.run_id})" in printed
    assert f"score {text_check['original_model']['score']:.9f}" in printed
    assert "identical to the stored features" in printed
    assert ": reproduced" in printed
    assert "US-1d-1" in printed and "still anomalous" in printed

    json_check = msft.database["anomaly_verifications"].find_one({"run_id": json_run.run_id})
    assert printed_json["_id"] == json_check["_id"]
    assert printed_json["original_model"] == json_check["original_model"]
    assert printed_json["current_model"] == json_check["current_model"]
    assert printed_json["timestamp"] == anomaly["timestamp"].strftime("%Y-%m-%dT%H:%M:%SZ")


def test_cli_verify_refuses_an_unknown_id_without_a_run(msft, mongo_uri, monkeypatch, capsys):
    monkeypatch.setenv("MONGODB_URI", mongo_uri)
    monkeypatch.setenv("ANOMALY_PIPELINE_DATABASE", msft.resources["mongo"].database)

    assert main(["verify", f"{TICKER}|{INTERVAL}|2999-01-01T00:00:00Z"]) == 1
    assert "no stored anomaly has _id 'MSFT|1d|2999-01-01T00:00:00Z'" in capsys.readouterr().err
