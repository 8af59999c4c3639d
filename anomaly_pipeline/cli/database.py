"""``anomaly-pipeline db start|stop|status``: the local database server."""

from __future__ import annotations

import argparse
import os

from anomaly_pipeline.cli.errors import CliError
from anomaly_pipeline.settings import MONGODB_URI_ENV_VAR, pipeline_home


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("db", help="start, stop or inspect the local database server")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from anomaly_pipeline.storage.local_server import LocalMongoServer

    server = LocalMongoServer(pipeline_home())
    using_uri = bool(os.environ.get(MONGODB_URI_ENV_VAR))
    if using_uri and args.action != "status":
        raise CliError(
            f"{MONGODB_URI_ENV_VAR} is set: the pipeline uses that database, not a local one"
        )
    if args.action == "start":
        server.ensure_running()
        state = server.running_state()
        print(f"local database server running (pid {state.pid}, port {state.port})")
        print(f"data: {server.storage_path}")
    elif args.action == "stop":
        stopped = server.stop()
        print("stopped the local database server" if stopped else "no local server was running")
    else:
        if using_uri:
            print(f"using the database at {MONGODB_URI_ENV_VAR} (the local server is not used)")
        state = server.running_state()
        if state is None:
            print("local database server: not running")
        else:
            print(f"local database server: running (pid {state.pid}, port {state.port})")
        print(f"data: {server.storage_path} ({server.data_size_bytes() / 1e6:.1f} MB)")
        print(f"log: {server.log_path}")
    return 0
