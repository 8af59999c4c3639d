"""Benchmark: a multi-year daily backfill of many tickers, end to end, with figures.

Generates deterministic synthetic daily bars (default 1,000 tickers x 10 yearly windows) as
files for the files source, writes a one-market universe, starts a fresh local database, and
backfills prices and features, trains the model, and backfills anomalies:

* ``--through in-process`` (default): the ranged runs a Dagster backfill launches, cut the way
  Dagster cuts them (ranges along one dimension, at most 500 partitions per run), each executed
  with ``dagster.materialize`` in this process on a real instance, asset checks included. Every
  MongoDB command is timed with a pymongo command listener, so database time is separated.
* ``--through dagster-dev``: the real thing a user runs: ``dagster dev`` (webserver and
  daemon), one partition backfill launched through GraphQL as ``anomaly-pipeline backfill``
  does, followed to the end. Reports the runs Dagster launched; database time is not separable
  here because runs execute in their own processes, two at a time.
* ``--through dagster-dev-queued``: the same launch with the run queue closed, so nothing
  executes: lists the runs the backfill daemon creates for the first stage (how it cuts the
  partitions), then cancels the backfill. Takes minutes where a full run takes hours.

Then it times the pure computation on the same bars, in memory: ``compute_features`` per
partition with the same history the asset reads, and scoring with the trained model in the same
batches as the anomaly runs. The target: wall time excluding database time at most 3x that.

    /tmp/venv/bin/python benchmarks/backfill.py                 # 1,000 tickers x 10 years
    /tmp/venv/bin/python benchmarks/backfill.py --tickers 50 --years 3
    /tmp/venv/bin/python benchmarks/backfill.py --through dagster-dev
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pymongo.monitoring

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKET = "BENCH"
TARGET_RATIO = 3.0


class CommandTimer(pymongo.monitoring.CommandListener):
    """Adds up the round-trip time of every MongoDB command this process sends."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.commands = 0

    def started(self, event: pymongo.monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: pymongo.monitoring.CommandSucceededEvent) -> None:
        self.seconds += event.duration_micros / 1e6
        self.commands += 1

    def failed(self, event: pymongo.monitoring.CommandFailedEvent) -> None:
        self.seconds += event.duration_micros / 1e6
        self.commands += 1


# Registered before any client exists: pymongo applies global listeners to clients made later.
DATABASE_TIMER = CommandTimer()
pymongo.monitoring.register(DATABASE_TIMER)


@dataclass
class Phase:
    name: str
    runs: int = 0
    wall_seconds: float = 0.0
    database_seconds: float = 0.0


