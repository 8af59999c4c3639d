"""``anomaly-pipeline anomalies``: stored anomalies, highest score first."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from anomaly_pipeline.cli.errors import non_negative_int


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("anomalies", help="list stored anomalies, highest score first")
    parser.add_argument("--ticker", help="only this ticker, e.g. MSFT or PTT.BK")
    parser.add_argument("--interval", choices=["15m", "1h", "1d"])
    parser.add_argument(
        "--limit", type=non_negative_int, default=20, help="how many (default 20; 0 means all)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON array of documents")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from anomaly_pipeline.resources import build_mongo_resource
    from anomaly_pipeline.storage.mongo import ANOMALIES

    query = {}
    if args.ticker:
        # Yahoo symbols are upper case; accept "msft" for "MSFT".
        query["ticker"] = args.ticker.upper()
    if args.interval:
        query["interval"] = args.interval
    database = build_mongo_resource().get_database()
    cursor = database[ANOMALIES].find(query).sort([("anomaly_score", -1), ("_id", 1)])
    if args.limit:
        cursor = cursor.limit(args.limit)
    documents = list(cursor)
    if args.json:
        print(json.dumps(documents, default=json_value, indent=2))
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
    total = database[ANOMALIES].count_documents(query)
    if total > len(documents):
        print(f"showing {len(documents)} of {total}; --limit 0 shows all")
    return 0


def json_value(value: object) -> str:
    """JSON for what ``json`` cannot encode itself: datetimes as ISO-8601 UTC with ``Z``."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    return str(value)
