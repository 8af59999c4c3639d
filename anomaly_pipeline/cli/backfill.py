"""``anomaly-pipeline backfill``: load years of history as one Dagster partition backfill."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from anomaly_pipeline.cli.errors import CliError

if TYPE_CHECKING:
    from anomaly_pipeline.backfills.plan import BackfillPlan, LeftOutPartition
    from anomaly_pipeline.backfills.webserver import BackfillProgress, DagsterWebserver

DEFAULT_URL = "http://127.0.0.1:3000"
DEFAULT_STAGES = ("prices", "features", "anomalies")
# A ranged run's steps follow one another (features need the prices, anomalies the features),
# so the in-process executor loses no parallelism; it saves a process per step and keeps step
# processes from contending for a SQLite instance ("database is locked").
EXECUTOR_RUN_CONFIG = {"in_process": {"execution": {"config": {"in_process": {}}}}, "default": None}
IN_PROGRESS_RUN_STATUSES = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}
MAX_LEFT_OUT_LINES = 12
MAX_FAILED_RUNS_SHOWN = 3
MAX_POLL_FAILURES = 10

DESCRIPTION = """\
Load a span of history for one market and interval as ONE Dagster partition backfill, launched
through a running webserver's GraphQL API, then follow it until it ends.

Each <market>/<interval> asset is partitioned by ticker x window (a year of daily bars, a month
of 15m or 1h bars). --window 10y selects the 10 most recent yearly windows (120 monthly windows
for intraday bars), the current one included; "all" starts at the universe's history_start.
Partitions the configured price source can never deliver (Yahoo serves 15m bars for 60 days and
1h bars for 730 days) are left out before launch and listed with the reason.

Dagster groups the partitions into ranged runs of at most 500 partitions, cut along whichever
dimension has fewer keys (one window's tickers, or one ticker's windows), and runs the stages in
order. The model is not partitioned. When the market has no model yet, the backfill includes it:
Dagster trains it once every features partition is stored, then scores the anomalies. With a
model in place, anomalies are scored by that model; add "model" to --assets to retrain first."""

EPILOG = """\
The webserver needs its daemon and the same environment as this command (MONGODB_URI,
ANOMALY_PIPELINE_UNIVERSE, ANOMALY_PIPELINE_PRICE_SOURCE, ...); `dagster dev` starts both:
  dagster dev -m anomaly_pipeline.definitions -h 127.0.0.1 -p 3000

The same from the UI: open the asset group (e.g. us_1d), select the prices, features and
anomalies assets, press Materialize, pick the ticker and window partitions, and launch the
backfill. There, partitions the source cannot deliver are not left out: their runs fail, and the
failure names every such partition with the reason.

Without the daemon, `dagster asset materialize -m anomaly_pipeline.definitions --select
us/1d/prices --partition 'MSFT|2024'` materializes one partition per run; its --partition-range
refuses these assets, because they batch with a multi-run backfill policy. `dagster job
backfill` does not apply: the pipeline's assets are not in a partitioned job.

