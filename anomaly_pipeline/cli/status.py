"""``anomaly-pipeline status``: is the pipeline keeping up, and is its automation on?

Reports whether the database answers (never its URI, which may hold credentials), which model
serves each market and interval, how fresh each market's bars and detections are, and whether
each schedule and sensor is running in the local Dagster instance, with the daemon that runs
them. It never starts the local database server: a stopped server is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from anomaly_pipeline.cli.anomalies import json_value

if TYPE_CHECKING:
    import dagster as dg
    from pymongo.database import Database

    from anomaly_pipeline.universe import Universe

# The daemon beats about every 30 seconds; silence for this long means it is not running.
_DAEMON_SILENCE_SECONDS = 120


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "status",
        help="database, models, freshness of bars and detections, schedules and sensors",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


@dataclass
class PairFreshness:
    market: str
    interval: str
    tickers: int
    tracked: int
    last_bar_ingested: pd.Timestamp | None = None
    last_bar_scored: pd.Timestamp | None = None
    # The largest gap, over tickers, between the last bar ingested and the last one scored.
    detection_lag: pd.Timedelta | None = None
    # Tickers with bars ingested and none scored yet.
    never_scored: int = 0
    pending_partitions: int = 0
    pending_since: pd.Timestamp | None = None


@dataclass
class InstigatorStatus:
    kind: str
    name: str
    running: bool
    # "default" when the code's default is in force, "set" when someone started or stopped it.
    decided_by: str
    cron: str | None = None
    timezone: str | None = None
    last_tick: dict | None = None


@dataclass
class Status:
    database: dict
    models: list[dict] = field(default_factory=list)
    freshness: list[PairFreshness] = field(default_factory=list)
    dagster_instance: str | None = None
    daemon: dict | None = None
    automation: list[InstigatorStatus] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    from anomaly_pipeline.instance import local_instance
    from anomaly_pipeline.universe import load_universe

    universe = load_universe()
    database, database_status = _reachable_database()
    status = Status(database=database_status)
    if database is not None:
        status.models = model_status(database, universe)
        status.freshness = freshness(database, universe)
    instance = local_instance()
    status.dagster_instance = instance.root_directory
    status.daemon = daemon_status(instance)
    status.automation = automation_status(instance, universe)

    if args.json:
        print(json.dumps(asdict(status), default=_json_value, indent=2))
    else:
        print_status(status, now=pd.Timestamp.now(tz="UTC"))
    for problem in universe.errors.values():
        print(f"warning: left out of the universe: {problem}", file=sys.stderr)
    # Non-zero when the store cannot be reached, so monitoring scripts can rely on the code.
    return 0 if database is not None else 1


def _reachable_database() -> tuple[Database | None, dict]:
    from pymongo.errors import PyMongoError

    from anomaly_pipeline.resources import build_mongo_resource
    from anomaly_pipeline.settings import MONGODB_URI_ENV_VAR, pipeline_home
    from anomaly_pipeline.storage.local_server import LocalMongoServer
    from anomaly_pipeline.storage.mongo import MongoResource

    # Outside a run nothing resolves the resource's dg.EnvVar for MONGODB_URI; this does.
    mongo = build_mongo_resource().process_config_and_initialize()
    where = mongo.describe_location()
    if (
        not os.environ.get(MONGODB_URI_ENV_VAR)
        and LocalMongoServer(pipeline_home()).running_state() is None
    ):
        return None, {
            "reachable": False,
            "where": where,
            "reason": "the local server is not running; start it with `anomaly-pipeline db start`",
        }
    started = time.monotonic()
    try:
        # A short timeout: an unreachable database should be reported, not waited for.
        quick = MongoResource(
            uri=mongo.resolved_uri(), database=mongo.database, server_selection_timeout_ms=3000
        )
        database = quick.get_database()
        database.command("ping")
    except PyMongoError as exc:
        # The exception's class says what failed; its text may repeat the host list.
        return None, {"reachable": False, "where": where, "reason": type(exc).__name__}
    return database, {
        "reachable": True,
        "where": where,
        "ping_ms": round((time.monotonic() - started) * 1000, 1),
    }


def model_status(database: Database, universe: Universe) -> list[dict]:
    """The current model of every market and interval of the universe (None when untrained)."""
    from anomaly_pipeline.modeling.model_store import ModelStore

    store = ModelStore(database)
    models = []
    for market, interval in universe.pairs():
        record = store.current_record(market.name, interval)
        models.append(
            {
                "market": market.name,
                "interval": interval,
                "version": record["_id"] if record else None,
                "sha256": record["sha256"] if record else None,
                "created_at": record["created_at"] if record else None,
                "training_rows": record["training_rows"] if record else None,
            }
        )
    return models


def freshness(database: Database, universe: Universe) -> list[PairFreshness]:
    """Per market and interval, from the detection state of the universe's tickers."""
    from anomaly_pipeline.automation.state import DetectionState

    state = DetectionState(database)
    rows = []
    for market in universe.markets.values():
        documents: dict[str, list[dict]] = {interval: [] for interval in market.intervals}
        for document in state.summaries(market.name):
            # Tickers that left the universe keep their state, but are no longer watched.
            if document["ticker"] in market.tickers and document["interval"] in documents:
                documents[document["interval"]].append(document)
        for interval in market.intervals:
            rows.append(
                _pair_freshness(market.name, interval, len(market.tickers), documents[interval])
            )
    return rows


