"""How long verifying a stored anomaly takes, as a function call and as a Dagster run.

Builds the US daily pipeline on the shipped MSFT sample (1986 to 2017) in a throw-away home with
its own local database server, then verifies every stored anomaly directly and a few of them
through the ``verify_anomaly`` job, and prints the figures. Nothing here asserts a speed.

    /tmp/venv/bin/python benchmarks/verification.py [--job-runs N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.assets import build_pipeline_assets
from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.partitions import partition_key_for
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.storage.local_server import LocalMongoServer
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import PACKAGED_UNIVERSE, load_universe
from anomaly_pipeline.verification import (
    build_verification_job,
    verification_run_config,
    verify_anomaly,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-runs", type=int, default=10, help="verifications run as jobs")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="verification-benchmark-"))
    server = LocalMongoServer(home)
    try:
        run_benchmark(server.ensure_running(), home, args.job_runs)
    finally:
        server.stop()


def run_benchmark(uri: str, home: Path, job_runs: int) -> None:
    universe = load_universe(PACKAGED_UNIVERSE)
    market = universe.markets["US"]
    mongo = MongoResource(uri=uri, database="benchmark")
    model_store = ModelStoreResource(mongo=mongo)
    resources = {"mongo": mongo, "model_store": model_store, "price_source": FilesPriceSource()}
    prices, features, model, anomalies = build_pipeline_assets(market, "1d", universe)
    range_tags = {
        ASSET_PARTITION_RANGE_START_TAG: str(partition_key_for("MSFT", "1986")),
        ASSET_PARTITION_RANGE_END_TAG: str(partition_key_for("MSFT", "2017")),
    }
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

    (home / "dagster").mkdir()
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        started = time.perf_counter()
        for selection, tags in (
            ([prices, features], range_tags),
            ([model], {}),
            ([anomalies], range_tags),
        ):
            dg.materialize(
                selection, resources=resources, instance=instance, tags=tags, run_config=quiet
            )
        database = mongo.get_database()
        anomaly_ids = [document["_id"] for document in database["anomalies"].find({}, {"_id": 1})]
        bars = sum(d["bar_count"] for d in database["price_bars"].find({}, {"bar_count": 1}))
        print(
            f"pipeline: {bars} MSFT daily bars, {len(anomaly_ids)} anomalies stored "
            f"in {time.perf_counter() - started:.1f} s"
        )

        seconds = []
        reproduced = 0
        for anomaly_id in anomaly_ids:
            started = time.perf_counter()
            verification = verify_anomaly(model_store, anomaly_id, run_id="benchmark")
            seconds.append(time.perf_counter() - started)
            reproduced += bool(verification.reproduced)
        print(
            f"verify_anomaly() on {len(seconds)} anomalies: median {_ms(seconds)} ms, "
            f"max {max(seconds) * 1000:.0f} ms; {reproduced} reproduced exactly"
        )

        job = build_verification_job(universe)
        seconds = []
        for anomaly_id in anomaly_ids[:job_runs]:
            started = time.perf_counter()
            job.execute_in_process(
                run_config={**verification_run_config(anomaly_id), **quiet},
                resources={"model_store": model_store},
                instance=instance,
            )
            seconds.append(time.perf_counter() - started)
        print(
            f"verify_anomaly job, {len(seconds)} in-process runs on a persistent instance: "
            f"median {_ms(seconds)} ms, max {max(seconds) * 1000:.0f} ms per run"
        )


def _ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.0f}"


if __name__ == "__main__":
    main()