examples:
  anomaly-pipeline backfill --market US --interval 1d --window 10y
  anomaly-pipeline backfill --market SET --interval 1h --window all --dry-run
  anomaly-pipeline backfill --market US --interval 1d --window 5y --assets prices,features"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "backfill",
        help="load a span of history as one Dagster partition backfill (needs `dagster dev`)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--market", required=True, help="market of the universe, e.g. US or SET")
    parser.add_argument("--interval", required=True, help="bar interval: 15m, 1h or 1d")
    parser.add_argument(
        "--window", required=True, choices=["5y", "10y", "all"], help="how much history"
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"Dagster webserver (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--assets",
        help=(
            "comma-separated stages among prices, features, model, anomalies (default: prices, "
            "features and anomalies, plus the model when the market has none yet)"
        ),
    )
    parser.add_argument(
        "--executor",
        choices=sorted(EXECUTOR_RUN_CONFIG),
        default="in_process",
        help="how each run executes its steps (default in_process: one process per run)",
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=5.0, help="progress refresh interval (default 5)"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="launch and return without following progress"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="show the partitions and stages that would be launched, and launch nothing",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from anomaly_pipeline.backfills.plan import parse_stages, plan_backfill
    from anomaly_pipeline.backfills.webserver import (
        DagsterWebserver,
        WebserverRequestError,
        WebserverUnreachableError,
    )
    from anomaly_pipeline.resources import build_price_source
    from anomaly_pipeline.universe import load_universe

    try:
        universe = load_universe()
        stages = parse_stages(args.assets) if args.assets else DEFAULT_STAGES
        plan = plan_backfill(
            universe, args.market, args.interval, args.window, stages, build_price_source()
        )
    # UniverseError and BackfillRequestError are ValueErrors, as is an unknown price source.
    except ValueError as exc:
        raise CliError(str(exc)) from None

    webserver = DagsterWebserver(args.url)
    if not args.dry_run:
        try:
            webserver.server_info()
        except WebserverUnreachableError as exc:
            raise CliError(_no_webserver_message(args.url, exc)) from None
    plan, model_note = _with_model_when_missing(plan, explicit=bool(args.assets))
    print_plan(plan)
    if model_note:
        print(model_note)
    if not plan.partition_keys:
        raise CliError(
            f"nothing to backfill: {plan.source_name} cannot deliver any of the selected partitions"
        )
    if args.dry_run:
        print("\nDry run: nothing launched.")
        return 0

    try:
        missing = webserver.missing_assets(plan.asset_keys)
    except (WebserverRequestError, WebserverUnreachableError) as exc:
        raise CliError(f"cannot ask {webserver.url} for its assets: {exc}") from None
    if missing:
        raise CliError(
            f"the webserver at {webserver.url} does not define "
            f"{', '.join(key.to_user_string() for key in missing)}; start it with the same "
            "ANOMALY_PIPELINE_UNIVERSE as this command"
        )
    backfill_id = launch(webserver, plan, args.executor)
    print(f"\nLaunched backfill {backfill_id}: {webserver.backfill_page(backfill_id)}")
    if args.no_wait:
        return 0
    progress = follow(webserver, backfill_id, plan, poll_seconds=args.poll_seconds)
    return report_outcome(webserver, backfill_id, plan, progress)


def launch(webserver: DagsterWebserver, plan: BackfillPlan, executor: str = "in_process") -> str:
    """Launch ``plan`` as one backfill on ``webserver``; returns the backfill id."""
    from anomaly_pipeline.backfills.webserver import WebserverRequestError

    left_out = f"; {len(plan.left_out)} partition(s) left out" if plan.left_out else ""
    try:
        return webserver.launch_partition_backfill(
            plan.asset_keys,
            plan.partition_keys,
            title=plan.title,
            description=(
                f"{len(plan.partition_keys)} partitions of {plan.market.name} {plan.interval} "
                f"from {plan.source_name}{left_out}; launched by anomaly-pipeline backfill"
            ),
            tags={"anomaly_pipeline/entry_point": "backfill"},
            run_config=EXECUTOR_RUN_CONFIG[executor],
        )
    except WebserverRequestError as exc:
        raise CliError(str(exc)) from None


def follow(
    webserver: DagsterWebserver,
    backfill_id: str,
    plan: BackfillPlan,
    *,
    poll_seconds: float = 5.0,
    log: Callable[[str], None] = print,
) -> BackfillProgress:
    """Poll the backfill until it ends, logging a line whenever its progress changes.

    A webserver that stops answering for a while (a restart, a busy machine) is asked again;
    after ``MAX_POLL_FAILURES`` failures in a row the command gives up, and the backfill goes on.
    """
    from anomaly_pipeline.backfills.webserver import (
        WebserverRequestError,
        WebserverUnreachableError,
    )

    started = time.monotonic()
    last_line = None
    failures = 0
    try:
        while True:
            try:
                progress = webserver.backfill_progress(backfill_id)
            except (WebserverUnreachableError, WebserverRequestError) as exc:
                failures += 1
                if failures >= MAX_POLL_FAILURES:
                    raise CliError(
                        f"lost the webserver at {webserver.url} ({exc}); the backfill goes on: "
                        f"{webserver.backfill_page(backfill_id)}"
                    ) from None
                print(f"warning: no progress from {webserver.url}: {exc}", file=sys.stderr)
                time.sleep(poll_seconds)
                continue
            failures = 0
            line = progress_line(plan, progress)
            if line != last_line:
                elapsed = int(time.monotonic() - started)
                log(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {line}")
                last_line = line
            if progress.finished and not _runs_in_progress(progress):
                return progress
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        print(
            f"\nStopped following; the backfill goes on: {webserver.backfill_page(backfill_id)}",
            file=sys.stderr,
        )
        raise


def progress_line(plan: BackfillPlan, progress: BackfillProgress) -> str:
    done, failed, total = partition_counts(plan, progress)
    stages = []
    for stage, key in zip(plan.stages, plan.asset_keys, strict=True):
        asset = progress.asset(key.to_user_string())
        if asset is None:
            continue
        if asset.partitioned:
            stages.append(f"{stage} {asset.materialized}/{asset.targeted}")
        else:
            state = "failed" if asset.failed else "done" if asset.materialized else "waiting"
            stages.append(f"{stage} {'running' if asset.in_progress else state}")
    running = _runs_in_progress(progress)
    return (
        f"{progress.status}: partitions {done}/{total} done, {failed} failed | "
        f"{'  '.join(stages)} | runs {progress.runs_launched} launched, {running} in progress"
    )


def partition_counts(plan: BackfillPlan, progress: BackfillProgress) -> tuple[int, int, int]:
    """(done, failed, total): a partition is done when the backfill's last partitioned stage
    has it; a failure at any stage counts it failed (Dagster fails its downstream stages too)."""
    partitioned = [
        progress.asset(key.to_user_string())
        for stage, key in zip(plan.stages, plan.asset_keys, strict=True)
        if stage != "model"
    ]
    partitioned = [asset for asset in partitioned if asset is not None]
    if not partitioned:
        return 0, 0, len(plan.partition_keys)
    return (
        partitioned[-1].materialized,
        max(asset.failed for asset in partitioned),
        partitioned[-1].targeted,
    )


def report_outcome(
    webserver: DagsterWebserver, backfill_id: str, plan: BackfillPlan, progress: BackfillProgress
) -> int:
    done, failed, total = partition_counts(plan, progress)
    runs = progress.runs_launched
    failed_runs = progress.run_ids_by_status.get("FAILURE", [])
    if progress.succeeded:
        print(
            f"\nBackfill {backfill_id} succeeded: {done} of {total} partitions through "
            f"{', '.join(plan.stages)} in {runs} run(s)."
        )
        return 0

    print(
        f"\nBackfill {backfill_id} ended {progress.status}: {done} of {total} partitions done, "
        f"{failed} failed; {runs} run(s), {len(failed_runs)} failed.",
        file=sys.stderr,
    )
    if progress.error:
        print(f"  backfill error: {progress.error}", file=sys.stderr)
    for run_id in failed_runs[:MAX_FAILED_RUNS_SHOWN]:
        print(f"  run {run_id}:", file=sys.stderr)
        for message in webserver.run_failure_messages(run_id):
            print("    " + message.replace("\n", "\n    "), file=sys.stderr)
    if len(failed_runs) > MAX_FAILED_RUNS_SHOWN:
        print(f"  ... and {len(failed_runs) - MAX_FAILED_RUNS_SHOWN} more failed run(s)")
    print(f"  details: {webserver.backfill_page(backfill_id)}", file=sys.stderr)
    return 1


def print_plan(plan: BackfillPlan) -> None:
    windows = plan.window_keys
    span = windows[0] if len(windows) == 1 else f"{windows[0]} to {windows[-1]}"
    candidates = len(plan.partition_keys) + len(plan.left_out)
    print(
        f"Backfill {plan.market.name} {plan.interval}, {plan.span}: windows {span} "
        f"({len(windows)}) x {len(plan.market.tickers)} ticker(s) = {candidates} partition(s)"
    )
    print(f"  assets: {' -> '.join(key.to_user_string() for key in plan.asset_keys)}")
    print(f"  price source: {plan.source_name}")
    if plan.left_out:
        print(
            f"  left out {len(plan.left_out)} of {candidates} partition(s) that "
            f"{plan.source_name} cannot deliver:"
        )
        for line in left_out_lines(plan.left_out):
            print(f"    {line}")
    print(f"  to launch: {len(plan.partition_keys)} partition(s)")


def left_out_lines(left_out: Sequence[LeftOutPartition]) -> list[str]:
    """One line per run of consecutive windows left out for the same tickers, with the reason the
    source gave for the run's newest window; capped for long histories."""
    tickers_by_window: dict[str, list[str]] = {}
    reason_by_window: dict[str, str] = {}
    for item in left_out:
        tickers_by_window.setdefault(item.window_key, []).append(item.ticker)
        reason_by_window[item.window_key] = item.reason

    groups: list[tuple[list[str], list[str]]] = []
    for window_key in sorted(tickers_by_window):
        tickers = sorted(tickers_by_window[window_key])
        if groups and groups[-1][1] == tickers:
            groups[-1][0].append(window_key)
        else:
            groups.append(([window_key], tickers))

    lines = []
    for window_keys, tickers in groups:
        named = ", ".join(tickers[:5])
        if len(tickers) > 5:
            named += f" and {len(tickers) - 5} more"
        span = window_keys[0]
        if len(window_keys) > 1:
            span = f"{window_keys[0]} to {window_keys[-1]} ({len(window_keys)} windows)"
        lines.append(f"{span} of {named}: {reason_by_window[window_keys[-1]]}")
    if len(lines) > MAX_LEFT_OUT_LINES:
        hidden = len(lines) - MAX_LEFT_OUT_LINES + 1
        lines = [*lines[: MAX_LEFT_OUT_LINES - 1], f"... and {hidden} more group(s)"]
    return lines


def _with_model_when_missing(
    plan: BackfillPlan, *, explicit: bool
) -> tuple[BackfillPlan, str | None]:
    """Add the model stage when anomalies are asked for and the market has no model yet.

    Returns the plan and a note for the user on how the anomalies will be scored.
    """
    import dataclasses

    from pymongo.errors import PyMongoError

    from anomaly_pipeline.backfills.plan import STAGES
    from anomaly_pipeline.modeling.model_store import ModelStore
    from anomaly_pipeline.resources import build_mongo_resource

    if "anomalies" not in plan.stages or "model" in plan.stages:
        return plan, None
    # Outside a run Dagster has not resolved the resource's EnvVar fields; this does.
    mongo = build_mongo_resource().process_config_and_initialize()
    try:
        record = ModelStore(mongo.get_database()).current_record(plan.market.name, plan.interval)
    except PyMongoError as exc:
        raise CliError(
            f"cannot read the model store ({mongo.describe_location()}) to check for a "
            f"{plan.market.name} {plan.interval} model: {exc}"
        ) from None
    if record is not None:
        return plan, f"  anomalies are scored by the current model {record['_id']}"
    model_key = f"{plan.market.key_prefix}/{plan.interval}/model"
    if explicit:
        raise CliError(
            f"{plan.market.name} {plan.interval} has no model yet, so anomalies cannot be scored: "
            f"add model to --assets (Dagster trains it once the features are stored, then scores "
            f"the anomalies), leave --assets out, or materialize {model_key} first"
        )
    stages = tuple(stage for stage in STAGES if stage in {*plan.stages, "model"})
    note = (
        f"  no {plan.market.name} {plan.interval} model yet: {model_key} is included; Dagster "
        "trains it once every features partition is stored, then scores the anomalies"
    )
    return dataclasses.replace(plan, stages=stages), note


def _runs_in_progress(progress: BackfillProgress) -> int:
    return sum(
        count
        for status, count in progress.runs_by_status.items()
        if status in IN_PROGRESS_RUN_STATUSES
    )


def _no_webserver_message(url: str, error: Exception) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (
        f"no Dagster webserver answers at {url} ({error}).\n"
        "Start one with its daemon, in the same environment as this command, e.g.:\n"
        f"  dagster dev -m anomaly_pipeline.definitions -h {host} -p {port}\n"
        "or pass --url with the address of a running webserver."
    )
