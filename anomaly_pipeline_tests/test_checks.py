"""Asset checks: they fail on documents and frames built to break them and pass on good data.

The rule-by-rule cases check stored documents directly; the others run the checks through
Dagster against a real MongoDB-wire server, in the same run as the asset (the run's partitions)
and on their own (every stored partition).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

import dagster as dg
import gridfs
import numpy as np
import pandas as pd
import pytest
from bson import Binary
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.assets import build_pipeline_assets
from anomaly_pipeline.checks import (
    CanonicalBarFrame,
    bars_problem,
    build_asset_checks,
    features_problem,
)
from anomaly_pipeline.features import FEATURE_NAMES, LOOKBACK_BARS
from anomaly_pipeline.partitions import bar_windows
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.prices.frames import PRICE_COLUMNS, PriceDataError
from anomaly_pipeline.prices.source import BarWindow, FetchedBars, PriceSource
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.storage.bar_store import BarStore

UTC = dt.timezone.utc
JANUARY, FEBRUARY = "SYNX-USD|2025-01", "SYNX-USD|2025-02"
RANGE_TAGS = {ASSET_PARTITION_RANGE_START_TAG: JANUARY, ASSET_PARTITION_RANGE_END_TAG: FEBRUARY}


def _bars(**changes) -> pd.DataFrame:
    """Four good hourly bars, with whole columns replaced by ``changes``."""
    hours = changes.pop("hours", (0, 1, 2, 3))
    columns = {
        "open": [10.0, 11.0, 12.0, 13.0],
        "high": [10.5, 11.5, 12.5, 13.5],
        "low": [9.5, 10.5, 11.5, 12.5],
        "close": [10.2, 11.2, 12.2, 13.2],
        "volume": [100.0, 0.0, 50.0, 75.0],
        **changes,
    }
    index = pd.DatetimeIndex(
        [pd.Timestamp(2025, 1, 1, hour, tz="UTC") for hour in hours], name="timestamp"
    )
    return pd.DataFrame({name: columns[name] for name in PRICE_COLUMNS}, index=index, dtype=float)


def _features(**changes) -> pd.DataFrame:
    index = pd.DatetimeIndex(
        [pd.Timestamp(2025, 1, 1, hour, tz="UTC") for hour in range(3)], name="timestamp"
    )
    columns = {name: [0.1, -0.2, 0.3] for name in FEATURE_NAMES}
    columns.update(changes)
    return pd.DataFrame(columns, index=index, dtype=float)


def test_good_bars_pass_the_canonical_frame_type():
    assert bars_problem(_bars()) is None
    frame = _bars().reset_index()
    assert dg.check_dagster_type(CanonicalBarFrame, frame).success
    assert not dg.check_dagster_type(CanonicalBarFrame, frame.drop(columns="volume")).success


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {"hours": (0, 1, 1, 3)},
            'Violated "UniqueColumnConstraint" for column "timestamp"',
        ),
        (
            {"hours": (0, 2, 1, 3)},
            "Violated IncreasingTimestamps - 1 bar(s) not after the bar before them; "
            "first at 2025-01-01T01:00:00+00:00",
        ),
        (
            {"high": [10.5, 11.1, 12.5, 13.5]},
            "Violated ConsistentOhlc - 1 bar(s) break 'high is the bar's maximum'; "
            "first at 2025-01-01T01:00:00+00:00",
        ),
        (
            {"low": [9.5, 10.5, 12.3, 12.5]},
            "Violated ConsistentOhlc - 1 bar(s) break 'low is the bar's minimum'; "
            "first at 2025-01-01T02:00:00+00:00",
        ),
        (
            {"low": [9.5, 10.5, 11.5, 0.0], "open": [10.0, 11.0, 12.0, 0.0]},
            "Violated ConsistentOhlc - 1 bar(s) break 'prices > 0'; "
            "first at 2025-01-01T03:00:00+00:00",
        ),
        (
            {"close": [10.2, float("nan"), 12.2, 13.2]},
            'Violated "InRangeColumnConstraint" for column "close"',
        ),
        (
            {"high": [10.5, float("inf"), 12.5, 13.5]},
            "Violated ConsistentOhlc - 1 bar(s) break 'prices finite'; "
            "first at 2025-01-01T01:00:00+00:00",
        ),
        (
            {"volume": [100.0, -1.0, 50.0, 75.0]},
            'Violated "InRangeColumnConstraint" for column "volume" - Column must have values '
            "between 0.0 and inf inclusive.",
        ),
    ],
    ids=["duplicate", "decreasing", "high", "low", "zero", "missing", "infinite", "volume"],
)
def test_broken_bars_fail_with_the_rule_they_break(changes: dict, reason: str):
    bars = _bars(**changes)
    problem = bars_problem(bars)
    assert problem is not None and problem.startswith(reason)
    # The Dagster type built from the same constraints agrees.
    assert not dg.check_dagster_type(CanonicalBarFrame, bars.reset_index()).success


def test_features_must_be_present_and_finite():
    assert features_problem(_features()) is None
    assert features_problem(_features(rsi_14=[50.0, float("nan"), 40.0])) == (
        "feature rsi_14 is missing or not finite in 1 row(s); first at 2025-01-01T01:00:00+00:00"
    )
    assert features_problem(_features(range_pct=[0.1, float("inf"), float("-inf")])) == (
        "feature range_pct is missing or not finite in 2 row(s); first at 2025-01-01T01:00:00+00:00"
    )
    assert features_problem(_features().drop(columns="gap_return")) == (
        "feature gap_return is not stored"
    )


@pytest.fixture
def crypto(sample_universe):
    assets = dict(
        zip(
            ("prices", "features", "model", "anomalies"),
            build_pipeline_assets(sample_universe.markets["CRYPTO"], "1h", sample_universe),
            strict=True,
        )
    )
    checks = {
        check.check_specs_by_output_name[next(iter(check.check_specs_by_output_name))].name: check
        for check in build_asset_checks(sample_universe)
        if next(iter(check.check_keys)).asset_key.path[:2] == ["crypto", "1h"]
    }
    return assets, checks


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        evaluation.check_name: evaluation for evaluation in result.get_asset_check_evaluations()
    }


def _run_checks(crypto, names: Sequence[str], resources: dict, instance, **kwargs):
    assets, checks = crypto
    return _evaluations(
        dg.materialize(
            # The unpartitioned model stays out: a partition key needs one partitions definition.
            [assets["prices"], assets["features"], assets["anomalies"], *checks.values()],
            selection=dg.AssetSelection.checks(*(checks[name] for name in names)),
            resources=resources,
            instance=instance,
            # A failed blocking check fails its run; the evaluation is what these tests read.
            raise_on_error=False,
            **kwargs,
        )
    )


def _sample_bars(month: str) -> int:
    stamps = pd.to_datetime(pd.read_csv(SAMPLE_DATA_DIR / "SYNX-USD_1h.csv")["timestamp"], utc=True)
    return int((stamps.dt.strftime("%Y-%m") == month).sum())


def test_checks_pass_on_stored_sample_data_and_fail_once_it_is_broken(
    crypto, resources, instance, database, sample_universe
):
    assets, checks = crypto
    crypto_market = sample_universe.markets["CRYPTO"]
    ingest = dg.materialize(
        [assets["prices"], assets["features"], *checks.values()],
        selection=[assets["prices"].key, assets["features"].key],
        resources=resources,
        instance=instance,
        tags=RANGE_TAGS,
    )
    passed = _evaluations(ingest)
    january, february = _sample_bars("2025-01"), _sample_bars("2025-02")
    assert set(passed) == {"bars_well_formed", "features_finite"}
    assert passed["bars_well_formed"].passed
    assert passed["bars_well_formed"].metadata["partitions_checked"].value == 2
    assert passed["bars_well_formed"].metadata["bars_checked"].value == january + february
    assert passed["features_finite"].passed
    assert passed["features_finite"].metadata["rows_checked"].value == (
        january + february - LOOKBACK_BARS
    )

    # Store February with one bar's high below its low, and January with one missing feature.
    store = BarStore(database)
    january_window, february_window = bar_windows(
        assets["prices"].partitions_def, [JANUARY, FEBRUARY], crypto_market, "1h"
    )
    bars = store.read_bars("SYNX-USD", "1h", february_window.start, february_window.end)
    bars.iloc[10, bars.columns.get_loc("high")] = bars["low"].iloc[10] - 1.0
    store.write_bars(february_window, bars, run_id="edit", source="test", empty_reason=None)
    # BarStore refuses to write a non-finite value, so corrupt the stored bytes directly, as
    # another writer or a damaged restore could.
    stored = store.partition_document("bar_features", january_window)
    column = np.frombuffer(stored["columns"]["volume_zscore_20"], dtype="<f8").copy()
    column[5] = float("nan")
    database["bar_features"].update_one(
        {"_id": stored["_id"]}, {"$set": {"columns.volume_zscore_20": Binary(column.tobytes())}}
    )
    broken_at = bars.index[10].isoformat()

    # Run alone, the checks look at every stored partition of the market and interval.
    everything = _run_checks(crypto, ["bars_well_formed", "features_finite"], resources, instance)
    bars = everything["bars_well_formed"]
    assert not bars.passed
    assert bars.severity == dg.AssetCheckSeverity.ERROR
    assert bars.metadata["partitions_checked"].value == 2
    assert bars.metadata["partitions_failing"].value == 1
    assert bars.description == (
        "1 of 2 partition(s) fail: Violated ConsistentOhlc - 1 bar(s) break 'high is the bar's "
        f"maximum'; first at {broken_at}"
    )
    assert f"| {FEBRUARY} | Violated ConsistentOhlc" in bars.metadata["failing_partitions"].value
    features = everything["features_finite"]
    assert not features.passed
    assert features.description.startswith(
        "1 of 2 partition(s) fail: feature volume_zscore_20 is missing or not finite in 1 row(s)"
    )

    # In a run of January's prices, the check looks at January only, which is good again.
    january_run = dg.materialize(
        [assets["prices"], *checks.values()],
        selection=[assets["prices"].key],
        resources=resources,
        instance=instance,
        partition_key=JANUARY,
    )
    january_only = _evaluations(january_run)["bars_well_formed"]
    assert january_only.passed
    assert january_only.metadata["partitions_checked"].value == 1
    assert january_only.metadata["bars_checked"].value == january


class HighBelowClosePriceSource(PriceSource):
    """Serves the sample bars with one bar's high pushed below its close."""

    def fetch(self, windows: Sequence[BarWindow]) -> list[FetchedBars | PriceDataError]:
        fetched = FilesPriceSource().fetch(windows)
        for result in fetched:
            if isinstance(result, FetchedBars) and len(result.bars):
                result.bars.iloc[3, result.bars.columns.get_loc("high")] = (
                    result.bars["close"].iloc[3] - 1.0
                )
        return fetched


