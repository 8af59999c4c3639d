"""The model resource: one load per model per process, new versions picked up after retraining."""

from __future__ import annotations

import joblib
import pytest

from anomaly_pipeline.modeling import model_store
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets, train

TICKERS = ("SYNX-USD", "SYNY-USD", "SYNZ-USD")


@pytest.fixture
def crypto_1h_features(sample_universe, resources, instance):
    assets = pipeline_assets(sample_universe, "CRYPTO", "1h")
    for ticker in TICKERS:
        materialize_range(
            assets, ("prices", "features"), f"{ticker}|2025-01", f"{ticker}|2025-03",
            resources=resources, instance=instance,
        )  # fmt: skip
    return assets


@pytest.fixture
def counted_loads(monkeypatch):
    """Counts joblib.load calls made by the model store, and starts from an empty cache."""
    calls: list[int] = []
    real_load = joblib.load

    def counting_load(*args, **kwargs):
        calls.append(1)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_store.joblib, "load", counting_load)
    model_store.forget_loaded_models("CRYPTO", "1h")
    return calls


def test_model_is_loaded_once_per_process_across_runs(
    crypto_1h_features, counted_loads, resources, instance, database
):
    assets = crypto_1h_features
    train(assets, resources=resources, instance=instance)
    for ticker in TICKERS:
        for window in ("2025-01", "2025-02"):
            key = f"{ticker}|{window}"
            materialize_range(
                assets, ("anomalies",), key, key, resources=resources, instance=instance
            )
    assert len(counted_loads) == 1
    assert {d["model_version"] for d in database["anomalies"].find()} == {"CRYPTO-1h-1"}


def test_retraining_on_unchanged_data_keeps_the_version(
    crypto_1h_features, counted_loads, resources, instance, database
):
    first = train(crypto_1h_features, resources=resources, instance=instance)
    second = train(crypto_1h_features, resources=resources, instance=instance)
    first_meta = first.asset_materializations_for_node("crypto__1h__model")[0].metadata
    second_meta = second.asset_materializations_for_node("crypto__1h__model")[0].metadata
    assert second_meta["model_version"].value == first_meta["model_version"].value == "CRYPTO-1h-1"
    assert second_meta["model_hash"].value == first_meta["model_hash"].value
    assert second_meta["new_version"].value is False
    assert database["models"].count_documents({}) == 1


def test_materializing_the_model_again_is_served_to_the_next_run(
    crypto_1h_features, counted_loads, resources, instance, database
):
    assets = crypto_1h_features
    train(assets, resources=resources, instance=instance)
    key = "SYNZ-USD|2025-02"
    materialize_range(assets, ("anomalies",), key, key, resources=resources, instance=instance)
    first_hash = database["models"].find_one({"_id": "CRYPTO-1h-1"})["sha256"]

    # Different training rows give different bytes: a new version that the next run serves.
    train(
        assets, resources=resources, instance=instance,
        run_config={"ops": {"crypto__1h__model": {"config": {"train_end": "2025-02-15"}}}},
    )  # fmt: skip
    second = database["models"].find_one({"_id": "CRYPTO-1h-2"})
    assert second["sha256"] != first_hash
    assert second["training_window"]["requested_end"].isoformat() == "2025-02-15T00:00:00+00:00"
    assert second["training_window"]["last_bar"].isoformat() < "2025-02-15"
    rerun = materialize_range(
        assets, ("anomalies",), key, key, resources=resources, instance=instance
    )

    metadata = rerun.asset_materializations_for_node("crypto__1h__anomalies")[0].metadata
    assert metadata["model_version"].value == "CRYPTO-1h-2"
    assert metadata["anomalies"].value > 0
    versions = {d["model_version"] for d in database["anomalies"].find({"partition_key": key})}
    hashes = {d["model_hash"] for d in database["anomalies"].find({"partition_key": key})}
    assert versions == {"CRYPTO-1h-2"}
    assert hashes == {second["sha256"]}
    # One load per model: the first version, then the retrained one.
    assert len(counted_loads) == 2
