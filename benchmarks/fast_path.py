"""How long a detection sensor tick takes over 1,000 tickers × 3 intervals.

Sets up, in a temporary folder: the local MongoDB-wire server (SecantusDB, a separate process,
as in production without ``MONGODB_URI``), a persistent Dagster instance, a universe of one
market with 1,000 tickers and the intervals 15m, 1h and 1d, a current model per interval, and
3,000 detection-state documents (one per ticker and interval). One document per interval is
written by the real ``DetectionState`` code and the others are copies of it with their ticker
changed, which keeps the set-up short; every document has the shape the pipeline writes.

It then times whole sensor evaluations (context, resources, queries, cursor) as the daemon runs
them: ticks with nothing new, a tick after one ticker's bars changed, and the first tick of a
fresh cursor, which reads every document once to learn the models in force.

Run: ``python benchmarks/fast_path.py [--repeat 20]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from anomaly_pipeline.assets import build_all_assets
from anomaly_pipeline.automation import build_automation_definitions
from anomaly_pipeline.automation.sensors import detection_sensor_name
from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.model_store import ModelStore, ModelStoreResource
from anomaly_pipeline.modeling.training import train_model
from anomaly_pipeline.partitions import bar_partitions, bar_windows
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.storage.local_server import LocalMongoServer
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import load_universe

TICKERS = [f"T{i:04d}" for i in range(1000)]
INTERVALS = ("15m", "1h", "1d")
WINDOW = {"15m": "2025-06", "1h": "2025-06", "1d": "2025"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="idle ticks to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fast-path-") as folder:
        home = Path(folder)
        server = LocalMongoServer(home / "server")
        try:
            run(home, server.ensure_running(), args.repeat)
        finally:
            server.stop()


def run(home: Path, uri: str, repeat: int) -> None:
    universe_path = home / "universe.yaml"
    universe_path.write_text(
        "history_start:\n  15m: '2025-01-01'\n  1h: '2025-01-01'\n  1d: '2020-01-01'\n"
        "markets:\n  BIG:\n    timezone: UTC\n    calendar: null\n"
        f"    intervals: [{', '.join(INTERVALS)}]\n    tickers: [{', '.join(TICKERS)}]\n"
    )
    universe = load_universe(universe_path)
    mongo = MongoResource(uri=uri, database="fast_path")
    database = mongo.get_database()

    started = time.perf_counter()
    seed(universe, database)
    print(
        f"set-up: {DetectionState(database).collection.count_documents({})} state documents, "
        f"{len(INTERVALS)} models, in {time.perf_counter() - started:.1f} s"
    )

    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(),
    }
    definitions = dg.Definitions.merge(
        dg.Definitions(assets=build_all_assets(universe), resources=resources),
        build_automation_definitions(universe),
    )
    name = detection_sensor_name(universe.markets["BIG"])
    sensor = definitions.resolve_sensor_def(name)

    (home / "dagster").mkdir()
    with dg.DagsterInstance.local_temp(tempdir=str(home / "dagster")) as instance:

        def tick(cursor: str | None):
            began = time.perf_counter()
            with dg.build_sensor_context(
                instance=instance,
                cursor=cursor,
                definitions=definitions,
                sensor_name=name,
                resources=definitions.resources,
            ) as context:
                result = sensor.evaluate_tick(context)
            return result, time.perf_counter() - began

        first, first_seconds = tick(None)
        assert not first.run_requests
        durations = []
        for _ in range(repeat):
            idle, seconds = tick(first.cursor)
            assert not idle.run_requests and idle.cursor == first.cursor
            durations.append(seconds)

        market = universe.markets["BIG"]
        partitions = bar_partitions(market, "1h", universe.history_start["1h"])
        window = bar_windows(partitions, [f"T0500|{WINDOW['1h']}"], market, "1h")[0]
        DetectionState(database).record_ingestion(
            window, bars(window.start, 60, pd.Timedelta(hours=1), seed=99), run_id="benchmark"
        )
        changed, changed_seconds = tick(first.cursor)
        assert [r.partition_key for r in changed.run_requests] == ["T0500|2025-06"]

    print(
        f"idle tick, nothing new ({repeat} ticks): median {statistics.median(durations):.3f} s, "
        f"min {min(durations):.3f} s, max {max(durations):.3f} s (target < 0.5 s)"
    )
    print(f"tick after one ticker's bars changed: {changed_seconds:.3f} s, 1 run request")
    print(f"first tick of a fresh cursor (reads all 3,000 documents): {first_seconds:.3f} s")


def seed(universe, database) -> None:
    market = universe.markets["BIG"]
    state = DetectionState(database)
    for n, interval in enumerate(INTERVALS):
        rng = np.random.default_rng(n)
        features = pd.DataFrame(rng.normal(size=(600, len(FEATURE_NAMES))), columns=FEATURE_NAMES)
        record, _ = ModelStore(database).save(
            "BIG",
            interval,
            train_model(features),
            training_window={},
            tickers=[],
            params={},
            run_id="benchmark",
        )
        partitions = bar_partitions(market, interval, universe.history_start[interval])
        window = bar_windows(partitions, [f"T0000|{WINDOW[interval]}"], market, interval)[0]
        window_bars = bars(window.start, 50, pd.Timedelta(minutes=15), seed=n)
        state.record_ingestion(window, window_bars, run_id="benchmark")
        state.record_detection(
            window,
            scored_bars=window_bars,
            model_version=record["_id"],
            model_hash=record["sha256"],
            anomalies=0,
            run_id="benchmark",
        )
        template = state.get("T0000", interval)
        clones = []
        for ticker in TICKERS[1:]:
            clone = copy.deepcopy(template)
            clone["_id"], clone["ticker"] = f"{ticker}|{interval}", ticker
            clone["latest_scored_partition"] = f"{ticker}|{WINDOW[interval]}"
            for entry in clone["windows"].values():
                entry["partition_key"] = entry["partition_key"].replace("T0000", ticker)
            clones.append(clone)
        state.collection.insert_many(clones)


def bars(start: pd.Timestamp, count: int, step: pd.Timedelta, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, count)))
    return pd.DataFrame(
        {
            "open": close,
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "volume": rng.integers(1_000, 5_000, count).astype("float64"),
        },
        index=pd.DatetimeIndex([start + i * step for i in range(count)], name="timestamp"),
    )


if __name__ == "__main__":
    main()
