"""``anomaly-pipeline backfill``: planning, argument checks, left-out partitions, and a real
partition backfill through ``dagster dev`` compared with one-partition runs on the same bars."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.assets import build_pipeline_assets
from anomaly_pipeline.backfills.plan import BackfillRequestError, plan_backfill
from anomaly_pipeline.backfills.webserver import DagsterWebserver
from anomaly_pipeline.cli import main
from anomaly_pipeline.features import compute_features
from anomaly_pipeline.modeling.model_store import ModelStore, ModelStoreResource
from anomaly_pipeline.modeling.training import FOREST_PARAMS, train_model
from anomaly_pipeline.partitions import bar_partitions, bar_windows, window_dimension
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.sample_data.synthetic_daily import (
    session_stamps,
    synthetic_daily_bars,
    synthetic_tickers,
    write_daily_files,
)
from anomaly_pipeline.storage.bar_store import bars_from_document
from anomaly_pipeline.storage.mongo import ANOMALIES, BAR_FEATURES, PRICE_BARS, MongoResource
from anomaly_pipeline.universe import Universe, load_universe
from anomaly_pipeline_tests.dagster_dev import dagster_dev, free_port

NOW = pd.Timestamp("2026-12-03T12:00:00Z")
TICKERS = synthetic_tickers(2)
BARS_START = pd.Timestamp("2023-01-01")
BARS_END = pd.Timestamp.now().normalize() - pd.Timedelta(days=1)
# The source in the backfill test cannot deliver this partition; the webserver's source can.
UNREACHABLE_PARTITION = f"{TICKERS[1]}|2024"
ANOMALY_FIELDS = ("_id", "ticker", "timestamp", "anomaly_score", "threshold", "features")


def write_universe(folder: Path, history_start_1d: str, tickers: list[str]) -> Path:
    path = folder / "universe.yaml"
    path.write_text(
        f'history_start:\n  1d: "{history_start_1d}"\n  1h: "2025-01-01"\n  15m: "2025-01-01"\n'
        "markets:\n"
        "  US:\n"
        "    timezone: America/New_York\n"
        "    calendar: XNYS\n"
        "    intervals: [1d]\n"
        f"    tickers: [{', '.join(tickers)}]\n"
        "  CRYPTO:\n"
        "    timezone: UTC\n"
        "    calendar: null\n"
        "    intervals: [15m, 1h]\n"
        "    tickers: [SYNX-USD]\n"
    )
    return path


class PartlyUnreachableSource(FilesPriceSource):
    """Bar files, except for partitions named in ``unreachable``, which it says it never has."""

    unreachable: list[str] = []

    def unreachable_reason(self, window: BarWindow, now: pd.Timestamp | None = None) -> str | None:
        if str(window.partition_key) in self.unreachable:
            return f"the archive of {window.ticker} holds nothing for {window.partition_key}"
        return None

    def fetch(self, windows):
        return [
            window.error(reason) if (reason := self.unreachable_reason(window)) else result
            for window, result in zip(windows, super().fetch(windows), strict=True)
        ]


@pytest.fixture
def backfill_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A universe of two synthetic daily tickers from 2024 and their bar files."""
    bars = tmp_path / "bars"
    write_daily_files(
        bars,
        TICKERS,
        calendar="XNYS",
        timezone="America/New_York",
        start=BARS_START,
        end=BARS_END,
    )
    universe = write_universe(tmp_path, "2024-01-01", TICKERS)
    monkeypatch.setenv("ANOMALY_PIPELINE_UNIVERSE", str(universe))
    monkeypatch.setenv("ANOMALY_PIPELINE_FILES_DIR", str(bars))
    monkeypatch.delenv("ANOMALY_PIPELINE_PRICE_SOURCE", raising=False)
    return tmp_path