def test_a_failed_price_check_blocks_features_in_the_same_run(crypto, mongo, instance, database):
    assets, checks = crypto
    result = dg.materialize(
        [assets["prices"], assets["features"], *checks.values()],
        selection=[assets["prices"].key, assets["features"].key],
        resources={"mongo": mongo, "price_source": HighBelowClosePriceSource()},
        instance=instance,
        partition_key=JANUARY,
        raise_on_error=False,
    )
    evaluation = _evaluations(result)["bars_well_formed"]
    assert not evaluation.passed
    assert "break 'high is the bar's maximum'" in evaluation.description
    assert database["price_bars"].count_documents({}) == 1
    assert result.asset_materializations_for_node(assets["features"].op.name) == []
    assert database["bar_features"].count_documents({}) == 0


def _store_model(database, version: str, sequence: int, payload: bytes) -> str:
    blob_id = gridfs.GridFSBucket(database, "model_blobs").upload_from_stream(version, payload)
    sha256 = hashlib.sha256(payload).hexdigest()
    database["models"].insert_one(
        {
            "_id": version,
            "market": "CRYPTO",
            "interval": "1h",
            "sequence": sequence,
            "sha256": sha256,
            "blob_id": blob_id,
        }
    )
    return sha256


def _anomaly(number: int, partition_key: str, version: str, sha256: str) -> dict:
    return {
        "_id": f"SYNX-USD|1h|2025-02-01T{number:02d}:00:00Z",
        "market": "CRYPTO",
        "interval": "1h",
        "ticker": "SYNX-USD",
        "partition_key": partition_key,
        "model_version": version,
        "model_hash": sha256,
    }


