"""The main command end to end, as a user runs it: ``anomaly-pipeline demo`` in a fresh folder.

Also says which known events the sample's models find: the planted 15m price shocks and volume
spikes, and the largest real moves of Microsoft's daily history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_pipeline.settings import SAMPLE_DATA_DIR

CLI = str(Path(sys.executable).parent / "anomaly-pipeline")


def _cli(folder: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DAGSTER_HOME"}
    env["ANOMALY_PIPELINE_HOME"] = str(folder / ".anomaly_pipeline")
    return subprocess.run(
        [CLI, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    first = _cli(folder, "demo")
    assert first.returncode == 0, first.stderr[-3000:]
    yield folder, first.stdout
    _cli(folder, "db", "stop")


def _stored(folder: Path) -> list[dict]:
    listing = _cli(folder, "anomalies", "--json", "--limit", "0")
    assert listing.returncode == 0, listing.stderr
    return json.loads(listing.stdout)


@pytest.mark.slow
def test_demo_prints_the_summary_a_user_needs(demo_folder):
    folder, output = demo_folder
    for expected in (
        "Sample universe",
        "  US      America/New_York  1d       MSFT",
        "Anomalies per ticker and interval",
        "Top 10 anomalies",
        "US-1d-1        sha256 ",
        "SET-15m-1      sha256 ",
        "CRYPTO-1h-1    sha256 ",
        f"data in {folder / '.anomaly_pipeline' / 'mongodb'}",
        f'DAGSTER_HOME="{folder / ".anomaly_pipeline" / "dagster"}" dagster dev -w workspace.yaml',
    ):
        assert expected in output
    assert "mongodb://" not in output


@pytest.mark.slow
def test_anomalies_json_is_one_array_of_whole_documents(demo_folder):
    folder, _ = demo_folder
    documents = _stored(folder)
    scores = [d["anomaly_score"] for d in documents]
    assert scores == sorted(scores, reverse=True)
    top = documents[0]
    assert set(top) >= {
        "_id", "ticker", "interval", "market", "timestamp", "open", "high", "low", "close",
        "volume", "anomaly_score", "features", "model_version", "model_hash",
        "detection_run_id", "created_at", "updated_at",
    }  # fmt: skip
    assert top["_id"] == f"{top['ticker']}|{top['interval']}|{top['timestamp']}"
    assert top["timestamp"].endswith("Z") and top["created_at"].endswith("Z")
    assert len(top["features"]) == 14 and len(top["model_hash"]) == 64

    limited = json.loads(
        _cli(folder, "anomalies", "--json", "--ticker", "MSFT", "--limit", "3").stdout
    )
    assert [d["_id"] for d in limited] == [d["_id"] for d in documents if d["ticker"] == "MSFT"][:3]


@pytest.mark.slow
def test_planted_shocks_and_spikes_are_found_near_the_top(demo_folder):
    folder, _ = demo_folder
    documents = _stored(folder)
    planted = pd.read_csv(SAMPLE_DATA_DIR / "planted_anomalies.csv")
    for row in planted[planted["interval"] == "15m"].itertuples():
        ranked = [
            d["_id"] for d in documents if d["ticker"] == row.ticker and d["interval"] == "15m"
        ]
        planted_id = f"{row.ticker}|15m|{row.timestamp}"
        if row.kind in ("price_shock", "volume_spike"):
            assert planted_id in ranked[:10], (row.kind, planted_id)
    # Range blow-outs with an unchanged close move only two of the 14 features; the models do
    # not reliably flag them at a 1% rate, which the README states.


@pytest.mark.slow
def test_largest_real_msft_moves_are_flagged(demo_folder):
    folder, _ = demo_folder
    msft = [d["_id"] for d in _stored(folder) if d["ticker"] == "MSFT"]
    bars = pd.read_csv(SAMPLE_DATA_DIR / "MSFT_1d.csv", index_col="timestamp")
    largest = np.log(bars["close"]).diff().abs().sort_values(ascending=False).index[:5]
    largest_ids = [f"MSFT|1d|{stamp}" for stamp in largest]
    assert largest_ids[0] == "MSFT|1d|1987-10-19T04:00:00Z"  # Black Monday
    assert msft[0] == largest_ids[0]
    assert set(largest_ids) <= set(msft[:40])


@pytest.mark.slow
def test_second_demo_run_moves_only_run_id_and_update_time(demo_folder):
    folder, _ = demo_folder
    before = {d["_id"]: d for d in _stored(folder)}
    second = _cli(folder, "demo")
    assert second.returncode == 0, second.stderr[-3000:]
    after = {d["_id"]: d for d in _stored(folder)}
    assert set(after) == set(before)
    for document_id, old in before.items():
        new = after[document_id]
        changed = {key for key in old if old[key] != new[key]}
        assert changed == {"detection_run_id", "updated_at"}, (document_id, changed)