def test_spans_count_back_from_the_current_window_and_stop_at_history_start(tmp_path: Path):
    universe = load_universe(write_universe(tmp_path, "2019-01-01", TICKERS))
    source = FilesPriceSource(directory=str(tmp_path))

    ten_years = plan_backfill(universe, "us", "1d", "10y", ["prices"], source, now=NOW)
    five_years = plan_backfill(universe, "US", "1d", "5y", ["prices"], source, now=NOW)
    hourly = plan_backfill(universe, "CRYPTO", "1h", "5y", ["prices"], source, now=NOW)

    # Ten yearly windows would reach 2017; history starts in 2019.
    assert ten_years.window_keys == [str(year) for year in range(2019, 2027)]
    assert five_years.window_keys == ["2022", "2023", "2024", "2025", "2026"]
    assert five_years.partition_keys == [
        f"{ticker}|{year}" for ticker in TICKERS for year in range(2022, 2027)
    ]
    assert hourly.window_keys[0] == "2025-01" and hourly.window_keys[-1] == "2026-12"
    assert len(hourly.window_keys) == 24
    assert [key.to_user_string() for key in five_years.asset_keys] == ["us/1d/prices"]


def test_plan_rejects_markets_and_intervals_the_universe_does_not_watch(tmp_path: Path):
    universe = load_universe(write_universe(tmp_path, "2019-01-01", TICKERS))
    source = FilesPriceSource(directory=str(tmp_path))

    with pytest.raises(BackfillRequestError, match=r"unknown market 'EU'.*markets: US, CRYPTO"):
        plan_backfill(universe, "EU", "1d", "5y", ["prices"], source, now=NOW)
    with pytest.raises(BackfillRequestError, match=r"US is not watched at 1h.*intervals: 1d"):
        plan_backfill(universe, "US", "1h", "5y", ["prices"], source, now=NOW)
    with pytest.raises(BackfillRequestError, match=r"unknown interval '4h'"):
        plan_backfill(universe, "US", "4h", "5y", ["prices"], source, now=NOW)


def test_cli_names_the_url_and_the_dagster_dev_command_when_no_webserver_answers(
    backfill_env: Path, capsys: pytest.CaptureFixture
):
    port = free_port()
    code = main(
        [
            "backfill", "--market", "US", "--interval", "1d", "--window", "5y",
            "--url", f"http://127.0.0.1:{port}",
        ]
    )  # fmt: skip

    error = capsys.readouterr().err
    assert code == 1
    assert f"no Dagster webserver answers at http://127.0.0.1:{port}" in error
    assert f"dagster dev -m anomaly_pipeline.definitions -h 127.0.0.1 -p {port}" in error


def test_cli_rejects_unknown_markets_intervals_and_stages(
    backfill_env: Path, capsys: pytest.CaptureFixture
):
    base = ["backfill", "--window", "5y", "--dry-run"]

    assert main([*base, "--market", "EU", "--interval", "1d"]) == 1
    assert "unknown market 'EU'" in capsys.readouterr().err
    assert main([*base, "--market", "CRYPTO", "--interval", "1d"]) == 1
    assert "CRYPTO is not watched at 1d in the universe file; its intervals: 15m, 1h" in (
        capsys.readouterr().err
    )
    assert main([*base, "--market", "US", "--interval", "1d", "--assets", "model"]) == 1
    assert "the model is not partitioned" in capsys.readouterr().err
    assert main([*base, "--market", "US", "--interval", "1d", "--assets", "prices,charts"]) == 1
    assert "--assets takes a comma-separated list" in capsys.readouterr().err