@dataclass
class BackfillFigures:
    through: str
    phases: list[Phase] = field(default_factory=list)
    runs_by_selection: Counter = field(default_factory=Counter)
    wall_seconds: float = 0.0
    database_seconds: float | None = None
    database_commands: int | None = None
    source_read_seconds: float | None = None
    # Dagster's own storage: events written to the instance (SQLite here), and check steps.
    event_log_seconds: float | None = None
    events_written: int | None = None
    events_by_type: Counter = field(default_factory=Counter)
    check_step_seconds: float | None = None
    asset_step_seconds: float | None = None

    @property
    def runs(self) -> int:
        return sum(self.runs_by_selection.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickers", type=int, default=1000)
    parser.add_argument("--years", type=int, default=10, help="yearly windows, current included")
    parser.add_argument(
        "--through",
        choices=["in-process", "dagster-dev", "dagster-dev-queued"],
        default="in-process",
    )
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp folder)")
    parser.add_argument(
        "--skip-checks",
        action="store_true",
        help="in-process only: leave the asset checks out of the runs, to see what they cost",
    )
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="backfill-benchmark-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["ANOMALY_PIPELINE_HOME"] = str(workdir / "home")
    os.environ.pop("ANOMALY_PIPELINE_PRICE_SOURCE", None)

    import pandas as pd

    from anomaly_pipeline.sample_data.synthetic_daily import synthetic_tickers, write_daily_files
    from anomaly_pipeline.storage.local_server import LocalMongoServer

    now = pd.Timestamp.now(tz="UTC")
    first_year = now.year - args.years + 1
    tickers = synthetic_tickers(args.tickers)
    bars_dir = workdir / "bars"
    started = time.monotonic()
    bar_total = write_daily_files(
        bars_dir,
        tickers,
        calendar="XNYS",
        timezone="America/New_York",
        start=pd.Timestamp(f"{first_year}-01-01"),
        end=now.tz_localize(None).normalize() - pd.Timedelta(days=1),
    )
    generation_seconds = time.monotonic() - started
    universe_path = workdir / "universe.yaml"
    universe_path.write_text(
        f'history_start:\n  1d: "{first_year}-01-01"\nmarkets:\n  {MARKET}:\n'
        "    timezone: America/New_York\n    calendar: XNYS\n    intervals: [1d]\n"
        f"    tickers: [{', '.join(tickers)}]\n"
    )

    server = LocalMongoServer(workdir / "home")
    os.environ.update(
        {
            "MONGODB_URI": server.ensure_running(),
            "ANOMALY_PIPELINE_DATABASE": "backfill_benchmark",
            "ANOMALY_PIPELINE_UNIVERSE": str(universe_path),
            "ANOMALY_PIPELINE_FILES_DIR": str(bars_dir),
            "DAGSTER_HOME": str(workdir / "dagster_home"),
        }
    )
    try:
        from anomaly_pipeline.backfills.plan import STAGES, plan_backfill
        from anomaly_pipeline.prices.files_source import FilesPriceSource
        from anomaly_pipeline.universe import load_universe

        universe = load_universe(universe_path)
        plan = plan_backfill(
            universe, MARKET, "1d", "all", STAGES, FilesPriceSource(directory=str(bars_dir)), now
        )
        print(
            f"Backfill benchmark: {len(tickers)} tickers x {len(plan.window_keys)} yearly windows "
            f"({plan.window_keys[0]} to {plan.window_keys[-1]}) = {len(plan.partition_keys)} "
            f"partitions, {bar_total:,} daily bars (files written in {generation_seconds:.1f} s)",
            flush=True,
        )
        if args.through == "dagster-dev-queued":
            print_first_runs(plan, workdir)
            return 0
        if args.through == "in-process":
            figures = backfill_in_process(
                universe, plan, bars_dir, with_checks=not args.skip_checks
            )
        else:
            figures = backfill_through_dagster_dev(plan, workdir)
        features_seconds, scoring_seconds = pure_compute(universe, plan, bars_dir)
        print_figures(figures, bar_total, features_seconds, scoring_seconds)
    finally:
        server.stop()
    print(f"\nfiles, instance and logs: {workdir}")
    return 0


def backfill_ranges(partitions_def, partition_keys: list[str]) -> list[tuple[str, str, int]]:
    """(first key, last key, partitions) of each run a backfill of ``partition_keys`` launches.

    Dagster's rule for a multi-partitioned asset with a multi-run backfill policy: hold the
    dimension with fewer selected keys fixed, take contiguous ranges along the other, and split
    each range into runs of at most ``max_partitions_per_run``.
    """
    from anomaly_pipeline.partitions import MAX_PARTITIONS_PER_RUN

    subset = partitions_def.subset_with_partition_keys(partition_keys)
    runs = []
    for key_range in subset.get_partition_key_ranges(partitions_def):
        keys = list(partitions_def.get_partition_keys_in_range(key_range))
        for first in range(0, len(keys), MAX_PARTITIONS_PER_RUN):
            chunk = keys[first : first + MAX_PARTITIONS_PER_RUN]
            runs.append((str(chunk[0]), str(chunk[-1]), len(chunk)))
    return runs


