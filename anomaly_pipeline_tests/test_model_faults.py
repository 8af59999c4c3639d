"""Faults people meet between pandas and scikit-learn, each with the answer the model must give.

- The threshold flags the documented share of bars on fresh data drawn like the training data,
  not only on the training rows it was taken from, and it flags planted outliers.
- Features reach the forest by name: reordered columns score the same, a missing feature or a
  value that is not a finite number is refused with the bar named, and nothing warns.
- A model from another scikit-learn, or whose bytes were changed, is refused before it is
  unpickled, and the anomalies asset fails saying to retrain.
- Flat prices, zero volume and sub-micro prices go through the whole asset path without a NaN or
  an infinity reaching the model.

Every warning is an error here: scikit-learn's feature-name and version warnings must never
scroll past.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re

import dagster as dg
import gridfs
import joblib
import numpy as np
import pandas as pd
import pytest
import sklearn
import sklearn.base

from anomaly_pipeline.features import FEATURE_NAMES, LOOKBACK_BARS, compute_features
from anomaly_pipeline.modeling.detection import detect
from anomaly_pipeline.modeling.model_store import (
    ModelStore,
    ModelStoreResource,
    ModelUnavailableError,
    ServedModel,
    forget_loaded_models,
)
from anomaly_pipeline.modeling.training import anomaly_scores, train_model
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.universe import Market, load_universe
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets, train

pytestmark = [
    pytest.mark.filterwarnings("error"),
    # The session's database server outlives the Popen object that started it, by design.
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in.*Popen.__del__:pytest.PytestUnraisableExceptionWarning"
    ),
    # The two beta Dagster APIs the package uses on purpose (see anomaly_pipeline/__init__.py).
    pytest.mark.filterwarnings(
        r"ignore:(Parameter `backfill_policy`|Class `MultiPartitionMapping`):dagster.BetaWarning"
    ),
    # Dagster 1.13 itself calls this deprecated property when it builds nested resources.
    pytest.mark.filterwarnings(
        "ignore:InitResourceContext.dagster_run is deprecated:DeprecationWarning"
    ),
]

# Each feature row reads its own bar and the LOOKBACK_BARS bars before it. Rows this far apart
# share no bar, and the synthetic bars are independent draws, so their flags are independent
# trials: the binomial tolerance below is honest.
STRIDE = LOOKBACK_BARS + 1
TRAINING_ROWS = 4000
HELD_OUT_ROWS = 4000
PLANTED_OUTLIERS = 20
# Planted bars move 12 standard deviations in one bar on 30 times the usual volume.
PLANTED_MOVE = 0.12
TEST_MARKET = Market("TEST", "UTC", None, ("1h",), ("SYN-USD",))


def synthetic_bars(count: int, seed: int, start_price: float = 100.0) -> pd.DataFrame:
    """A canonical 1h frame: a random walk with 1% bar moves, small gaps and lognormal volume."""
    rng = np.random.default_rng(seed)
    moves = rng.normal(0.0, 0.01, count)
    gaps = rng.normal(0.0, 0.002, count)
    close = start_price * np.exp(np.cumsum(moves + gaps))
    open_ = close / np.exp(moves)
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0.0, 0.004, count)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0.0, 0.004, count)))
    volume = np.round(rng.lognormal(8.0, 0.5, count))
    index = pd.DatetimeIndex(
        pd.date_range("2020-01-01", periods=count, freq="h", tz="UTC"), name="timestamp"
    )
    return pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index
    )


def plant_outlier(bars: pd.DataFrame, position: int, direction: float) -> None:
    """Turn one bar into a price shock with a wide range and a volume spike, in place."""
    opened = bars["open"].iloc[position]
    closed = opened * math.exp(direction * PLANTED_MOVE)
    column = bars.columns.get_loc
    bars.iloc[position, column("close")] = closed
    bars.iloc[position, column("high")] = max(opened, closed) * 1.02
    bars.iloc[position, column("low")] = min(opened, closed) / 1.02
    bars.iloc[position, column("volume")] = 30.0 * float(bars["volume"].median())


@pytest.fixture(scope="module")
def independent_rows() -> dict[str, pd.DataFrame]:
    """Training rows, held-out inlier rows and planted-outlier rows, each row independent."""
    rows = TRAINING_ROWS + HELD_OUT_ROWS
    bars = synthetic_bars(LOOKBACK_BARS + rows * STRIDE, seed=20240308)
    # Row i is the bar at LOOKBACK_BARS + i * STRIDE; even rows train, odd rows are held out.
    held_out_positions = LOOKBACK_BARS + STRIDE * np.arange(1, rows, 2)
    planted_positions = held_out_positions[:: HELD_OUT_ROWS // PLANTED_OUTLIERS]
    for number, position in enumerate(planted_positions):
        plant_outlier(bars, int(position), 1.0 if number % 2 else -1.0)

    features = compute_features(bars).features
    sampled = features.iloc[::STRIDE]
    assert len(sampled) == rows
    held_out = sampled.iloc[1::2]
    planted = held_out.index.isin(bars.index[planted_positions])
    return {
        "training": sampled.iloc[0::2],
        "inliers": held_out[~planted],
        "planted": held_out[planted],
    }


@pytest.mark.parametrize("flag_rate", [0.01, 0.05])
def test_threshold_flags_the_documented_rate_on_held_out_rows(independent_rows, flag_rate):
    trained = train_model(independent_rows["training"], flag_rate=flag_rate)
    forest = trained.artifact["forest"]
    inliers, planted = independent_rows["inliers"], independent_rows["planted"]
    assert len(planted) == PLANTED_OUTLIERS

    inlier_rate = float(np.mean(anomaly_scores(forest, inliers) > trained.threshold))
    # The threshold is itself estimated from TRAINING_ROWS rows, so its own binomial error adds
    # to that of the held-out count.
    sigma = math.sqrt(
        flag_rate * (1 - flag_rate) * (1 / len(inliers) + 1 / len(independent_rows["training"]))
    )
    assert abs(inlier_rate - flag_rate) <= 4 * sigma, (inlier_rate, flag_rate, 4 * sigma)
    # On the training rows themselves the quantile holds by construction, to one row.
    training_rate = np.mean(
        anomaly_scores(forest, independent_rows["training"]) > trained.threshold
    )
    assert abs(training_rate - flag_rate) <= 1 / TRAINING_ROWS
    # A 12-sigma move on 30 times the volume is no borderline case: every one is flagged.
    assert (anomaly_scores(forest, planted) > trained.threshold).all()


@pytest.fixture(scope="module")
def served_model(independent_rows) -> ServedModel:
    trained = train_model(independent_rows["training"], flag_rate=0.05)
    record = {"_id": "TEST-1h-1", "sha256": trained.sha256}
    return ServedModel(record=record, artifact=trained.artifact)


@pytest.fixture(scope="module")
def two_windows() -> tuple[list[BarWindow], list[pd.DataFrame], list[pd.DataFrame]]:
    """Two consecutive windows of one ticker, with their features and bars."""
    bars = synthetic_bars(LOOKBACK_BARS + 400, seed=7)
    plant_outlier(bars, LOOKBACK_BARS + 150, 1.0)
    features = compute_features(bars).features
    middle = features.index[200]
    bounds = [(features.index[0], middle), (middle, features.index[-1] + pd.Timedelta(hours=1))]
    windows, features_by_window, bars_by_window = [], [], []
    for number, (start, end) in enumerate(bounds):
        windows.append(BarWindow("SYN-USD", "1h", TEST_MARKET, start, end, f"SYN-USD|w{number}"))
        features_by_window.append(features[(features.index >= start) & (features.index < end)])
        bars_by_window.append(bars[(bars.index >= start) & (bars.index < end)])
    return windows, features_by_window, bars_by_window


def _detect(model, windows, features_by_window, bars_by_window):
    return detect(
        model, windows, features_by_window, bars_by_window, run_id="run-1", trigger="manual"
    )


def test_detect_scores_by_name_without_warnings(served_model, two_windows):
    windows, features_by_window, bars_by_window = two_windows
    detections = _detect(served_model, windows, features_by_window, bars_by_window)

    forest = served_model.artifact["forest"]
    for detection, features, bars in zip(
        detections, features_by_window, bars_by_window, strict=True
    ):
        # Expected: the forest's own scores on a frame built column by column in fit order.
        ordered = pd.DataFrame({name: features[name] for name in forest.feature_names_in_})
        expected = -forest.score_samples(ordered)
        flagged = features.index[expected > served_model.threshold]
        assert detection.scored_bars == len(features)
        assert [d["timestamp"] for d in detection.documents] == list(flagged)
        for document in detection.documents:
            row = features.index.get_loc(document["timestamp"])
            assert document["anomaly_score"] == expected[row]
            assert document["close"] == bars.loc[document["timestamp"], "close"]
            assert document["features"] == {n: features.iloc[row][n] for n in FEATURE_NAMES}
    planted_at = bars_by_window[0].index[150]
    assert planted_at in [d["timestamp"] for d in detections[0].documents]


def test_scoring_without_names_is_what_the_guard_prevents(served_model, independent_rows):
    forest = served_model.artifact["forest"]
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        forest.score_samples(independent_rows["inliers"][list(FEATURE_NAMES)].to_numpy()[:5])
    with pytest.raises(ValueError, match="must be a DataFrame with named columns"):
        anomaly_scores(forest, independent_rows["inliers"].to_numpy())


def test_reordered_columns_and_extra_columns_score_the_same(served_model, independent_rows):
    forest = served_model.artifact["forest"]
    rows = independent_rows["inliers"].iloc[:300]
    shuffled = rows[list(reversed(FEATURE_NAMES))].copy()
    shuffled.insert(3, "ticker", "SYN-USD")
    np.testing.assert_array_equal(anomaly_scores(forest, shuffled), anomaly_scores(forest, rows))


def test_detect_with_reordered_columns_finds_the_same_bars(served_model, two_windows):
    windows, features_by_window, bars_by_window = two_windows
    reordered = [features[list(reversed(FEATURE_NAMES))] for features in features_by_window]
    expected = _detect(served_model, windows, features_by_window, bars_by_window)
    found = _detect(served_model, windows, reordered, bars_by_window)
    assert [d.documents for d in found] == [d.documents for d in expected]


def test_a_missing_feature_is_refused_naming_it(served_model, two_windows, independent_rows):
    forest = served_model.artifact["forest"]
    with pytest.raises(ValueError, match=r"features lack rsi_14; the model needs log_return_1"):
        anomaly_scores(forest, independent_rows["inliers"].drop(columns=["rsi_14"]))

    windows, features_by_window, bars_by_window = two_windows
    damaged = [features_by_window[0], features_by_window[1].drop(columns=["rsi_14"])]
    with pytest.raises(
        ValueError, match=r"^SYN-USD 1h partition SYN-USD\|w1: features lack rsi_14"
    ):
        _detect(served_model, windows, damaged, bars_by_window)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_a_value_that_is_not_finite_never_reaches_the_forest(served_model, two_windows, bad_value):
    windows, features_by_window, bars_by_window = two_windows
    damaged = features_by_window[1].copy()
    damaged.iloc[7, damaged.columns.get_loc("volume_zscore_20")] = bad_value
    stamp = damaged.index[7].isoformat()
    with pytest.raises(ValueError) as refused:
        _detect(served_model, windows, [features_by_window[0], damaged], bars_by_window)
    assert str(refused.value) == (
        f"SYN-USD 1h partition SYN-USD|w1: bar at {stamp}: volume_zscore_20 is {bad_value}; "
        "features must be finite numbers"
    )


def test_training_refuses_missing_values_naming_ticker_and_bar(independent_rows):
    training = independent_rows["training"].copy()
    training.insert(0, "ticker", "SYN-USD")
    training.iloc[42, training.columns.get_loc("gap_return")] = np.nan
    stamp = training.index[42].isoformat()
    with pytest.raises(
        ValueError, match="^" + re.escape(f"SYN-USD bar at {stamp}: gap_return is nan;")
    ):
        train_model(training)


def test_two_rows_for_one_bar_are_refused_before_scoring(served_model, two_windows):
    windows, features_by_window, bars_by_window = two_windows
    twice = pd.concat([features_by_window[0], features_by_window[0].iloc[[5]]]).sort_index()
    with pytest.raises(ValueError, match=r"^SYN-USD 1h partition SYN-USD\|w0: .* 1 bar\(s\) twice"):
        _detect(served_model, windows, [twice, features_by_window[1]], bars_by_window)


# --- Models from another scikit-learn, and bytes changed in GridFS --------------------------


def _save(database, trained, market="CRYPTO", interval="1h") -> dict:
    record, is_new = ModelStore(database).save(
        market,
        interval,
        trained,
        training_window={"first_bar": pd.Timestamp("2020-01-01", tz="UTC")},
        tickers=["SYN-USD"],
        params={},
        run_id="run-1",
    )
    assert is_new
    return record


@pytest.fixture(scope="module")
def small_model(independent_rows):
    return train_model(independent_rows["training"].iloc[:1000])


def test_record_from_another_sklearn_is_refused_with_a_message_to_retrain(database, small_model):
    record = _save(database, small_model)
    database["models"].update_one({"_id": record["_id"]}, {"$set": {"sklearn_version": "1.0.2"}})
    stored = database["models"].find_one({"_id": record["_id"]})

    with pytest.raises(ModelUnavailableError) as refused:
        ModelStore(database).load(stored)
    assert str(refused.value) == (
        f"model CRYPTO-1h-1 was written by scikit-learn 1.0.2 and this process runs "
        f"{sklearn.__version__}; retrain it by materializing the crypto/1h/model asset"
    )


def test_pickle_stamped_by_another_sklearn_is_refused_even_if_its_record_disagrees(
    database, independent_rows, monkeypatch
):
    # The bytes claim an older scikit-learn; the record (written by this process) does not.
    with monkeypatch.context() as patched:
        patched.setattr(sklearn.base, "__version__", "1.0.2")
        trained = train_model(independent_rows["training"].iloc[:1000])
    record = _save(database, trained)
    assert record["sklearn_version"] == sklearn.__version__

    with pytest.raises(
        ModelUnavailableError, match=r"was pickled by scikit-learn 1\.0\.2 although"
    ):
        ModelStore(database).load(record)


def test_model_trained_on_other_features_is_refused(database, small_model):
    record = _save(database, small_model)
    older = [name for name in FEATURE_NAMES if name != "macd_histogram"]
    database["models"].update_one({"_id": record["_id"]}, {"$set": {"feature_names": older}})
    with pytest.raises(ModelUnavailableError, match=r"trained on features .* not the 14 this code"):
        ModelStore(database).load(database["models"].find_one({"_id": record["_id"]}))


def _replace_blob(database, record: dict, payload: bytes) -> None:
    """Overwrite a stored model's bytes in GridFS, keeping its file id and record."""
    files, chunks = database["model_blobs.files"], database["model_blobs.chunks"]
    chunk_size = files.find_one({"_id": record["blob_id"]})["chunkSize"]
    chunks.delete_many({"files_id": record["blob_id"]})
    chunks.insert_many(
        [
            {"files_id": record["blob_id"], "n": n, "data": payload[offset : offset + chunk_size]}
            for n, offset in enumerate(range(0, len(payload), chunk_size))
        ]
    )
    files.update_one({"_id": record["blob_id"]}, {"$set": {"length": len(payload)}})