def _pair_freshness(
    market: str, interval: str, tickers: int, documents: list[dict]
) -> PairFreshness:
    row = PairFreshness(market=market, interval=interval, tickers=tickers, tracked=len(documents))
    ingested = [d["last_bar_ingested"] for d in documents if d.get("last_bar_ingested")]
    scored = [d["last_bar_scored"] for d in documents if d.get("last_bar_scored")]
    row.last_bar_ingested = pd.Timestamp(max(ingested)) if ingested else None
    row.last_bar_scored = pd.Timestamp(max(scored)) if scored else None
    lags = [
        pd.Timestamp(d["last_bar_ingested"]) - pd.Timestamp(d["last_bar_scored"])
        for d in documents
        if d.get("last_bar_ingested") and d.get("last_bar_scored")
    ]
    row.detection_lag = max(lags) if lags else None
    row.never_scored = sum(
        1 for d in documents if d.get("last_bar_ingested") and not d.get("last_bar_scored")
    )
    pending = [entry for d in documents for entry in (d.get("pending") or {}).values()]
    row.pending_partitions = len(pending)
    since = [entry["since"] for entry in pending if entry.get("since")]
    row.pending_since = pd.Timestamp(min(since)) if since else None
    return row


def daemon_status(instance: dg.DagsterInstance) -> dict:
    """Whether the daemon that evaluates schedules and sensors is alive, from its heartbeats."""
    heartbeats = instance.get_daemon_heartbeats()
    latest = {
        kind: heartbeats[kind].timestamp for kind in ("SCHEDULER", "SENSOR") if kind in heartbeats
    }
    if not latest:
        return {"running": False, "last_heartbeat": None}
    last = max(latest.values())
    return {
        "running": time.time() - last < _DAEMON_SILENCE_SECONDS,
        "last_heartbeat": pd.Timestamp(last, unit="s", tz="UTC"),
    }


def automation_status(instance: dg.DagsterInstance, universe: Universe) -> list[InstigatorStatus]:
    """Every schedule and sensor of the universe, with the state the instance holds for it."""
    import dagster as dg
    from dagster._core.scheduler.instigation import InstigatorStatus as StoredStatus

    from anomaly_pipeline.automation import build_automation_definitions

    definitions = build_automation_definitions(universe)
    stored = {state.instigator_name: state for state in instance.all_instigator_state()}
    rows = []
    for kind, instigator in [("schedule", s) for s in definitions.schedules or []] + [
        ("sensor", s) for s in definitions.sensors or []
    ]:
        default_running = instigator.default_status in (
            dg.DefaultScheduleStatus.RUNNING,
            dg.DefaultSensorStatus.RUNNING,
        )
        state = stored.get(instigator.name)
        if state is None or state.status == StoredStatus.DECLARED_IN_CODE:
            running, decided_by = default_running, "default"
        else:
            running, decided_by = state.status == StoredStatus.RUNNING, "set"
        row = InstigatorStatus(
            kind=kind, name=instigator.name, running=running, decided_by=decided_by
        )
        if kind == "schedule":
            row.cron, row.timezone = instigator.cron_schedule, instigator.execution_timezone
        if state is not None:
            ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
            if ticks:
                row.last_tick = {
                    "at": pd.Timestamp(ticks[0].timestamp, unit="s", tz="UTC"),
                    "status": ticks[0].status.value.lower(),
                }
        rows.append(row)
    return rows


