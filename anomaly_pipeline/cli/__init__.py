"""``anomaly-pipeline``: the command line of the anomaly pipeline.

Each command group lives in its own module, which adds its sub-commands with ``register``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pymongo.errors import PyMongoError

from anomaly_pipeline.cli import anomalies, backfill, database, demo, models, runs, status, verify
from anomaly_pipeline.cli.errors import CliError
from anomaly_pipeline.universe import UniverseError

COMMAND_MODULES = (demo, anomalies, database, verify, models, backfill, runs, status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CliError, UniverseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PyMongoError as exc:
        # Host and port only: pymongo's messages do not carry the credentials of the URI.
        print(f"error: the database is not reachable: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-pipeline",
        description="Find anomalous price bars with Dagster and keep an audit trail of each one.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
