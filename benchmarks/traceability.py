"""What traceability costs per run: charts, audit documents, the failed-run sensor, the checks.

Runs against a fresh local MongoDB-wire server (SecantusDB, a separate process, as in
production without ``MONGODB_URI``) and a temporary Dagster instance, and prints:

* the closes chart: drawing time and markdown size for a year of daily bars, a month of 1h bars
  and a month of 15m bars (the sample files), median of ``--repeat`` draws;
* the success audit of one detection step covering ``--partitions`` partitions (one ticker ×
  window each, the widest ranged run the backfill policy allows);
* the failed-run sensor auditing one failed ranged run of that many partitions, read from the
  Dagster instance's planned materializations;
* the price and feature checks per stored partition of 15m bars.

    /tmp/venv/bin/python benchmarks/traceability.py [--partitions 500] [--repeat 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.assets import build_pipeline_assets
from anomaly_pipeline.audit import AuditTrail
from anomaly_pipeline.audit_sensor import build_failed_run_audit_sensor
from anomaly_pipeline.charts import anomaly_chart_metadata
from anomaly_pipeline.checks import features_document_problem, price_document_problem
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.detection import WindowDetection
from anomaly_pipeline.modeling.model_store import ServedModel
from anomaly_pipeline.partitions import bar_partitions, bar_windows
from anomaly_pipeline.prices.source import BarWindow, PriceSource
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.storage.local_server import LocalMongoServer
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import load_universe


def sample_bars(ticker: str, interval: str) -> pd.DataFrame:
    frame = pd.read_csv(SAMPLE_DATA_DIR / f"{ticker}_{interval}.csv")
    frame.index = pd.DatetimeIndex(
        pd.to_datetime(frame.pop("timestamp"), utc=True), name="timestamp"
    )
    return frame.astype("float64")


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    action()  # the first call pays for fonts and imports
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def bench_charts(repeat: int) -> None:
    print("closes chart (markdown with PNG data URI)")
    cases = [
        ("MSFT 1d, year 2001", sample_bars("MSFT", "1d").loc["2001"], "America/New_York"),
        ("SYNX-USD 1h, 2025-01", sample_bars("SYNX-USD", "1h").loc["2025-01"], "UTC"),
        ("SYNZ-USD 15m, 2025-03", sample_bars("SYNZ-USD", "15m").loc["2025-03"], "UTC"),
    ]
    for label, bars, zone in cases:
        marks = list(bars.index[:: max(1, len(bars) // 8)])

        def draw(bars=bars, marks=marks, zone=zone, label=label) -> dg.MetadataValue:
            return anomaly_chart_metadata(bars, marks, title=label, timezone=zone)

        seconds = median_seconds(draw, repeat)
        size = len(draw().value)
        print(f"  {label:<24} {len(bars):>5} bars  {seconds * 1000:6.0f} ms  {size / 1000:5.1f} KB")


def bench_audit(mongo: MongoResource, universe, partitions: int, repeat: int) -> None:
    market = universe.markets["BENCH"]
    database = mongo.get_database()
    partitions_def = bar_partitions(market, "1d", universe.history_start["1d"])
    keys = [f"{ticker}|2020" for ticker in market.tickers[:partitions]]
    windows = bar_windows(partitions_def, keys, market, "1d")
    store = BarStore(database)
    bars = sample_bars("MSFT", "1d").loc["2001"]
    features = pd.DataFrame(0.1, index=bars.index, columns=list(FEATURE_NAMES))
    for window in windows:
        store.write_bars(window, bars, run_id="bench", source="bench", empty_reason=None)
        store.write_features(window, features, warmup_excluded=0, run_id="bench")

    detections = [
        WindowDetection(window, len(bars), [{"anomaly_score": 0.7}, {"anomaly_score": 0.65}])
        for window in windows
    ]
    model = ServedModel(
        record={"_id": "BENCH-1d-1", "sha256": "0" * 64}, artifact={"threshold": 0.6}
    )
    trail = AuditTrail(database)
    run = dg.DagsterRun(job_name="bench", run_id="bench-run", tags={})

    def record() -> list[dict]:
        return trail.record_detection(
            run=run,
            trigger="manual",
            run_started_at=None,
            market=market,
            interval="1d",
            model=model,
            detections=detections,
            detection_seconds=1.0,
        )

    seconds = median_seconds(record, repeat)
    print(
        f"success audit of one step, {partitions} partitions ({len(record())} documents): "
        f"{seconds * 1000:.0f} ms"
    )

    def check_all() -> None:
        for window in windows:
            price_document_problem(store.partition_document("price_bars", window))
            features_document_problem(store.partition_document("bar_features", window))

    seconds = median_seconds(check_all, max(1, repeat // 5))
    print(
        f"price + feature checks, {partitions} partitions of {len(bars)} daily bars: "
        f"{seconds * 1000:.0f} ms ({seconds / partitions * 1000:.1f} ms per partition)"
    )


class FeedDown(PriceSource):
    def fetch(self, windows: Sequence[BarWindow]):
        raise ConnectionError("feed down")


def bench_failed_run(mongo: MongoResource, universe, partitions: int) -> None:
    market = universe.markets["BENCH"]
    prices = build_pipeline_assets(market, "1d", universe)[0]
    tickers = market.tickers[:partitions]
    with dg.instance_for_test() as instance:
        failed = dg.materialize(
            [prices],
            resources={"mongo": mongo, "price_source": FeedDown()},
            instance=instance,
            tags={
                ASSET_PARTITION_RANGE_START_TAG: f"{tickers[0]}|2020",
                ASSET_PARTITION_RANGE_END_TAG: f"{tickers[-1]}|2020",
            },
            raise_on_error=False,
        )
        assert not failed.success
        sensor = build_failed_run_audit_sensor(universe)
        started = time.perf_counter()
        tick = sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, resources={"mongo": mongo})
        )
        seconds = time.perf_counter() - started
    print(f"failed-run sensor tick, one run of {partitions} partitions: {seconds * 1000:.0f} ms")
    print(f"  ({tick.skip_message})")


def write_universe(folder: Path, tickers: int) -> Path:
    path = folder / "universe.yaml"
    names = ", ".join(f"B{number:04d}" for number in range(tickers))
    path.write_text(
        "history_start:\n  1d: '2019-01-01'\n"
        "markets:\n  BENCH:\n    timezone: America/New_York\n    calendar: XNYS\n"
        f"    intervals: [1d]\n    tickers: [{names}]\n"
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    bench_charts(args.repeat)
    with tempfile.TemporaryDirectory(prefix="traceability-bench-") as folder:
        server = LocalMongoServer(Path(folder) / "home")
        try:
            mongo = MongoResource(uri=server.ensure_running(), database="bench")
            universe = load_universe(write_universe(Path(folder), args.partitions))
            bench_audit(mongo, universe, args.partitions, args.repeat)
            bench_failed_run(mongo, universe, args.partitions)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