def backfill_in_process(
    universe, plan, bars_dir: Path, *, with_checks: bool = True
) -> BackfillFigures:
    import dagster as dg
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
    )

    from anomaly_pipeline.definitions import build_definitions
    from anomaly_pipeline.partitions import MAX_PARTITIONS_PER_RUN, bar_partitions
    from anomaly_pipeline.prices.files_source import FilesPriceSource

    sys.path.insert(0, str(REPO_ROOT))
    from anomaly_pipeline_tests.dagster_dev import write_instance_settings

    read_seconds = [0.0]

    class TimedFilesPriceSource(FilesPriceSource):
        """The files source, timed: reading and normalising files is neither compute nor DB."""

        def fetch(self, windows):
            started = time.monotonic()
            try:
                return super().fetch(windows)
            finally:
                read_seconds[0] += time.monotonic() - started

    write_instance_settings(Path(os.environ["DAGSTER_HOME"]))
    instance = dg.DagsterInstance.get()
    event_log = instance.event_log_storage
    store_event = event_log.store_event
    event_seconds, events, events_by_type = [0.0], [0], Counter()

    def timed_store_event(event, *args, **kwargs):
        started = time.monotonic()
        try:
            return store_event(event, *args, **kwargs)
        finally:
            event_seconds[0] += time.monotonic() - started
            events[0] += 1
            events_by_type[
                event.dagster_event.event_type_value if event.dagster_event else "log message"
            ] += 1

    event_log.store_event = timed_store_event
    definitions = build_definitions(universe)
    resources = {
        **definitions.resources,
        "price_source": TimedFilesPriceSource(directory=str(bars_dir)),
    }
    targets = [*definitions.assets, *((definitions.asset_checks or []) if with_checks else [])]
    market = universe.markets[MARKET]
    partitions_def = bar_partitions(market, "1d", universe.history_start["1d"])
    ranges = backfill_ranges(partitions_def, plan.partition_keys)
    keys = {stage: key for stage, key in zip(plan.stages, plan.asset_keys, strict=True)}
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

    # As the backfill daemon does: prices and features share runs only when every selected
    # partition fits in one run; otherwise features wait for the prices runs.
    if len(plan.partition_keys) < MAX_PARTITIONS_PER_RUN:
        phases = [("prices+features", ["prices", "features"], ranges)]
    else:
        phases = [("prices", ["prices"], ranges), ("features", ["features"], ranges)]
    phases += [("model", ["model"], [None]), ("anomalies", ["anomalies"], ranges)]

    figures = BackfillFigures(
        through="in-process: dagster.materialize of the backfill's runs"
        + ("" if with_checks else ", asset checks left out")
    )
    run_ids = []
    started = time.monotonic()
    for name, stages, phase_ranges in phases:
        phase = Phase(name)
        phase_started, database_before = time.monotonic(), DATABASE_TIMER.seconds
        for key_range in phase_ranges:
            tags = {"anomaly_pipeline/entry_point": "benchmark"}
            if key_range is not None:
                tags[ASSET_PARTITION_RANGE_START_TAG] = key_range[0]
                tags[ASSET_PARTITION_RANGE_END_TAG] = key_range[1]
            result = dg.materialize(
                targets,
                selection=[keys[stage] for stage in stages],
                instance=instance,
                resources=resources,
                tags=tags,
                run_config=quiet,
            )
            run_ids.append(result.run_id)
            phase.runs += 1
            figures.runs_by_selection[name] += 1
        phase.wall_seconds = time.monotonic() - phase_started
        phase.database_seconds = DATABASE_TIMER.seconds - database_before
        figures.phases.append(phase)
        print(
            f"  {name}: {phase.runs} run(s), {phase.wall_seconds:.1f} s "
            f"(database {phase.database_seconds:.1f} s)",
            flush=True,
        )
    figures.wall_seconds = time.monotonic() - started
    figures.database_seconds = DATABASE_TIMER.seconds
    figures.database_commands = DATABASE_TIMER.commands
    figures.source_read_seconds = read_seconds[0]
    figures.event_log_seconds, figures.events_written = event_seconds[0], events[0]
    figures.events_by_type = events_by_type
    check_keys = {
        key.name for checks in (definitions.asset_checks or []) for key in checks.check_keys
    }
    figures.check_step_seconds = figures.asset_step_seconds = 0.0
    for run_id in run_ids:
        for step in instance.get_run_step_stats(run_id):
            seconds = (step.end_time or step.start_time) - step.start_time
            if any(step.step_key.endswith(f"_{name}") for name in check_keys):
                figures.check_step_seconds += seconds
            else:
                figures.asset_step_seconds += seconds
    return figures


