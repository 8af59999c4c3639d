"""The core pipeline end to end through Dagster and a real MongoDB-wire server.

Expected values are computed here from the sample CSV files and the stored model bytes, so the
assertions do not lean on the code under test to know the answer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import subprocess
import sys
import textwrap

import dagster as dg
import gridfs
import joblib
import numpy as np
import pandas as pd
import pytest

from anomaly_pipeline.features import FEATURE_NAMES, LOOKBACK_BARS, compute_features
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.storage.anomaly_store import anomaly_id
from anomaly_pipeline.universe import load_universe
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets, train

TICKERS = ("SYNX-USD", "SYNY-USD", "SYNZ-USD")
WINDOWS = ("2025-01", "2025-03")


@pytest.fixture
def crypto_1h(sample_universe, resources, instance):
    """Crypto 1h of the sample, ingested, trained and detected for January to March 2025."""
    assets = pipeline_assets(sample_universe, "CRYPTO", "1h")
    for ticker in TICKERS:
        materialize_range(
            assets, ("prices", "features"), f"{ticker}|{WINDOWS[0]}", f"{ticker}|{WINDOWS[1]}",
            resources=resources, instance=instance,
        )  # fmt: skip
    train(assets, resources=resources, instance=instance)
    run_ids = {}
    for ticker in TICKERS:
        result = materialize_range(
            assets, ("anomalies",), f"{ticker}|{WINDOWS[0]}", f"{ticker}|{WINDOWS[1]}",
            resources=resources, instance=instance,
        )  # fmt: skip
        run_ids[ticker] = result.run_id
    return assets, run_ids


def _csv_bars(ticker: str, interval: str) -> pd.DataFrame:
    frame = pd.read_csv(SAMPLE_DATA_DIR / f"{ticker}_{interval}.csv")
    frame.index = pd.DatetimeIndex(
        pd.to_datetime(frame.pop("timestamp"), utc=True), name="timestamp"
    )
    return frame.astype("float64")


def _stored_forest(database, version: str):
    record = database["models"].find_one({"_id": version})
    blob = (
        gridfs.GridFSBucket(database, "model_blobs").open_download_stream(record["blob_id"]).read()
    )
    return record, blob, joblib.load(io.BytesIO(blob))


def test_stored_anomalies_match_an_independent_scoring_of_the_sample(crypto_1h, database):
    _, run_ids = crypto_1h
    record, blob, artifact = _stored_forest(database, "CRYPTO-1h-1")
    assert hashlib.sha256(blob).hexdigest() == record["sha256"]

    for ticker in TICKERS:
        bars = _csv_bars(ticker, "1h")
        features = compute_features(bars).features  # whole history at once, no partitioning
        scores = -artifact["forest"].score_samples(features[list(FEATURE_NAMES)])
        flagged = features.index[scores > artifact["threshold"]]
        stored = {d["_id"]: d for d in database["anomalies"].find({"ticker": ticker})}

        assert set(stored) == {anomaly_id(ticker, "1h", stamp) for stamp in flagged}
        assert len(stored) > 0
        for stamp, score in zip(features.index, scores, strict=True):
            document = stored.get(anomaly_id(ticker, "1h", stamp))
            if document is None:
                continue
            assert document["timestamp"] == stamp.to_pydatetime()
            assert document["timestamp"].tzinfo is not None
            assert (document["ticker"], document["interval"], document["market"]) == (
                ticker, "1h", "CRYPTO",
            )  # fmt: skip
            for column in ("open", "high", "low", "close", "volume"):
                assert document[column] == bars.loc[stamp, column]
            assert document["anomaly_score"] == pytest.approx(score, abs=1e-12)
            assert document["anomaly_score"] > document["threshold"] == artifact["threshold"]
            assert list(document["features"]) == list(FEATURE_NAMES)
            np.testing.assert_allclose(
                [document["features"][name] for name in FEATURE_NAMES],
                features.loc[stamp, list(FEATURE_NAMES)].to_numpy(),
                rtol=0, atol=1e-12,
            )  # fmt: skip
            assert document["model_version"] == "CRYPTO-1h-1"
            assert document["model_hash"] == record["sha256"]
            assert document["detection_run_id"] == run_ids[ticker]
            assert document["trigger"] == "manual"
            assert document["created_at"] <= document["updated_at"]


def test_warmup_rows_are_excluded_and_counted(crypto_1h, database):
    first = database["bar_features"].find_one(
        {"ticker": "SYNX-USD", "partition_key": "SYNX-USD|2025-01"}
    )
    second = database["bar_features"].find_one(
        {"ticker": "SYNX-USD", "partition_key": "SYNX-USD|2025-02"}
    )
    january_bars = len(_csv_bars("SYNX-USD", "1h").loc["2025-01"])
    # The first window of history cannot fill the rolling windows of its first bars.
    assert first["warmup_excluded"] == LOOKBACK_BARS
    assert first["row_count"] == january_bars - LOOKBACK_BARS
    # Later windows borrow the bars before them, so nothing is excluded.
    assert second["warmup_excluded"] == 0


def test_rerun_changes_only_run_id_and_updated_at(crypto_1h, database, resources, instance):
    assets, _ = crypto_1h
    before = {d["_id"]: d for d in database["anomalies"].find()}
    rerun = materialize_range(
        assets, ("prices", "features", "anomalies"), "SYNY-USD|2025-01", "SYNY-USD|2025-03",
        resources=resources, instance=instance,
    )  # fmt: skip
    train(assets, resources=resources, instance=instance)
    after = {d["_id"]: d for d in database["anomalies"].find()}

    assert set(after) == set(before)
    assert database["models"].count_documents({}) == 1  # unchanged data, unchanged bytes
    moved = {"detection_run_id", "updated_at"}
    for document_id, old in before.items():
        new = after[document_id]
        assert {k: v for k, v in new.items() if k not in moved} == {
            k: v for k, v in old.items() if k not in moved
        }
        if old["ticker"] == "SYNY-USD":
            assert new["detection_run_id"] == rerun.run_id != old["detection_run_id"]
            assert new["updated_at"] > old["updated_at"]
        else:
            assert new == old


def test_window_before_first_bar_is_empty_and_says_why(tmp_path, resources, instance, database):
    universe_file = tmp_path / "universe.yaml"
    universe_file.write_text(
        "history_start: {1d: '1984-01-01'}\n"
        "markets:\n"
        "  US: {timezone: America/New_York, calendar: XNYS, intervals: [1d], tickers: [MSFT]}\n"
    )
    assets = pipeline_assets(load_universe(universe_file), "US", "1d")
    result = materialize_range(
        assets,
        ("prices", "features"),
        "MSFT|1985",
        "MSFT|1986",
        resources=resources,
        instance=instance,
    )

    empty = database["price_bars"].find_one({"partition_key": "MSFT|1985"})
    assert empty["bar_count"] == 0
    assert (
        empty["empty_reason"] == "window ends before MSFT's first bar (1986-03-13T05:00:00+00:00)"
    )
    first_year = database["price_bars"].find_one({"partition_key": "MSFT|1986"})
    assert first_year["bar_count"] == len(_csv_bars("MSFT", "1d").loc["1986"])
    metadata = {
        m.partition: m.metadata for m in result.asset_materializations_for_node("us__1d__prices")
    }
    assert metadata["MSFT|1985"]["bars"].value == 0
    assert metadata["MSFT|1985"]["empty_reason"].value == empty["empty_reason"]
    assert metadata["MSFT|1986"]["bars"].value == first_year["bar_count"]


def test_window_after_the_file_ends_fails_and_names_it(tmp_path, resources, instance, database):
    universe_file = tmp_path / "universe.yaml"
    universe_file.write_text(
        "history_start: {1d: '2016-01-01'}\n"
        "markets:\n"
        "  US: {timezone: America/New_York, calendar: XNYS, intervals: [1d], tickers: [MSFT]}\n"
    )
    assets = pipeline_assets(load_universe(universe_file), "US", "1d")
    materialize_range(
        assets, ("prices",), "MSFT|2017", "MSFT|2017", resources=resources, instance=instance
    )
    stored_before = database["price_bars"].find_one({"partition_key": "MSFT|2017"})

    result = dg.materialize(
        [assets["prices"]], partition_key="MSFT|2018", resources=resources, instance=instance,
        raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    message = result.failure_data_for_node("us__1d__prices").error.message
    assert "MSFT 1d partition MSFT|2018" in message
    assert "MSFT_1d.csv ends at 2017-11-10" in message
    assert database["price_bars"].find_one({"partition_key": "MSFT|2018"}) is None
    assert database["price_bars"].find_one({"partition_key": "MSFT|2017"}) == stored_before


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import dagster as dg
    from anomaly_pipeline.modeling.model_store import ModelStoreResource
    from anomaly_pipeline.prices.files_source import FilesPriceSource
    from anomaly_pipeline.storage.mongo import MongoResource
    from anomaly_pipeline.universe import PACKAGED_UNIVERSE, load_universe
    from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets

    uri, database, key = sys.argv[1:4]
    mongo = MongoResource(uri=uri, database=database)
    resources = {"mongo": mongo, "model_store": ModelStoreResource(mongo=mongo),
                 "price_source": FilesPriceSource()}
    assets = pipeline_assets(load_universe(PACKAGED_UNIVERSE), "CRYPTO", "1h")
    materialize_range(assets, ("anomalies",), key, key, resources=resources,
                      instance=dg.DagsterInstance.ephemeral())
    """
)


