"""``anomaly-pipeline models``: the stored models of each market and interval.

For every market and interval: the current version and what identifies it (SHA-256 and the
scikit-learn that wrote it), what it was trained on, its parameters and threshold, and every
version the store keeps, with how many stored anomalies each one found.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from anomaly_pipeline.cli.anomalies import json_value

if TYPE_CHECKING:
    from pymongo.database import Database


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "models", help="show the stored models of each market and interval, newest first"
    )
    parser.add_argument("--market", help="only this market, e.g. US or SET")
    parser.add_argument("--interval", choices=["15m", "1h", "1d"])
    parser.add_argument("--json", action="store_true", help="print one JSON array")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from anomaly_pipeline.resources import build_mongo_resource, keep_model_versions

    # Outside a run nothing resolves the resource's dg.EnvVar for MONGODB_URI; this does.
    database = build_mongo_resource().process_config_and_initialize().get_database()
    summaries = model_summaries(database, market=args.market, interval=args.interval)
    keep = keep_model_versions()
    if args.json:
        print(json.dumps([{**s, "keep_versions": keep} for s in summaries], default=json_value))
        return 0
    if not summaries:
        print("no models stored" + (" for that selection" if args.market or args.interval else ""))
        return 0
    for summary in summaries:
        print_summary(summary, keep)
    return 0


def model_summaries(
    database: Database, *, market: str | None = None, interval: str | None = None
) -> list[dict]:
    """Per market and interval: the current record and every kept version, newest first.

    Each version record gains ``anomalies``, the number of stored anomalies it found: pruning
    never deletes a version while that number is above zero.
    """
    from anomaly_pipeline.storage.mongo import ANOMALIES, MODELS

    query = {}
    if market:
        query["market"] = market
    if interval:
        query["interval"] = interval
    found_by_hash = {
        row["_id"]: row["anomalies"]
        for row in database[ANOMALIES].aggregate(
            [{"$group": {"_id": "$model_hash", "anomalies": {"$sum": 1}}}]
        )
    }
    by_pair: dict[tuple[str, str], list[dict]] = {}
    for record in database[MODELS].find(
        query, sort=[("market", 1), ("interval", 1), ("sequence", -1)]
    ):
        record["anomalies"] = found_by_hash.get(record["sha256"], 0)
        by_pair.setdefault((record["market"], record["interval"]), []).append(record)
    return [
        {
            "market": pair_market,
            "interval": pair_interval,
            "current": versions[0],
            "versions": versions,
        }
        for (pair_market, pair_interval), versions in by_pair.items()
    ]


def print_summary(summary: dict, keep: int) -> None:
    current = summary["current"]
    window = current["training_window"]
    print(f"{summary['market']} {summary['interval']}: current model {current['_id']}")
    print(f"  sha256:         {current['sha256']}")
    print(f"  scikit-learn:   {current['sklearn_version']}")
    print(
        f"  trained on:     {current['training_rows']} rows of {', '.join(current['tickers'])}, "
        f"bars {_moment(window['first_bar'])} to {_moment(window['last_bar'])} "
        f"(requested {_moment(window['requested_start'], 'all history')} to "
        f"{_moment(window['requested_end'], 'now')})"
    )
    print(f"  features:       {', '.join(current['feature_names'])}")
    print(
        "  parameters:     "
        + ", ".join(f"{name}={value}" for name, value in current["params"].items())
    )
    print(
        f"  threshold:      {current['threshold']:.6f} (flags {current['flag_rate']:.2%} of bars "
        "like the training data)"
    )
    print(f"  size:           {current['size_bytes']:,} bytes")
    print(
        f"  created:        {_moment(current['created_at'])} by run {current['created_by_run_id']}"
    )
    print(f"  versions kept:  the newest {keep}, and any version stored anomalies still reference")
    for position, record in enumerate(summary["versions"]):
        if position == 0:
            role = "current"
        elif position < keep:
            role = "kept"
        elif record["anomalies"]:
            role = "kept: stored anomalies reference it"
        else:
            role = "pruned at the next training"
        print(
            f"    {record['_id']:<16} sha256 {record['sha256'][:12]}  "
            f"{record['training_rows']:>9} rows  threshold {record['threshold']:.6f}  "
            f"created {_moment(record['created_at'])}  "
            f"{record['anomalies']:>6} anomalies  {role}"
        )
    print()


def _moment(value, missing: str = "-") -> str:
    if value is None:
        return missing
    return f"{value:%Y-%m-%d %H:%M} UTC"