def _stored_bytes(database, record: dict) -> bytes:
    return (
        gridfs.GridFSBucket(database, "model_blobs").open_download_stream(record["blob_id"]).read()
    )


class _MakesDirectory:
    """A pickle that creates a directory when it is loaded: proof that loading ran its code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_flipped_byte_is_refused(database, small_model):
    record = _save(database, small_model)
    tampered = bytearray(_stored_bytes(database, record))
    tampered[len(tampered) // 2] ^= 0x01
    _replace_blob(database, record, bytes(tampered))
    assert _stored_bytes(database, record) == bytes(tampered)

    with pytest.raises(
        ModelUnavailableError, match="refusing to load model CRYPTO-1h-1: its bytes"
    ):
        ModelStore(database).load(record)


def test_replaced_blob_is_refused_before_it_is_unpickled(database, small_model, tmp_path):
    payload = pickle.dumps(_MakesDirectory(str(tmp_path / "loaded-by-joblib")))
    # The payload really runs code when joblib loads it.
    joblib.load(io.BytesIO(payload))
    assert (tmp_path / "loaded-by-joblib").is_dir()

    marker = tmp_path / "loaded-from-the-store"
    record = _save(database, small_model)
    forget_loaded_models("CRYPTO", "1h")
    _replace_blob(database, record, pickle.dumps(_MakesDirectory(str(marker))))

    with pytest.raises(
        ModelUnavailableError, match=f"bytes hash to .*, not the recorded {record['sha256']}"
    ):
        ModelStore(database).load(record)
    assert not marker.exists()


# --- The anomalies asset, through Dagster --------------------------------------------------------


@pytest.fixture
def crypto_1h_detected(sample_universe, resources, instance):
    """SYNX-USD 1h January 2025 ingested, trained and detected once."""
    assets = pipeline_assets(sample_universe, "CRYPTO", "1h")
    key = "SYNX-USD|2025-01"
    materialize_range(
        assets, ("prices", "features"), key, key, resources=resources, instance=instance
    )
    train(assets, resources=resources, instance=instance)
    materialize_range(assets, ("anomalies",), key, key, resources=resources, instance=instance)
    return assets, key


def test_anomalies_asset_fails_on_a_model_from_another_sklearn(
    crypto_1h_detected, database, resources, instance
):
    assets, key = crypto_1h_detected
    stored_before = list(database["anomalies"].find(sort=[("_id", 1)]))
    assert stored_before
    database["models"].update_many({}, {"$set": {"sklearn_version": "1.0.2"}})

    result = dg.materialize(
        [assets["anomalies"]], partition_key=key, resources=resources, instance=instance,
        raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    message = result.failure_data_for_node("crypto__1h__anomalies").error.message
    assert "model CRYPTO-1h-1 was written by scikit-learn 1.0.2" in message
    assert "retrain it by materializing the crypto/1h/model asset" in message
    assert list(database["anomalies"].find(sort=[("_id", 1)])) == stored_before
    status = instance.get_status_by_partition(
        assets["anomalies"].key, [key], assets["anomalies"].partitions_def
    )
    assert status == {key: dg.AssetPartitionStatus.FAILED}


# --- Flat, idle and sub-micro prices through the whole asset path ------------------------------

EDGE_TICKERS = ("FLAT-USD", "IDLE-USD", "TINY-USD")
# What every feature of a bar is when nothing moved and nothing traded (see features.py).
NEUTRAL_FEATURES = {
    "log_return_1": 0.0,
    "log_return_5": 0.0,
    "gap_return": 0.0,
    "volatility_20": 0.0,
    "return_zscore_20": 0.0,
    "volatility_ratio_5_20": 1.0,
    "volume_zscore_20": 0.0,
    "volume_ratio_20": 0.0,
    "range_pct": 0.0,
    "atr_ratio_14": 1.0,
    "close_location": 0.5,
    "rsi_14": 50.0,
    "macd_histogram": 0.0,
    "bollinger_width_20": 0.0,
}


def _edge_case_files(directory) -> dict[str, pd.DataFrame]:
    hours = pd.DatetimeIndex(
        pd.date_range("2025-01-01", "2025-02-01", freq="h", tz="UTC", inclusive="left"),
        name="timestamp",
    )
    flat = pd.DataFrame(
        {"open": 5.0, "high": 5.0, "low": 5.0, "close": 5.0, "volume": 0.0}, index=hours
    )
    # Every other hour nothing trades and all four prices stay at the last close.
    idle = synthetic_bars(len(hours), seed=11, start_price=20.0).set_axis(hours)
    for quiet in range(1, len(hours), 2):
        idle.iloc[quiet] = [idle["close"].iloc[quiet - 1]] * 4 + [0.0]
    tiny = synthetic_bars(len(hours), seed=12, start_price=3e-8).set_axis(hours)
    frames = {"FLAT-USD": flat, "IDLE-USD": idle, "TINY-USD": tiny}
    for ticker, frame in frames.items():
        frame.to_csv(directory / f"{ticker}_1h.csv", index_label="timestamp")
    return frames


def test_flat_idle_and_sub_micro_prices_reach_the_model_finite(tmp_path, mongo, database, instance):
    frames = _edge_case_files(tmp_path)
    universe_file = tmp_path / "universe.yaml"
    universe_file.write_text(
        "history_start: {1h: '2025-01-01'}\n"
        "markets:\n"
        "  EDGE: {timezone: UTC, calendar: null, intervals: [1h], "
        f"tickers: [{', '.join(EDGE_TICKERS)}]}}\n"
    )
    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(directory=str(tmp_path)),
    }
    assets = pipeline_assets(load_universe(universe_file), "EDGE", "1h")
    first, last = f"{EDGE_TICKERS[0]}|2025-01", f"{EDGE_TICKERS[-1]}|2025-01"
    materialize_range(
        assets, ("prices", "features"), first, last, resources=resources, instance=instance
    )
    train(assets, resources=resources, instance=instance)
    materialize_range(assets, ("anomalies",), first, last, resources=resources, instance=instance)

    # Feature columns are stored as little-endian float64 bytes (see storage/bar_store.py).
    stored = {
        d["ticker"]: {
            name: np.frombuffer(d["columns"][name], dtype="<f8") for name in FEATURE_NAMES
        }
        | {"row_count": d["row_count"]}
        for d in database["bar_features"].find()
    }
    assert set(stored) == set(EDGE_TICKERS)
    for ticker, columns in stored.items():
        for name in FEATURE_NAMES:
            assert len(columns[name]) == columns["row_count"] > 0
            assert np.isfinite(columns[name]).all(), (ticker, name)

    # Nothing moved and nothing traded: every flat feature is its documented neutral value.
    for name, neutral in NEUTRAL_FEATURES.items():
        assert set(stored["FLAT-USD"][name]) == {neutral}, name
    # Sub-micro prices give the features of the same series a billion times larger.
    tiny = frames["TINY-USD"].copy()
    tiny[["open", "high", "low", "close"]] *= 1e9
    expected = compute_features(tiny).features
    for name in FEATURE_NAMES:
        np.testing.assert_allclose(stored["TINY-USD"][name], expected[name], rtol=1e-9, atol=1e-9)

    model = database["models"].find_one()
    assert model["training_rows"] == sum(d["row_count"] for d in stored.values())
    assert math.isfinite(model["threshold"])
    anomalies = list(database["anomalies"].find())
    assert anomalies
    for anomaly in anomalies:
        assert math.isfinite(anomaly["anomaly_score"])
        assert anomaly["anomaly_score"] > model["threshold"]
        assert all(math.isfinite(v) for v in anomaly["features"].values())
    # Identical flat rows are the densest cluster the forest saw: none of them is flagged.
    assert not [a for a in anomalies if a["ticker"] == "FLAT-USD"]
