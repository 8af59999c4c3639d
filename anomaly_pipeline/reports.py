"""What the CLI prints after a demo: a summary a person can read at a glance."""

from __future__ import annotations

import dagster as dg

from anomaly_pipeline.demo import DemoResult
from anomaly_pipeline.modeling.model_store import ModelStore
from anomaly_pipeline.resources import build_mongo_resource
from anomaly_pipeline.storage.mongo import ANOMALIES, PRICE_BARS
from anomaly_pipeline.universe import Universe


def print_demo_report(universe: Universe, result: DemoResult, instance: dg.DagsterInstance) -> None:
    mongo = build_mongo_resource()
    database = mongo.get_database()

    print("\nSample universe")
    for market in universe.markets.values():
        print(
            f"  {market.name:<7} {market.timezone:<17} {', '.join(market.intervals):<8} "
            f"{', '.join(market.tickers)}"
        )

    bars = sum(d["bar_count"] for d in database[PRICE_BARS].find({}, {"bar_count": 1}))
    partitions = sum(item.partitions for item in result.ranges)
    print(
        f"\nProcessed {partitions} partitions holding {bars} bars in {len(result.run_ids)} Dagster "
        f"runs ({result.seconds:.0f} s)"
    )

    print("\nAnomalies per ticker and interval")
    counts = {
        (row["_id"]["ticker"], row["_id"]["interval"]): row["n"]
        for row in database[ANOMALIES].aggregate(
            [{"$group": {"_id": {"ticker": "$ticker", "interval": "$interval"}, "n": {"$sum": 1}}}]
        )
    }
    for market, interval in universe.pairs():
        for ticker in market.tickers:
            print(f"  {ticker:<10} {interval:<4} {counts.get((ticker, interval), 0):>5}")

    print("\nTop 10 anomalies")
    for document in database[ANOMALIES].find().sort([("anomaly_score", -1), ("_id", 1)]).limit(10):
        print(
            f"  {document['anomaly_score']:.4f}  {document['ticker']:<10} "
            f"{document['interval']:<4} "
            f"{document['timestamp']:%Y-%m-%d %H:%M} UTC"
        )

    print("\nModels")
    store = ModelStore(database)
    for market, interval in universe.pairs():
        record = store.current_record(market.name, interval)
        if record:
            print(f"  {record['_id']:<14} sha256 {record['sha256']}")

    print("\nWhere the data is")
    print(f"  database: {mongo.describe_location()}")
    print(f"  Dagster instance: {instance.root_directory}")
    print("\nOpen the Dagster UI on the same instance (from the folder you ran this in):")
    print(f'  DAGSTER_HOME="{instance.root_directory}" dagster dev -w workspace.yaml')
