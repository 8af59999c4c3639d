"""Ingestion of a ranged run through the real prices asset, with a source that misbehaves.

The source below implements the real ``PriceSource`` interface: it serves the shipped files,
but answers at most ``quota`` windows per call before reporting a rate limit, and fails chosen
partitions outright, the way a remote source does on a bad day.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.prices.frames import PriceDataError, RateLimitedError
from anomaly_pipeline.prices.source import BarWindow, FetchedBars, PriceSource
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.storage.bar_store import bars_from_document
from anomaly_pipeline_tests.pipeline_runs import pipeline_assets

TICKERS = ("SYNA.BK", "SYNB.BK", "SYNC.BK")
WINDOWS = ("2025-01", "2025-02", "2025-03")
ALL_PARTITIONS = [f"{t}|{w}" for t in TICKERS for w in WINDOWS]


class FlakyPriceSource(PriceSource):
    """The shipped files behind a rate limit and a list of partitions that always fail."""

    directory: str = str(SAMPLE_DATA_DIR)
    quota: int = 1_000
    failing: list[str] = Field(default_factory=list)
    # One line per fetch call, holding the partition keys asked for.
    call_log: str

    def fetch(self, windows: Sequence[BarWindow]) -> list[FetchedBars | PriceDataError]:
        with open(self.call_log, "a") as log:
            log.write(",".join(str(w.partition_key) for w in windows) + "\n")
        files = FilesPriceSource(directory=self.directory)
        results: list[FetchedBars | PriceDataError] = []
        for served, window in enumerate(windows):
            if served >= self.quota:
                results.append(
                    RateLimitedError(
                        window.ticker, window.interval, window.describe(), "429 Too Many Requests"
                    )
                )
            elif str(window.partition_key) in self.failing:
                results.append(window.error("the source answered 500 Internal Server Error"))
            else:
                results.extend(files.fetch([window]))
        return results


def _ingest(sample_universe, resources, instance, source) -> dg.ExecuteInProcessResult:
    """One ranged run of the prices asset over all nine partitions."""
    return dg.materialize(
        [pipeline_assets(sample_universe, "SET", "1h")["prices"]],
        tags={
            "dagster/asset_partition_range_start": ALL_PARTITIONS[0],
            "dagster/asset_partition_range_end": ALL_PARTITIONS[-1],
        },
        resources={**resources, "price_source": source},
        instance=instance,
        raise_on_error=False,
    )


def _stored(database) -> dict[str, dict]:
    return {d["partition_key"]: d for d in database["price_bars"].find({"interval": "1h"})}


def test_partial_failures_are_reported_and_nothing_stored_is_lost(
    sample_universe, resources, instance, database, tmp_path
):
    calls = tmp_path / "calls.txt"
    first = _ingest(sample_universe, resources, instance, FlakyPriceSource(call_log=str(calls)))
    assert first.success
    before = _stored(database)
    assert sorted(before) == sorted(ALL_PARTITIONS)
    state_before = {t: DetectionState(database).get(t, "1h") for t in TICKERS}

    # Every bar's volume is revised, so each partition the second run stores visibly changes.
    revised_dir = tmp_path / "revised"
    shutil.copytree(SAMPLE_DATA_DIR, revised_dir)
    for ticker in TICKERS:
        path = revised_dir / f"{ticker}_1h.csv"
        frame = pd.read_csv(path)
        frame["volume"] += 1
        frame.to_csv(path, index=False)
    flaky = FlakyPriceSource(
        directory=str(revised_dir), quota=6, failing=["SYNA.BK|2025-02"], call_log=str(calls)
    )
    second = _ingest(sample_universe, resources, instance, flaky)
    assert not second.success

    # One fetch call per run, holding every window of the run.
    assert [line.split(",") for line in Path(calls).read_text().splitlines()] == [
        ALL_PARTITIONS,
        ALL_PARTITIONS,
    ]

    failed = ["SYNA.BK|2025-02", "SYNC.BK|2025-01", "SYNC.BK|2025-02", "SYNC.BK|2025-03"]
    (failure,) = second.get_step_failure_events()
    message = failure.step_failure_data.error.message
    for key in failed:
        ticker = key.split("|")[0]
        assert f"{ticker} 1h partition {key} [" in message
    assert "429 Too Many Requests" in message
    assert "500 Internal Server Error" in message

    after = _stored(database)
    assert sorted(after) == sorted(ALL_PARTITIONS)
    for key in ALL_PARTITIONS:
        if key in failed:
            # Untouched: the same document, down to the run that wrote it.
            assert after[key] == before[key]
        else:
            assert after[key]["run_id"] == second.run_id
            revised, original = bars_from_document(after[key]), bars_from_document(before[key])
            assert (revised["volume"] == original["volume"] + 1).all()
            assert revised.index.equals(original.index)

    # Only the partitions that were stored anew wait for detection.
    for ticker in TICKERS:
        state = DetectionState(database).get(ticker, "1h")
        for window in WINDOWS:
            key = f"{ticker}|{window}"
            changed = (
                state["windows"][window]["changes"]
                - state_before[ticker]["windows"][window]["changes"]
            )
            assert changed == (0 if key in failed else 1), key