def backfill_through_dagster_dev(plan, workdir: Path) -> BackfillFigures:
    sys.path.insert(0, str(REPO_ROOT))
    from anomaly_pipeline.backfills.webserver import DagsterWebserver
    from anomaly_pipeline.cli.backfill import follow, launch
    from anomaly_pipeline_tests.dagster_dev import dagster_dev

    figures = BackfillFigures(through="dagster-dev: one backfill through GraphQL, daemon runs")
    started = time.monotonic()
    with dagster_dev(workdir, dict(os.environ)) as server:
        print(f"  dagster dev answered after {time.monotonic() - started:.0f} s", flush=True)
        webserver = DagsterWebserver(server.url)
        launched = time.monotonic()
        backfill_id = launch(webserver, plan)
        progress = follow(webserver, backfill_id, plan, poll_seconds=10.0)
        figures.wall_seconds = time.monotonic() - launched
        answer = webserver.graphql(
            """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
                 ... on PartitionBackfill { runs(limit: 100000) { status assetSelection { path } } }
               } }""",
            {"id": backfill_id},
        )
    for run in answer["partitionBackfillOrError"]["runs"]:
        stages = "+".join(sorted(key["path"][-1] for key in run["assetSelection"]))
        figures.runs_by_selection[f"{stages} ({run['status'].lower()})"] += 1
    if not progress.succeeded:
        print(f"  the backfill ended {progress.status}; see {server.log_path}", flush=True)
    return figures


_BACKFILL_RUNS = """
query BackfillRuns($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    ... on PartitionBackfill {
      runs(limit: 100000) { status assetSelection { path } tags { key value } }
    }
  }
}
"""


def print_first_runs(plan, workdir: Path, settle_seconds: float = 100.0) -> None:
    """Launch with no run allowed to start and list the runs the daemon queues for the roots."""
    sys.path.insert(0, str(REPO_ROOT))
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
    )

    from anomaly_pipeline.backfills.webserver import DagsterWebserver
    from anomaly_pipeline.cli.backfill import launch
    from anomaly_pipeline_tests.dagster_dev import dagster_dev

    with dagster_dev(workdir, dict(os.environ), max_concurrent_runs=0) as server:
        webserver = DagsterWebserver(server.url)
        backfill_id = launch(webserver, plan)
        launched = time.monotonic()
        runs: list = []
        changed = time.monotonic()
        # The daemon submits the root runs over its next iterations (every 30 s); later stages
        # wait for the first, which never runs here. Stop once the count stays put.
        while time.monotonic() - launched < 900 and (
            not runs or time.monotonic() - changed < settle_seconds
        ):
            time.sleep(5)
            answer = webserver.graphql(_BACKFILL_RUNS, {"id": backfill_id})
            if len(answer["partitionBackfillOrError"]["runs"]) != len(runs):
                runs, changed = answer["partitionBackfillOrError"]["runs"], time.monotonic()
        webserver.graphql(
            "mutation($id: String!) { cancelPartitionBackfill(backfillId: $id) { __typename } }",
            {"id": backfill_id},
        )

    print(f"\nThe backfill daemon queued {len(runs)} run(s) for the first stage:")
    sizes: Counter = Counter()
    for run in runs:
        tags = {tag["key"]: tag["value"] for tag in run["tags"]}
        first = tags.get(ASSET_PARTITION_RANGE_START_TAG, "")
        last = tags.get(ASSET_PARTITION_RANGE_END_TAG, "")
        stages = "+".join(sorted(key["path"][-1] for key in run["assetSelection"]))
        ticker_first, window_first = first.split("|")
        ticker_last, window_last = last.split("|")
        tickers = plan.market.tickers
        count = (tickers.index(ticker_last) - tickers.index(ticker_first) + 1) * (
            plan.window_keys.index(window_last) - plan.window_keys.index(window_first) + 1
        )
        sizes[(stages, count)] += 1
        print(f"  {stages:<16} {first} ... {last}  ({count} partitions)")
    print(
        "runs by stage and size: " + ", ".join(f"{n} x {s} of {c}" for (s, c), n in sizes.items())
    )


