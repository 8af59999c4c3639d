"""``anomaly-pipeline demo``: the main job on the shipped sample data."""

from __future__ import annotations

import argparse
import sys


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the whole pipeline on the shipped sample data")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from anomaly_pipeline.demo import run_demo
    from anomaly_pipeline.instance import local_instance
    from anomaly_pipeline.reports import print_demo_report
    from anomaly_pipeline.universe import load_universe

    universe = load_universe()
    instance = local_instance()
    print(f"anomaly-pipeline demo: universe {universe.path}")
    for problem in universe.errors.values():
        print(f"warning: left out of the universe: {problem}", file=sys.stderr)
    try:
        result = run_demo(instance, universe)
    except Exception as exc:  # a failed Dagster run: report it and exit non-zero
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print_demo_report(universe, result, instance)
    return 0
