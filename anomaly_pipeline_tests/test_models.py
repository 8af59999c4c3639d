"""Model versions: how many are kept, that referenced ones are never pruned, and the models CLI."""

from __future__ import annotations

import json

import gridfs
import numpy as np
import pandas as pd
import pytest
import sklearn

from anomaly_pipeline.cli import main
from anomaly_pipeline.cli.anomalies import json_value
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.model_store import ModelStore, ModelStoreResource
from anomaly_pipeline.modeling.training import FOREST_PARAMS, train_model
from anomaly_pipeline.resources import build_resources
from anomaly_pipeline_tests.msft_history import MsftHistory, built_history, copy_history


@pytest.fixture(scope="module")
def msft_base(mongo_uri, sample_universe):
    with built_history(mongo_uri, sample_universe) as history:
        yield history


@pytest.fixture
def msft(msft_base, resources, instance) -> MsftHistory:
    return copy_history(msft_base, resources, instance)


@pytest.fixture
def cli_env(msft, mongo_uri, monkeypatch):
    monkeypatch.setenv("MONGODB_URI", mongo_uri)
    monkeypatch.setenv("ANOMALY_PIPELINE_DATABASE", msft.resources["mongo"].database)


def save_random_model(store: ModelStore, market: str, interval: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    features = pd.DataFrame(rng.normal(size=(600, len(FEATURE_NAMES))), columns=FEATURE_NAMES)
    record, is_new = store.save(
        market,
        interval,
        train_model(features),
        training_window={"seed": seed},
        tickers=["X"],
        params=FOREST_PARAMS,
        run_id=f"run-{seed}",
    )
    assert is_new
    return record


def test_prune_keeps_the_newest_and_every_version_stored_anomalies_reference(database):
    store = ModelStore(database)
    first, second, third, fourth = (save_random_model(store, "US", "1d", seed) for seed in range(4))
    other_market = save_random_model(store, "SET", "1h", 10)
    database["anomalies"].insert_one({"_id": "X|1d|a", "model_hash": first["sha256"]})

    assert store.prune("US", "1d", keep=2) == [second["_id"]]

    assert [record["_id"] for record in store.records("US", "1d")] == [
        fourth["_id"],
        third["_id"],
        first["_id"],
    ]
    blobs = gridfs.GridFSBucket(database, bucket_name="model_blobs")
    with pytest.raises(gridfs.errors.NoFile):
        blobs.open_download_stream(second["blob_id"]).read()
    # The referenced old version is whole: its bytes load and pass the hash check.
    assert store.load(store.record_by_version(first["_id"])).sha256 == first["sha256"]
    assert store.record_by_version(other_market["_id"]) is not None

    # Once no stored anomaly references it, the next prune removes it.
    database["anomalies"].delete_one({"_id": "X|1d|a"})
    assert store.prune("US", "1d", keep=2) == [first["_id"]]
    assert database["model_blobs.files"].count_documents({}) == 3


def test_the_model_asset_prunes_to_keep_versions_but_not_what_anomalies_found(msft):
    keep_one = {
        **msft.resources,
        "model_store": ModelStoreResource(mongo=msft.resources["mongo"], keep_versions=1),
    }
    first = msft.database["models"].find_one({"_id": "US-1d-1"})

    result = msft.train(train_start="1988-01-01", resources=keep_one)

    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    second = msft.database["models"].find_one({"_id": "US-1d-2"})
    assert metadata["model_version"].value == "US-1d-2"
    assert metadata["model_hash"].value == second["sha256"]
    assert metadata["keep_versions"].value == 1
    assert metadata["pruned_versions"].value == []  # every stored anomaly was found by US-1d-1
    assert metadata["training_requested"].value == "1988-01-01T00:00:00+00:00 to now"
    assert metadata["training_rows"].value == second["training_rows"]
    assert metadata["feature_names"].value == list(FEATURE_NAMES)
    assert metadata["size_bytes"].value == second["size_bytes"]
    assert metadata["threshold"].value == second["threshold"]
    assert "US-1d-1" in metadata["kept_versions"].value
    assert "US-1d-2" in metadata["kept_versions"].value

    # Re-detection with US-1d-2 replaces every partition: nothing references US-1d-1 any more.
    msft.materialize(("anomalies",), resources=keep_one)
    assert msft.database["anomalies"].count_documents({"model_hash": first["sha256"]}) == 0

    result = msft.train(train_start="1987-06-01", resources=keep_one)

    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["model_version"].value == "US-1d-3"
    assert metadata["pruned_versions"].value == ["US-1d-1"]
    remaining = [record["_id"] for record in msft.database["models"].find(sort=[("sequence", -1)])]
    referenced = msft.database["anomalies"].count_documents({"model_hash": second["sha256"]})
    assert remaining == (["US-1d-3", "US-1d-2"] if referenced else ["US-1d-3"])


def test_models_json_matches_the_stored_records(msft, cli_env, monkeypatch, capsys):
    msft.train(train_start="1988-01-01")
    monkeypatch.setenv("ANOMALY_PIPELINE_KEEP_MODELS", "1")

    assert main(["models", "--json"]) == 0

    (printed,) = json.loads(capsys.readouterr().out)
    records = list(msft.database["models"].find(sort=[("sequence", -1)]))
    as_json = json.loads(json.dumps(records, default=json_value))
    assert (printed["market"], printed["interval"]) == ("US", "1d")
    assert printed["keep_versions"] == 1
    assert printed["current"]["_id"] == "US-1d-2"
    for field in (
        "sha256",
        "sklearn_version",
        "training_window",
        "training_rows",
        "feature_names",
        "params",
        "size_bytes",
        "threshold",
        "tickers",
    ):
        assert printed["current"][field] == as_json[0][field], field
    assert printed["current"]["training_window"]["requested_start"] == "1988-01-01T00:00:00Z"
    assert [version["_id"] for version in printed["versions"]] == ["US-1d-2", "US-1d-1"]
    assert [version["anomalies"] for version in printed["versions"]] == [
        msft.database["anomalies"].count_documents({"model_hash": record["sha256"]})
        for record in records
    ]
    assert printed["versions"][1]["anomalies"] > 0


def test_models_text_names_each_version_and_why_it_is_kept(msft, cli_env, monkeypatch, capsys):
    msft.train(train_start="1988-01-01")
    monkeypatch.setenv("ANOMALY_PIPELINE_KEEP_MODELS", "1")
    current, previous = msft.database["models"].find(sort=[("sequence", -1)])
    found_by_previous = msft.database["anomalies"].count_documents(
        {"model_hash": previous["sha256"]}
    )

    assert main(["models", "--market", "US", "--interval", "1d"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "US 1d: current model US-1d-2"
    assert f"  sha256:         {current['sha256']}" in lines
    assert f"  scikit-learn:   {sklearn.__version__}" in lines
    trained_on = next(line for line in lines if line.startswith("  trained on:"))
    assert f"{current['training_rows']} rows of MSFT" in trained_on
    assert "(requested 1988-01-01 00:00 UTC to now)" in trained_on
    assert f"  size:           {current['size_bytes']:,} bytes" in lines
    (previous_line,) = [line for line in lines if line.strip().startswith("US-1d-1")]
    assert previous["sha256"][:12] in previous_line
    assert f"{found_by_previous} anomalies" in previous_line
    assert previous_line.endswith("kept: stored anomalies reference it")

    assert main(["models", "--market", "SET"]) == 0
    assert capsys.readouterr().out.strip() == "no models stored for that selection"


def test_keep_models_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("ANOMALY_PIPELINE_KEEP_MODELS", raising=False)
    assert build_resources()["model_store"].keep_versions == 5
    monkeypatch.setenv("ANOMALY_PIPELINE_KEEP_MODELS", "2")
    assert build_resources()["model_store"].keep_versions == 2
    for refused in ("0", "two", "-1"):
        monkeypatch.setenv("ANOMALY_PIPELINE_KEEP_MODELS", refused)
        with pytest.raises(ValueError, match="ANOMALY_PIPELINE_KEEP_MODELS"):
            build_resources()
