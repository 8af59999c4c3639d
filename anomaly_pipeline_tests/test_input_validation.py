"""Everything a person types reaches the pipeline validated, with an error that names the place.

- The universe file: each bad market entry is reported with the file and the key at fault, and
  the other markets still load, in Python and in the Dagster UI, where the ``universe`` asset
  says why an entry is missing.
- Command-line arguments and run configuration: an error that names the argument or field.
- A run that fails part-way: no stored document is lost or half-written. Partitions stored
  before the failure hold their complete new data and show as materialized; the failed
  partition and those never reached keep their previous documents and show as failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.cli import main as cli_main
from anomaly_pipeline.definitions import build_definitions
from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.prices.frames import PriceDataError
from anomaly_pipeline.prices.source import BarWindow, FetchedBars
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.storage.local_server import LocalMongoServer
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import UniverseError, load_universe
from anomaly_pipeline.universe_assets import UNIVERSE_ASSET_KEY
from anomaly_pipeline_tests.pipeline_runs import materialize_range, pipeline_assets, train

GOOD_US = "  US: {timezone: America/New_York, calendar: XNYS, intervals: [1d], tickers: [MSFT]}\n"


def write_universe(directory: Path, markets: str, head: str = "") -> Path:
    path = directory / "universe.yaml"
    path.write_text(f"{head}markets:\n{GOOD_US}{markets}")
    return path


# --- The universe file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (
            "  BAD: {timezone: Mars/Olympus, intervals: [1d], tickers: [ABC]}\n",
            "markets.BAD.timezone: unknown timezone 'Mars/Olympus'",
        ),
        (
            "  BAD: {intervals: [1d], tickers: [ABC]}\n",
            "markets.BAD.timezone: required, e.g. America/New_York",
        ),
        (
            "  BAD: {timezone: UTC, calendar: XMARS, intervals: [1d], tickers: [ABC]}\n",
            "markets.BAD.calendar: unknown exchange calendar 'XMARS'",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [1d, 5m], tickers: [ABC]}\n",
            "markets.BAD.intervals: unknown interval '5m'; expected 15m, 1h, 1d",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [{1d: daily}], tickers: [ABC]}\n",
            "markets.BAD.intervals: unknown interval {'1d': 'daily'}",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [1d]}\n",
            "markets.BAD.tickers: expected a non-empty list of symbols",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [1d], tickers: [abc]}\n",
            "markets.BAD.tickers: 'abc' is not a Yahoo symbol",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [1d], tickers: ['A|B']}\n",
            "markets.BAD.tickers: 'A|B' is not a Yahoo symbol",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [1d], tickers: [A...B]}\n",
            "markets.BAD.tickers: 'A...B' holds '...'",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [1d], tickers: [ABC, ABC]}\n",
            "markets.BAD.tickers: ABC is listed twice",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [1d], tickers: [MSFT]}\n",
            "markets.BAD.tickers: MSFT is already listed under markets.US",
        ),
        (
            "  BAD: {timezone: Asia/Bangkok, ticker_suffix: .BK, intervals: [1h], "
            "tickers: [PTT]}\n",
            "markets.BAD.tickers: PTT lacks the market suffix '.BK'",
        ),
        (
            "  BAD: {timezone: UTC, intervals: [1d], tikcers: [ABC]}\n",
            "markets.BAD.tikcers: unknown key",
        ),
        ("  BAD: [UTC, 1d, ABC]\n", "markets.BAD: expected a mapping"),
        (
            "  BAD:\n    timezone: UTC\n    intervals: [1d]\n    tickers: [ABC]\n"
            "    timezone: Asia/Tokyo\n",
            "markets.BAD.timezone is given 2 times (lines 4, 7); keep one",
        ),
    ],
)
def test_a_bad_market_entry_names_file_and_key_and_the_others_load(tmp_path, entry, error):
    path = write_universe(tmp_path, entry)
    universe = load_universe(path)
    assert list(universe.markets) == ["US"]
    assert universe.markets["US"].tickers == ("MSFT",)
    assert set(universe.errors) == {"BAD"}
    assert universe.errors["BAD"].startswith(f"{path.resolve()}: {error}")


def test_a_market_given_twice_is_not_guessed_at(tmp_path):
    path = write_universe(
        tmp_path,
        "  TWICE: {timezone: UTC, intervals: [1d], tickers: [AAA]}\n"
        "  TWICE: {timezone: UTC, intervals: [1h], tickers: [BBB]}\n",
    )
    universe = load_universe(path)
    assert list(universe.markets) == ["US"]
    assert universe.errors == {
        "TWICE": f"{path.resolve()}: markets.TWICE is given 2 times (lines 3, 4); keep one"
    }


def test_market_names_differing_only_in_case_would_share_asset_keys(tmp_path):
    path = write_universe(tmp_path, "  us: {timezone: UTC, intervals: [1d], tickers: [ABC]}\n")
    universe = load_universe(path)
    assert list(universe.markets) == ["US"]
    assert universe.errors == {
        "us": f"{path.resolve()}: markets.us: same name as markets.US apart from case"
    }


def test_index_symbols_and_pairs_are_accepted(tmp_path):
    path = write_universe(
        tmp_path,
        "  IDX: {timezone: UTC, intervals: [1d], tickers: [^GSPC, EURUSD=X, BRK-B, 0700.HK]}\n",
    )
    universe = load_universe(path)
    assert universe.errors == {}
    assert universe.markets["IDX"].tickers == ("^GSPC", "EURUSD=X", "BRK-B", "0700.HK")


def test_file_level_mistakes_are_reported_and_markets_still_load(tmp_path):
    path = write_universe(
        tmp_path, "", head="history_start: {1d: '1986-13-01', 5m: '2024-01-01'}\nhistroy: x\n"
    )
    universe = load_universe(path)
    assert list(universe.markets) == ["US"]
    where = str(path.resolve())
    assert universe.errors == {
        "history_start": (
            f"{where}: history_start.1d: '1986-13-01' is not a date; "
            f"{where}: history_start.5m: unknown interval; expected one of 15m, 1h, 1d"
        ),
        "histroy": f"{where}: histroy: unknown key; expected history_start and markets",
    }
    # The default start stands in for the bad one.
    assert universe.history_start["1d"] == pd.Timestamp("1980-01-01")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("markets:\n  US: {timezone: UTC\n", r"not valid YAML: .*line 2, column 7"),
        ("market:\n  US: {timezone: UTC}\n", "expected a top-level 'markets' mapping"),
        ("- US\n- SET\n", "expected a top-level 'markets' mapping"),
    ],
)
def test_a_file_that_cannot_be_read_at_all_names_the_file(tmp_path, text, error):
    path = tmp_path / "universe.yaml"
    path.write_text(text)
    with pytest.raises(UniverseError, match="(?s)" + re.escape(str(path.resolve())) + ": " + error):
        load_universe(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(UniverseError, match=r"nowhere\.yaml: universe file not found"):
        load_universe(tmp_path / "nowhere.yaml")


# --- The universe in the Dagster definitions -----------------------------------------------------


@pytest.fixture
def universe_with_a_bad_market(tmp_path) -> Path:
    return write_universe(
        tmp_path,
        "  BAD: {timezone: Mars/Olympus, intervals: [1h], tickers: [ABC]}\n"
        "  CRYPTO: {timezone: UTC, calendar: null, intervals: [1h], tickers: [SYNX-USD]}\n",
    )


def universe_checks(defs: dg.Definitions) -> list:
    return [
        check
        for check in defs.asset_checks
        if {key.asset_key for key in check.check_keys} == {UNIVERSE_ASSET_KEY}
    ]


def test_definitions_load_the_good_markets_and_show_why_one_is_missing(universe_with_a_bad_market):
    universe = load_universe(universe_with_a_bad_market)
    defs = build_definitions(universe)
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    stages = ("prices", "features", "model", "anomalies")
    assert {f"us/1d/{stage}" for stage in stages} <= keys
    assert {f"crypto/1h/{stage}" for stage in stages} <= keys
    assert not [key for key in keys if key.startswith("bad/")]

    expected = f"{universe_with_a_bad_market.resolve()}: markets.BAD.timezone: unknown timezone"
    universe_asset = defs.resolve_assets_def(UNIVERSE_ASSET_KEY)
    description = universe_asset.descriptions_by_key[UNIVERSE_ASSET_KEY]
    assert "**1 entry was not loaded" in description
    assert f"- **BAD**: {expected} 'Mars/Olympus'" in description
    spec = universe_asset.specs_by_key[UNIVERSE_ASSET_KEY]
    assert spec.metadata["rejected_entries"] == dg.MetadataValue.int(1)

    checks = universe_checks(defs)
    result = dg.materialize([universe_asset, *checks], raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("universe").error.message
    assert "1 entry of" in failure and expected in failure

    checked = dg.materialize(
        [universe_asset, *checks], selection=dg.AssetSelection.checks_for_assets(universe_asset)
    )
    (evaluation,) = checked.get_asset_check_evaluations()
    assert evaluation.passed is False
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert expected in evaluation.metadata["problems"].value


def test_a_clean_universe_materializes_and_passes(tmp_path):
    universe = load_universe(write_universe(tmp_path, ""))
    defs = build_definitions(universe)
    universe_asset = defs.resolve_assets_def(UNIVERSE_ASSET_KEY)
    result = dg.materialize([universe_asset, *universe_checks(defs)])
    (materialization,) = result.asset_materializations_for_node("universe")
    assert "| US " in materialization.metadata["markets"].value
    assert materialization.metadata["tickers"] == dg.MetadataValue.int(1)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.passed is True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


@pytest.fixture
def webserver(tmp_path, universe_with_a_bad_market) -> Iterator[int]:
    """dagster-webserver on the real code location, reading the universe with a bad market."""
    port = _free_port()
    env = {
        **os.environ,
        "ANOMALY_PIPELINE_UNIVERSE": str(universe_with_a_bad_market),
        "ANOMALY_PIPELINE_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
    }
    (tmp_path / "dagster").mkdir()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-webserver"),
            "-m", "anomaly_pipeline.definitions", "-h", "127.0.0.1", "-p", str(port),
        ],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(process.stderr.read().decode()[-3000:]) from None
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()


@pytest.mark.slow
def test_the_ui_loads_the_good_markets_and_shows_the_bad_one(webserver, universe_with_a_bad_market):
    data = _graphql(
        webserver,
        """
        {
          workspaceOrError {
            ... on Workspace {
              locationEntries { name locationOrLoadError { __typename } }
            }
          }
          assetNodes {
            assetKey { path }
            description
            assetChecksOrError { ... on AssetChecks { checks { name } } }
          }
        }
        """,
    )
    (location,) = data["workspaceOrError"]["locationEntries"]
    assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation"

    nodes = {"/".join(node["assetKey"]["path"]): node for node in data["assetNodes"]}
    assert {"us/1d/prices", "us/1d/anomalies", "crypto/1h/prices", "crypto/1h/model"} <= set(nodes)
    assert not [key for key in nodes if key.startswith("bad/")]
    description = nodes["universe"]["description"]
    assert (
        f"- **BAD**: {universe_with_a_bad_market.resolve()}: markets.BAD.timezone: unknown "
        "timezone 'Mars/Olympus'"
    ) in description
    assert nodes["universe"]["assetChecksOrError"]["checks"] == [{"name": "every_entry_loaded"}]


# --- Command-line arguments and run configuration ----------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (["--limit", "-1"], "argument --limit: -1 is negative; use 0 for all"),
        (["--limit", "ten"], "argument --limit: 'ten' is not a whole number"),
        (["--interval", "5m"], "argument --interval: invalid choice: '5m'"),
    ],
)
def test_anomalies_command_names_the_bad_argument(capsys, arguments, error):
    with pytest.raises(SystemExit) as exited:
        cli_main(["anomalies", *arguments])
    assert exited.value.code == 2
    assert f"anomaly-pipeline anomalies: error: {error}" in capsys.readouterr().err


def test_the_installed_command_exits_2_on_a_negative_limit():
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "anomaly-pipeline"), "anomalies", "--limit", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip().endswith("argument --limit: -1 is negative; use 0 for all")


@pytest.fixture
def crypto_1h_features(sample_universe, resources, instance):
    assets = pipeline_assets(sample_universe, "CRYPTO", "1h")
    key = "SYNX-USD|2025-01"
    materialize_range(
        assets, ("prices", "features"), key, key, resources=resources, instance=instance
    )
    return assets


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        (
            {"flag_rate": 0.7},
            "flag_rate",
            "flag_rate must be more than 0 and less than 0.5, got 0.7",
        ),
        (
            {"flag_rate": 0.0},
            "flag_rate",
            "flag_rate must be more than 0 and less than 0.5, got 0.0",
        ),
        (
            {"train_start": "2024-13-45"},
            "train_start",
            "train_start must be an ISO date or date-time such as 2024-01-31, got '2024-13-45'",
        ),
        (
            {"train_end": "yesterday-ish"},
            "train_end",
            "train_end must be an ISO date or date-time such as 2024-01-31, got 'yesterday-ish'",
        ),
        (
            {"train_start": "2025-02-01", "train_end": "2025-01-01"},
            None,
            "train_start (2025-02-01) must be before train_end (2025-01-01)",
        ),
        ({"max_training_rows": 10}, "max_training_rows", "max_training_rows must be at least 500"),
    ],
)
def test_model_config_out_of_range_fails_naming_the_field_and_trains_nothing(
    crypto_1h_features, resources, instance, database, config, field, message
):
    result = dg.materialize(
        [crypto_1h_features["model"]], resources=resources, instance=instance,
        run_config={"ops": {"crypto__1h__model": {"config": config}}}, raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    error = result.failure_data_for_node("crypto__1h__model").error
    text = error.message + (error.cause.message if error.cause else "")
    assert message in text
    if field:
        assert re.search(rf"^{field}$", text, re.MULTILINE), text
    assert database["models"].count_documents({}) == 0


def test_model_config_of_the_wrong_type_is_refused_before_the_run(crypto_1h_features, resources):
    with pytest.raises(dg.DagsterInvalidConfigError, match=r"config:flag_rate\. Value \"high\""):
        dg.materialize(
            [crypto_1h_features["model"]], resources=resources,
            run_config={"ops": {"crypto__1h__model": {"config": {"flag_rate": "high"}}}},
        )  # fmt: skip


def test_a_valid_training_window_with_an_offset_is_read_in_utc(
    crypto_1h_features, resources, instance, database
):
    train(
        crypto_1h_features,
        resources=resources,
        instance=instance,
        run_config={
            "ops": {"crypto__1h__model": {"config": {"train_start": "2025-01-07T07:00+07:00"}}}
        },
    )
    window = database["models"].find_one()["training_window"]
    assert pd.Timestamp(window["requested_start"]) == pd.Timestamp("2025-01-07T00:00Z")
    assert pd.Timestamp(window["first_bar"]) == pd.Timestamp("2025-01-07T00:00Z")


# --- A run that fails part-way ------------------------------------------------------------------

YEARS = ("1987", "1988", "1989", "1990", "1991")
KEYS = [f"MSFT|{year}" for year in YEARS]


class ShiftedPrices(FilesPriceSource):
    """The sample files with volume + 1 on every bar (so rewrites are visible), failing on
    chosen windows the way a source reports a fault, or raising the way a broken one does."""

    fail_on: list[str] = []
    raise_error: bool = False
    stop_server_home: str | None = None
    stop_before: int = -1

    def fetch(self, windows: Sequence[BarWindow]):
        if self.raise_error:
            raise ConnectionError("price server unreachable")
        # Results are handed over one at a time, as a streaming source would.
        return self._stream(windows)

    def _stream(self, windows: Sequence[BarWindow]):
        for number, (window, result) in enumerate(
            zip(windows, super().fetch(windows), strict=True)
        ):
            if number == self.stop_before:
                LocalMongoServer(Path(self.stop_server_home)).stop()
            if window.partition_key in self.fail_on:
                yield window.error("the source answered with an error page")
                continue
            if isinstance(result, PriceDataError):
                yield result
                continue
            bars = result.bars.copy()
            bars["volume"] += 1.0
            yield FetchedBars(window=window, bars=bars, notes=result.notes)


def _price_documents(database) -> dict[str, dict]:
    return {d["partition_key"]: d for d in database["price_bars"].find()}


def _status(instance, asset) -> dict:
    statuses = instance.get_status_by_partition(asset.key, KEYS, asset.partitions_def)
    return {key: statuses[key] for key in KEYS}


@pytest.fixture
def msft_stored(sample_universe, resources, instance, database):
    """Prices of MSFT 1987-1991 stored by a first, successful run."""
    assets = pipeline_assets(sample_universe, "US", "1d")
    materialize_range(
        assets, ("prices",), KEYS[0], KEYS[-1], resources=resources, instance=instance
    )
    before = _price_documents(database)
    assert sorted(before) == KEYS
    return assets, before


RANGE_TAGS = {ASSET_PARTITION_RANGE_START_TAG: KEYS[0], ASSET_PARTITION_RANGE_END_TAG: KEYS[-1]}


def _run_prices(assets, source, mongo, instance) -> dg.ExecuteInProcessResult:
    """One ranged run of the prices of all five years, failures reported, not raised."""
    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": source,
    }
    return dg.materialize(
        [assets["prices"]],
        resources=resources,
        instance=instance,
        tags=RANGE_TAGS,
        raise_on_error=False,
    )


def test_source_failing_on_the_third_of_five_keeps_its_document(
    msft_stored, mongo, database, instance
):
    assets, before = msft_stored
    result = _run_prices(assets, ShiftedPrices(fail_on=[KEYS[2]]), mongo, instance)

    assert not result.success
    message = result.failure_data_for_node("us__1d__prices").error.message
    assert "1 of 5 partition(s) of us/1d/prices were not stored" in message
    assert f"MSFT 1d partition {KEYS[2]} [" in message
    assert "the source answered with an error page" in message

    after = _price_documents(database)
    # The failed partition's document is exactly what the first run stored.
    assert after[KEYS[2]] == before[KEYS[2]]
    # The others hold the new bars, complete: the first run's bars with volume + 1.
    store = BarStore(database)
    for key in (KEYS[0], KEYS[1], KEYS[3], KEYS[4]):
        assert after[key]["run_id"] == result.run_id
        assert after[key]["bar_count"] == before[key]["bar_count"]
        new = store.read_bars("MSFT", "1d", after[key]["window_start"], after[key]["window_end"])
        assert (new["volume"] >= 1.0).all()
    assert _status(instance, assets["prices"]) == {
        KEYS[0]: dg.AssetPartitionStatus.MATERIALIZED,
        KEYS[1]: dg.AssetPartitionStatus.MATERIALIZED,
        KEYS[2]: dg.AssetPartitionStatus.FAILED,
        KEYS[3]: dg.AssetPartitionStatus.MATERIALIZED,
        KEYS[4]: dg.AssetPartitionStatus.MATERIALIZED,
    }


def test_source_raising_changes_nothing_and_fails_every_partition(
    msft_stored, mongo, database, instance
):
    assets, before = msft_stored
    result = _run_prices(assets, ShiftedPrices(raise_error=True), mongo, instance)
    assert not result.success
    assert result.failure_data_for_node("us__1d__prices").error.message.startswith(
        "dagster._core.definitions.events.Failure: ShiftedPrices raised while fetching 5 US 1d "
        f"partition(s), {KEYS[0]} to {KEYS[-1]}: ConnectionError: price server unreachable; "
        "nothing was stored"
    )
    assert _price_documents(database) == before
    assert set(_status(instance, assets["prices"]).values()) == {dg.AssetPartitionStatus.FAILED}


def test_mongodb_going_away_mid_run_keeps_every_document_whole(tmp_path, sample_universe, instance):
    home = tmp_path / "server"
    server = LocalMongoServer(home)
    mongo = MongoResource(
        uri=server.ensure_running(), database="midrun", server_selection_timeout_ms=1500
    )
    assets = pipeline_assets(sample_universe, "US", "1d")
    try:
        first = _run_prices(assets, ShiftedPrices(), mongo, instance)
        assert first.success
        before = _price_documents(mongo.get_database())

        # The server stops after two partitions are written, before the third.
        source = ShiftedPrices(stop_server_home=str(home), stop_before=2)
        source_run = _run_prices(assets, source, mongo, instance)
        assert not source_run.success
        message = source_run.failure_data_for_node("us__1d__prices").error.message
        assert "3 of 5 partition(s) of us/1d/prices were not stored" in message
        assert (
            f"MSFT 1d partition {KEYS[2]}: MongoDB refused or did not answer the write" in message
        )

        restarted = MongoResource(uri=server.ensure_running(), database="midrun")
        after = _price_documents(restarted.get_database())
        for key in KEYS[:2]:
            assert after[key]["run_id"] == source_run.run_id
            assert after[key]["bar_count"] == before[key]["bar_count"]
        for key in KEYS[2:]:
            assert after[key] == before[key]
        assert _status(instance, assets["prices"]) == {
            KEYS[0]: dg.AssetPartitionStatus.MATERIALIZED,
            KEYS[1]: dg.AssetPartitionStatus.MATERIALIZED,
            KEYS[2]: dg.AssetPartitionStatus.FAILED,
            KEYS[3]: dg.AssetPartitionStatus.FAILED,
            KEYS[4]: dg.AssetPartitionStatus.FAILED,
        }
    finally:
        server.stop()


def test_features_failing_on_the_third_partition_keep_the_rest_as_they_were(
    msft_stored, sample_universe, resources, database, instance
):
    assets, _ = msft_stored
    materialize_range(
        assets, ("features",), KEYS[0], KEYS[-1], resources=resources, instance=instance
    )
    features_before = {d["partition_key"]: d for d in database["bar_features"].find()}

    # A zero close stored in 1989: features of that year cannot be computed.
    store = BarStore(database)
    document = _price_documents(database)[KEYS[2]]
    bars = store.read_bars("MSFT", "1d", document["window_start"], document["window_end"])
    bars.iloc[100, bars.columns.get_loc("close")] = 0.0
    window = BarWindow(
        "MSFT", "1d", sample_universe.markets["US"], pd.Timestamp(document["window_start"]),
        pd.Timestamp(document["window_end"]), KEYS[2],
    )  # fmt: skip
    store.write_bars(window, bars, run_id="corrupt", source="test", empty_reason=None)

    result = dg.materialize(
        [assets["features"]],
        resources=resources,
        instance=instance,
        tags=RANGE_TAGS,
        raise_on_error=False,
    )
    assert not result.success
    message = result.failure_data_for_node("us__1d__features").error.message
    stamp = bars.index[100].isoformat()
    assert f"MSFT 1d partition {KEYS[2]}: bar at {stamp} has close=0.0" in message

    after = {d["partition_key"]: d for d in database["bar_features"].find()}
    # 1987 and 1988 were recomputed from unchanged prices: new run, same values.
    for key in KEYS[:2]:
        assert after[key]["run_id"] == result.run_id
        assert after[key]["columns"] == features_before[key]["columns"]
    for key in KEYS[2:]:
        assert after[key] == features_before[key]
    assert _status(instance, assets["features"]) == {
        KEYS[0]: dg.AssetPartitionStatus.MATERIALIZED,
        KEYS[1]: dg.AssetPartitionStatus.MATERIALIZED,
        KEYS[2]: dg.AssetPartitionStatus.FAILED,
        KEYS[3]: dg.AssetPartitionStatus.FAILED,
        KEYS[4]: dg.AssetPartitionStatus.FAILED,
    }