def test_anomalies_must_reference_a_stored_model(crypto, resources, instance, database):
    good_hash = _store_model(database, "CRYPTO-1h-1", 1, b"model one")
    gone_hash = _store_model(database, "CRYPTO-1h-2", 2, b"model two")
    database["anomalies"].insert_many(
        [_anomaly(n, FEBRUARY, "CRYPTO-1h-1", good_hash) for n in range(3)]
    )

    passing = _run_checks(crypto, ["models_on_record"], resources, instance)["models_on_record"]
    assert passing.passed
    assert passing.metadata["anomalies_checked"].value == 3

    database["anomalies"].insert_many(
        [
            _anomaly(10, FEBRUARY, "CRYPTO-1h-9", "0" * 64),
            _anomaly(11, FEBRUARY, "CRYPTO-1h-1", "f" * 64),
            _anomaly(12, FEBRUARY, "CRYPTO-1h-2", gone_hash),
            _anomaly(13, JANUARY, "CRYPTO-1h-9", "0" * 64),
        ]
    )
    (record,) = database["models"].find({"_id": "CRYPTO-1h-2"})
    gridfs.GridFSBucket(database, "model_blobs").delete(record["blob_id"])

    failing = _run_checks(crypto, ["models_on_record"], resources, instance)["models_on_record"]
    assert not failing.passed
    assert failing.metadata["anomalies_checked"].value == 7
    assert failing.description == (
        f"1 anomalies reference model CRYPTO-1h-1 with hash ffffffffffff, but the stored "
        f"CRYPTO-1h-1 hashes to {good_hash[:12]}; "
        "1 anomalies reference model CRYPTO-1h-2, whose bytes are gone; "
        "2 anomalies reference model CRYPTO-1h-9, which is not stored"
    )