@pytest.mark.parametrize("kill_point", ["anomalies.after_upsert", None])
def test_run_killed_mid_write_then_rerun_converges(crypto_1h, database, mongo, kill_point):
    partition = "SYNZ-USD|2025-02"
    start, end = dt.datetime(2025, 2, 1, tzinfo=dt.UTC), dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
    window = {"ticker": "SYNZ-USD", "interval": "1h", "timestamp": {"$gte": start, "$lt": end}}
    expected = {d["_id"]: d for d in database["anomalies"].find(window)}
    assert len(expected) >= 2

    # Make the stored set wrong both ways: one real anomaly missing, one stale leftover present.
    missing_id = sorted(expected)[0]
    database["anomalies"].delete_one({"_id": missing_id})
    stale = {**expected[sorted(expected)[1]], "_id": "SYNZ-USD|1h|2025-02-14T05:00:00Z"}
    stale["timestamp"] = dt.datetime(2025, 2, 14, 5, tzinfo=dt.UTC)
    assert stale["_id"] not in expected
    database["anomalies"].insert_one(stale)

    env = {**os.environ}
    if kill_point:
        env["ANOMALY_PIPELINE_KILL_AT"] = kill_point
        killed = subprocess.run(
            [sys.executable, "-c", KILL_SCRIPT, mongo.uri, mongo.database, partition],
            env=env, capture_output=True, timeout=300,
        )  # fmt: skip
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]
        # Killed after the upserts and before the clean-up: the missing one is back, the
        # stale one is still there.
        ids_after_kill = {d["_id"] for d in database["anomalies"].find(window)}
        assert ids_after_kill == set(expected) | {stale["_id"]}

    env.pop("ANOMALY_PIPELINE_KILL_AT", None)
    rerun = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, mongo.uri, mongo.database, partition],
        env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    final = {d["_id"]: d for d in database["anomalies"].find(window)}
    assert set(final) == set(expected)
    assert database["anomalies"].count_documents(window) == len(expected)
    for document_id, document in final.items():
        assert document["anomaly_score"] == expected[document_id]["anomaly_score"]
        assert document["features"] == expected[document_id]["features"]