def test_cli_leaves_out_partitions_the_configured_source_cannot_deliver(
    backfill_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    unreachable = [f"{TICKERS[0]}|2024", f"{TICKERS[1]}|2024", f"{TICKERS[1]}|2025"]
    source = PartlyUnreachableSource(directory=str(backfill_env / "bars"), unreachable=unreachable)
    monkeypatch.setattr("anomaly_pipeline.resources.build_price_source", lambda: source)

    code = main(
        [
            "backfill", "--market", "US", "--interval", "1d", "--window", "all",
            "--assets", "prices,features", "--dry-run",
        ]
    )  # fmt: skip

    out = capsys.readouterr().out
    assert code == 0
    assert "windows 2024 to 2026 (3) x 2 ticker(s) = 6 partition(s)" in out
    assert "left out 3 of 6 partition(s) that PartlyUnreachableSource cannot deliver" in out
    assert (
        f"2024 of {TICKERS[0]}, {TICKERS[1]}: the archive of {TICKERS[1]} holds nothing for "
        f"{TICKERS[1]}|2024" in out
    )
    assert (
        f"2025 of {TICKERS[1]}: the archive of {TICKERS[1]} holds nothing for "
        f"{TICKERS[1]}|2025" in out
    )
    assert "to launch: 3 partition(s)" in out
    assert "Dry run: nothing launched." in out


def test_cli_leaves_out_15m_windows_beyond_yahoos_reach(
    backfill_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from anomaly_pipeline.resources import build_price_source

    monkeypatch.setenv("ANOMALY_PIPELINE_PRICE_SOURCE", "yfinance")
    universe = load_universe()
    market = universe.markets["CRYPTO"]
    partitions_def = bar_partitions(market, "15m", universe.history_start["15m"])
    keys = [f"SYNX-USD|{key}" for key in window_dimension(partitions_def).get_partition_keys()]
    now = pd.Timestamp.now(tz="UTC")
    reasons = {
        str(window.partition_key): build_price_source().unreachable_reason(window, now)
        for window in bar_windows(partitions_def, keys, market, "15m")
    }
    expected_out = sorted(key for key, reason in reasons.items() if reason)

    code = main(
        [
            "backfill", "--market", "CRYPTO", "--interval", "15m", "--window", "all",
            "--assets", "prices", "--dry-run",
        ]
    )  # fmt: skip

    out = capsys.readouterr().out
    assert code == 0
    # Yahoo serves 15m bars for 60 days: only the newest monthly windows are within reach.
    assert expected_out and len(expected_out) < len(keys)
    assert f"left out {len(expected_out)} of {len(keys)} partition(s)" in out
    first, last = expected_out[0].split("|")[1], expected_out[-1].split("|")[1]
    span = first if first == last else f"{first} to {last} ({len(expected_out)} windows)"
    assert f"{span} of SYNX-USD: Yahoo serves 15m bars only for the last 60 days" in out
    assert f"to launch: {len(keys) - len(expected_out)} partition(s)" in out


def test_cli_adds_the_model_only_when_the_market_has_none(
    backfill_env: Path,
    mongo: MongoResource,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    monkeypatch.setenv("MONGODB_URI", mongo.uri)
    monkeypatch.setenv("ANOMALY_PIPELINE_DATABASE", mongo.database)
    args = ["backfill", "--market", "US", "--interval", "1d", "--window", "5y", "--dry-run"]

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "assets: us/1d/prices -> us/1d/features -> us/1d/model -> us/1d/anomalies" in out
    assert "no US 1d model yet: us/1d/model is included" in out

    assert main([*args, "--assets", "features,anomalies"]) == 1
    assert "US 1d has no model yet, so anomalies cannot be scored" in capsys.readouterr().err

    record = _store_a_model(mongo, backfill_env / "bars")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "assets: us/1d/prices -> us/1d/features -> us/1d/anomalies" in out
    assert f"anomalies are scored by the current model {record['_id']}" in out


def _store_a_model(mongo: MongoResource, bars_dir: Path) -> dict:
    bars = pd.read_parquet(bars_dir / f"{TICKERS[0]}_1d.parquet")
    trained = train_model(compute_features(bars).features)
    record, _ = ModelStore(mongo.get_database()).save(
        "US",
        "1d",
        trained,
        training_window={},
        tickers=[TICKERS[0]],
        params=FOREST_PARAMS,
        run_id="test",
    )
    return record


def test_a_ranged_run_with_undeliverable_partitions_fails_naming_each_one(
    backfill_env: Path, resources: dict, instance: dg.DagsterInstance
):
    """What a backfill launched from the UI meets: the run fails, naming every partition."""
    universe = load_universe()
    prices = build_pipeline_assets(universe.markets["US"], "1d", universe)[0]
    unreachable = [f"{TICKERS[0]}|2024", f"{TICKERS[0]}|2026"]
    resources = {
        **resources,
        "price_source": PartlyUnreachableSource(
            directory=str(backfill_env / "bars"), unreachable=unreachable
        ),
    }

    result = dg.materialize(
        [prices],
        resources=resources,
        instance=instance,
        tags={
            ASSET_PARTITION_RANGE_START_TAG: f"{TICKERS[0]}|2024",
            ASSET_PARTITION_RANGE_END_TAG: f"{TICKERS[0]}|2026",
        },
        raise_on_error=False,
    )

    assert not result.success
    [failure] = result.get_step_failure_events()
    description = failure.step_failure_data.user_failure_data.description
    for key in unreachable:
        assert f"{TICKERS[0]} 1d partition {key} [" in description
        assert f"the archive of {TICKERS[0]} holds nothing for {key}" in description
    assert f"{TICKERS[0]}|2025" not in description


@pytest.mark.slow
def test_backfill_through_dagster_dev_matches_one_partition_runs(
    backfill_env: Path,
    mongo_uri: str,
    mongo: MongoResource,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    import os

    database_name = f"backfill_{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "MONGODB_URI": mongo_uri,
        "ANOMALY_PIPELINE_DATABASE": database_name,
        "ANOMALY_PIPELINE_HOME": str(backfill_env / "home"),
    }
    backfill_mongo = MongoResource(uri=mongo_uri, database=database_name)
    monkeypatch.setenv("MONGODB_URI", mongo_uri)
    monkeypatch.setenv("ANOMALY_PIPELINE_DATABASE", database_name)
    source = PartlyUnreachableSource(
        directory=str(backfill_env / "bars"), unreachable=[UNREACHABLE_PARTITION]
    )
    monkeypatch.setattr("anomaly_pipeline.resources.build_price_source", lambda: source)

    try:
        with dagster_dev(backfill_env, env) as server:
            _stop_detection_sensors(DagsterWebserver(server.url))
            code = main(
                [
                    "backfill", "--market", "US", "--interval", "1d", "--window", "5y",
                    "--url", server.url, "--poll-seconds", "2",
                ]
            )  # fmt: skip
            out = capsys.readouterr().out
            assert code == 0, out
            backfill_id = re.search(r"Launched backfill (\w+)", out).group(1)
            runs = _backfill_runs(DagsterWebserver(server.url), backfill_id)
            _check_backfill(out, runs, backfill_mongo.get_database())
            _check_failed_backfill_exits_non_zero_naming_the_partitions(
                server.url, backfill_env / "bars", capsys
            )
        _check_same_anomalies_as_one_partition_runs(
            backfill_mongo.get_database(), mongo, instance, backfill_env / "bars"
        )
    finally:
        backfill_mongo.get_database().client.drop_database(database_name)


def _check_backfill(out: str, runs: list[dict], database) -> None:
    included = [
        f"{ticker}|{year}"
        for ticker in TICKERS
        for year in (2024, 2025, 2026)
        if f"{ticker}|{year}" != UNREACHABLE_PARTITION
    ]
    assert "left out 1 of 6 partition(s)" in out
    assert "to launch: 5 partition(s)" in out
    assert (
        "succeeded: 5 of 5 partitions through prices, features, model, anomalies in 5 run(s)" in out
    )

    # Two tickers and three windows: Dagster cuts ranges along the window dimension, one run per
    # ticker; prices and features share a run because the whole selection fits in one.
    summary = sorted((run["assets"], run["range"]) for run in runs if run["status"] == "SUCCESS")
    assert len(runs) == 5
    assert summary == [
        (("us/1d/anomalies",), (f"{TICKERS[0]}|2024", f"{TICKERS[0]}|2026")),
        (("us/1d/anomalies",), (f"{TICKERS[1]}|2025", f"{TICKERS[1]}|2026")),
        (("us/1d/features", "us/1d/prices"), (f"{TICKERS[0]}|2024", f"{TICKERS[0]}|2026")),
        (("us/1d/features", "us/1d/prices"), (f"{TICKERS[1]}|2025", f"{TICKERS[1]}|2026")),
        (("us/1d/model",), (None, None)),
    ]

    stored = {doc["partition_key"]: doc for doc in database[PRICE_BARS].find()}
    assert sorted(stored) == sorted(included)
    stamps = session_stamps("XNYS", "America/New_York", BARS_START, BARS_END)
    for key in included:
        ticker, year = key.split("|")
        bars = synthetic_daily_bars(ticker, stamps)
        expected = bars[bars.index.tz_convert("America/New_York").year == int(year)]
        assert stored[key]["bar_count"] == len(expected)
        pd.testing.assert_frame_equal(bars_from_document(stored[key]), expected, check_freq=False)
    assert sorted(doc["partition_key"] for doc in database[BAR_FEATURES].find()) == sorted(included)


def _check_failed_backfill_exits_non_zero_naming_the_partitions(
    url: str, bars_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """The webserver's source cannot deliver a ticker whose file went missing: as from the UI,
    the run fails, and the command exits non-zero, naming each partition and the reason."""
    bar_file = bars_dir / f"{TICKERS[0]}_1d.parquet"
    bar_file.rename(bar_file.with_suffix(".hidden"))
    try:
        code = main(
            [
                "backfill", "--market", "US", "--interval", "1d", "--window", "5y",
                "--assets", "prices", "--url", url, "--poll-seconds", "2",
            ]
        )  # fmt: skip
    finally:
        bar_file.with_suffix(".hidden").rename(bar_file)
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "ended COMPLETED_FAILED: 2 of 5 partitions done, 3 failed; 2 run(s), 1 failed" in (
        captured.err
    )
    for year in (2024, 2025, 2026):
        assert (
            f"{TICKERS[0]} 1d partition {TICKERS[0]}|{year} [{year}-01-01T05:00:00+00:00, "
            f"{year + 1}-01-01T05:00:00+00:00): no file {TICKERS[0]}_1d.csv or .parquet in "
            f"{bars_dir}" in captured.err
        )


def _check_same_anomalies_as_one_partition_runs(
    backfill_database, mongo: MongoResource, instance: dg.DagsterInstance, bars_dir: Path
) -> None:
    universe: Universe = load_universe()
    assets = dict(
        zip(
            ("prices", "features", "model", "anomalies"),
            build_pipeline_assets(universe.markets["US"], "1d", universe),
            strict=True,
        )
    )
    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(directory=str(bars_dir)),
    }
    keys = sorted(doc["partition_key"] for doc in backfill_database[PRICE_BARS].find())
    for stage in ("prices", "features"):
        for key in keys:
            dg.materialize(
                [assets[stage]], partition_key=key, resources=resources, instance=instance
            )
    dg.materialize([assets["model"]], resources=resources, instance=instance)
    for key in keys:
        dg.materialize(
            [assets["anomalies"]], partition_key=key, resources=resources, instance=instance
        )

    def anomalies(database) -> list[dict]:
        return [
            {field: doc[field] for field in ANOMALY_FIELDS}
            for doc in database[ANOMALIES].find(sort=[("_id", 1)])
        ]

    from_backfill = anomalies(backfill_database)
    assert from_backfill, "the synthetic shocks should give anomalies"
    assert from_backfill == anomalies(mongo.get_database())
    assert {doc["trigger"] for doc in backfill_database[ANOMALIES].find()} == {"backfill"}
    backfill_model = ModelStore(backfill_database).current_record("US", "1d")
    assert (
        backfill_model["sha256"]
        == ModelStore(mongo.get_database()).current_record("US", "1d")["sha256"]
    )


_SENSORS = """
query Sensors {
  workspaceOrError {
    ... on Workspace {
      locationEntries {
        locationOrLoadError {
          ... on RepositoryLocation { repositories { sensors { id name } } }
        }
      }
    }
  }
}
"""


def _stop_detection_sensors(webserver: DagsterWebserver) -> None:
    """The detection sensors also score partitions whose bars were just stored; stopped here so
    that every anomaly comes from the backfill under test."""
    answer = webserver.graphql(_SENSORS, {})
    sensors = [
        sensor
        for entry in answer["workspaceOrError"]["locationEntries"]
        for repository in (entry["locationOrLoadError"] or {}).get("repositories", [])
        for sensor in repository["sensors"]
        if sensor["name"].startswith("detect_")
    ]
    for sensor in sensors:
        result = webserver.graphql(
            "mutation($id: String!) { stopSensor(id: $id) { __typename } }", {"id": sensor["id"]}
        )
        assert result["stopSensor"]["__typename"] == "StopSensorMutationResult"


_BACKFILL_RUNS = """
query BackfillRuns($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    ... on PartitionBackfill {
      runs(limit: 1000) { runId status assetSelection { path } tags { key value } }
    }
  }
}
"""


def _backfill_runs(webserver: DagsterWebserver, backfill_id: str) -> list[dict]:
    answer = webserver.graphql(_BACKFILL_RUNS, {"backfillId": backfill_id})
    runs = []
    for run in answer["partitionBackfillOrError"]["runs"]:
        tags = {tag["key"]: tag["value"] for tag in run["tags"]}
        runs.append(
            {
                "status": run["status"],
                "assets": tuple(sorted("/".join(key["path"]) for key in run["assetSelection"])),
                "range": (
                    tags.get(ASSET_PARTITION_RANGE_START_TAG),
                    tags.get(ASSET_PARTITION_RANGE_END_TAG),
                ),
            }
        )
    return runs