def print_status(status: Status, *, now: pd.Timestamp) -> None:
    database = status.database
    if database["reachable"]:
        print(f"Database: reachable ({database['where']}; ping {database['ping_ms']} ms)")
    else:
        print(f"Database: NOT reachable ({database['where']}): {database['reason']}")

    if status.models:
        print("\nModels serving each market and interval")
        for model in status.models:
            label = f"  {model['market']:<8} {model['interval']:<4}"
            if model["version"] is None:
                print(
                    f"{label} no model yet: materialize "
                    f"{model['market'].lower()}/{model['interval']}/model"
                )
            else:
                print(
                    f"{label} {model['version']:<16} sha256 {model['sha256'][:12]}  "
                    f"trained {_when(model['created_at'])} on {model['training_rows']:,} rows"
                )

    if status.freshness:
        print(f"\nFreshness (now {_when(now)})")
        print(
            f"  {'market':<8} {'int.':<4} {'tickers':>8}  {'last bar ingested':<21} {'age':>7}  "
            f"{'last bar scored':<21} {'lag':>7}  pending"
        )
        for row in status.freshness:
            pending = f"{row.pending_partitions}"
            if row.pending_since is not None:
                pending += f" (oldest {_duration(now - row.pending_since)} ago)"
            if row.never_scored:
                pending += f"; {row.never_scored} ticker(s) never scored"
            age = _duration(now - row.last_bar_ingested) if row.last_bar_ingested else "-"
            print(
                f"  {row.market:<8} {row.interval:<4} {row.tracked:>3}/{row.tickers:<4}  "
                f"{_when(row.last_bar_ingested):<21} {age:>7}  {_when(row.last_bar_scored):<21} "
                f"{_duration(row.detection_lag):>7}  {pending}"
            )

    print(f"\nAutomation (Dagster instance {status.dagster_instance})")
    daemon = status.daemon or {}
    if daemon.get("running"):
        print(f"  daemon: running (heartbeat {_duration(now - daemon['last_heartbeat'])} ago)")
    elif daemon.get("last_heartbeat") is not None:
        print(
            f"  daemon: NOT running (last heartbeat {_when(daemon['last_heartbeat'])}); "
            "schedules and sensors act only while `dagster dev` or `dagster-daemon run` runs"
        )
    else:
        print(
            "  daemon: never seen on this instance; schedules and sensors act only while "
            "`dagster dev` or `dagster-daemon run` runs"
        )
    for row in status.automation:
        state = ("running" if row.running else "stopped") + (
            " (default)" if row.decided_by == "default" else ""
        )
        details = []
        if row.cron:
            details.append(f"{row.cron} ({row.timezone})")
        if row.last_tick:
            details.append(
                f"last tick {_duration(now - row.last_tick['at'])} ago: {row.last_tick['status']}"
            )
        print(f"  {row.kind:<8} {row.name:<32} {state:<18} {'; '.join(details)}".rstrip())


def _when(moment) -> str:
    if moment is None:
        return "-"
    return pd.Timestamp(moment).tz_convert("UTC").strftime("%Y-%m-%d %H:%M UTC")


def _duration(span: pd.Timedelta | None) -> str:
    if span is None:
        return "-"
    seconds = span.total_seconds()
    for unit, size in (("y", 365.25 * 86_400), ("d", 86_400), ("h", 3_600), ("min", 60)):
        if abs(seconds) >= size:
            return (
                f"{seconds / size:.1f} {unit}"
                if unit in ("y", "d")
                else f"{seconds / size:.0f} {unit}"
            )
    return f"{seconds:.0f} s"


def _json_value(value: object):
    if isinstance(value, pd.Timedelta):
        return value.total_seconds()
    if isinstance(value, pd.Timestamp):
        return json_value(value.floor("us").to_pydatetime())
    return json_value(value)