def pure_compute(universe, plan, bars_dir: Path) -> tuple[float, float]:
    """Seconds spent in compute_features and in scoring, on the same bars, all in memory."""
    import dagster as dg
    import pandas as pd

    from anomaly_pipeline.features import FEATURE_NAMES, LOOKBACK_BARS, compute_features
    from anomaly_pipeline.modeling.model_store import ModelStore
    from anomaly_pipeline.modeling.training import anomaly_scores
    from anomaly_pipeline.partitions import bar_partitions, bar_windows
    from anomaly_pipeline.resources import build_mongo_resource

    market = universe.markets[MARKET]
    partitions_def = bar_partitions(market, "1d", universe.history_start["1d"])
    windows = {
        str(window.partition_key): window
        for window in bar_windows(partitions_def, plan.partition_keys, market, "1d")
    }
    bars_by_ticker = {
        ticker: pd.read_parquet(bars_dir / f"{ticker}_1d.parquet") for ticker in market.tickers
    }

    features_seconds = 0.0
    features_by_key = {}
    for key, window in windows.items():
        bars = bars_by_ticker[window.ticker]
        history = bars[bars.index < window.start].iloc[-LOOKBACK_BARS:]
        in_window = bars[(bars.index >= window.start) & (bars.index < window.end)]
        frame = pd.concat([history, in_window])
        started = time.perf_counter()
        features_by_key[key] = compute_features(frame, start=window.start).features
        features_seconds += time.perf_counter() - started

    database = build_mongo_resource().process_config_and_initialize().get_database()
    store = ModelStore(database)
    forest = store.load(store.current_record(MARKET, "1d")).artifact["forest"]
    scoring_seconds = 0.0
    for first, last, _ in backfill_ranges(partitions_def, plan.partition_keys):
        keys = partitions_def.get_partition_keys_in_range(dg.PartitionKeyRange(first, last))
        batch = pd.concat([features_by_key[str(key)][list(FEATURE_NAMES)] for key in keys])
        started = time.perf_counter()
        anomaly_scores(forest, batch)
        scoring_seconds += time.perf_counter() - started
    return features_seconds, scoring_seconds


def print_figures(
    figures: BackfillFigures, bar_total: int, features_seconds: float, scoring_seconds: float
) -> None:
    compute = features_seconds + scoring_seconds
    print(f"\nThrough {figures.through}")
    print(
        f"  runs launched:      {figures.runs}  ({', '.join(_counts(figures.runs_by_selection))})"
    )
    print(f"  wall time:          {figures.wall_seconds:8.1f} s")
    print(f"  bars per second:    {bar_total / figures.wall_seconds:8.0f}")
    print(
        f"  pure compute:       {compute:8.1f} s  (compute_features {features_seconds:.1f} s, "
        f"scoring {scoring_seconds:.1f} s)"
    )
    if figures.database_seconds is None:
        print("  database time:      not separable (runs execute in their own processes)")
        return
    print(
        f"  database time:      {figures.database_seconds:8.1f} s  "
        f"({figures.database_commands:,} commands)"
    )
    print(
        f"  Dagster event log:  {figures.event_log_seconds:8.1f} s  "
        f"({figures.events_written:,} events written to the SQLite instance)"
    )
    common = ", ".join(f"{kind} {count}" for kind, count in figures.events_by_type.most_common(6))
    print(f"    most written: {common}")
    print(
        f"  step time:          {figures.asset_step_seconds:8.1f} s in asset steps, "
        f"{figures.check_step_seconds:.1f} s in asset check steps"
    )
    print(f"  price file reading: {figures.source_read_seconds:8.1f} s  (in the prices steps)")
    for phase in figures.phases:
        print(
            f"    {phase.name:<16} {phase.runs:3d} run(s) {phase.wall_seconds:8.1f} s wall, "
            f"{phase.database_seconds:7.1f} s database"
        )
    excluding_database = figures.wall_seconds - figures.database_seconds
    ratio = excluding_database / compute
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(
        f"  wall time excluding database: {excluding_database:.1f} s = {ratio:.2f} x pure compute "
        f"(target at most {TARGET_RATIO:.0f} x: {verdict})"
    )
    pipeline_only = excluding_database - figures.event_log_seconds - figures.check_step_seconds
    print(
        f"  ... and excluding the event log and check steps too: {pipeline_only:.1f} s = "
        f"{pipeline_only / compute:.2f} x pure compute"
    )


def _counts(counter: Counter) -> list[str]:
    return [f"{name} {count}" for name, count in counter.items()]


if __name__ == "__main__":
    sys.exit(main())
