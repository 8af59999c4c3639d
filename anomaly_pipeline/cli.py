"""``anomaly-pipeline``: run the demo, read anomalies, and manage the local database server."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence

from anomaly_pipeline.settings import MONGODB_URI_ENV_VAR, pipeline_home


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


class CliError(Exception):
    """A failure to report as one line, without a traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-pipeline",
        description="Find anomalous price bars with Dagster and keep an audit trail of each one.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole pipeline on the shipped sample data")
    demo.set_defaults(handler=_demo)

    anomalies = commands.add_parser("anomalies", help="list stored anomalies, highest score first")
    anomalies.add_argument("--ticker")
    anomalies.add_argument("--interval", choices=["15m", "1h", "1d"])
    anomalies.add_argument(
        "--limit", type=_non_negative_int, default=20, help="how many (default 20; 0 means all)"
    )
    anomalies.add_argument("--json", action="store_true", help="print one JSON array of documents")
    anomalies.set_defaults(handler=_anomalies)

    database = commands.add_parser("db", help="the local database server")
    database.add_argument("action", choices=["start", "stop", "status"])
    database.set_defaults(handler=_db)
    return parser


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 for all")
    return value


def _demo(args: argparse.Namespace) -> int:
    from anomaly_pipeline.demo import run_demo
    from anomaly_pipeline.instance import local_instance
    from anomaly_pipeline.reports import print_demo_report
    from anomaly_pipeline.universe import load_universe

    universe = load_universe()
    instance = local_instance()
    print(f"anomaly-pipeline demo: universe {universe.path}")
    try:
        result = run_demo(instance, universe)
    except Exception as exc:  # a failed Dagster run: report it and exit non-zero
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print_demo_report(universe, result, instance)
    return 0


def _anomalies(args: argparse.Namespace) -> int:
    from anomaly_pipeline.resources import build_mongo_resource
    from anomaly_pipeline.storage.mongo import ANOMALIES

    query = {}
    if args.ticker:
        query["ticker"] = args.ticker
    if args.interval:
        query["interval"] = args.interval
    database = build_mongo_resource().get_database()
    cursor = database[ANOMALIES].find(query).sort([("anomaly_score", -1), ("_id", 1)])
    if args.limit:
        cursor = cursor.limit(args.limit)
    documents = list(cursor)
    if args.json:
        print(json.dumps(documents, default=_json_value, indent=2))
        return 0
    if not documents:
        print("no anomalies stored" + (" for that selection" if query else ""))
        return 0
    print(
        f"{'score':>7}  {'ticker':<10} {'interval':<8} {'bar start (UTC)':<20} {'close':>12}  model"
    )
    for document in documents:
        print(
            f"{document['anomaly_score']:7.4f}  {document['ticker']:<10} {document['interval']:<8} "
            f"{document['timestamp']:%Y-%m-%d %H:%M}     {document['close']:12.6g}  "
            f"{document['model_version']}"
        )
    return 0


def _json_value(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    return str(value)


def _db(args: argparse.Namespace) -> int:
    from anomaly_pipeline.storage.local_server import LocalMongoServer

    server = LocalMongoServer(pipeline_home())
    if os.environ.get(MONGODB_URI_ENV_VAR) and args.action != "status":
        raise CliError(
            f"{MONGODB_URI_ENV_VAR} is set: the pipeline uses that database, not a local one"
        )
    if args.action == "start":
        server.ensure_running()
        state = server.running_state()
        print(f"local database server running (pid {state.pid}, port {state.port})")
        print(f"data: {server.storage_path}")
    elif args.action == "stop":
        print(
            "stopped the local database server" if server.stop() else "no local server was running"
        )
    else:
        if os.environ.get(MONGODB_URI_ENV_VAR):
            print(f"using the database at {MONGODB_URI_ENV_VAR} (the local server is not used)")
        state = server.running_state()
        if state is None:
            print("local database server: not running")
        else:
            print(f"local database server: running (pid {state.pid}, port {state.port})")
        print(f"data: {server.storage_path} ({server.data_size_bytes() / 1e6:.1f} MB)")
        print(f"log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
