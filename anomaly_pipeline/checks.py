"""Asset checks on what the pipeline stored: prices, features and anomalies of each market.

How the checks meet partitions: every check is unpartitioned and reads MongoDB, choosing its
scope from the run it executes in.

- In a run that materializes partitions of the asset together with its checks (the default
  when materializing from the UI), a check verifies exactly the partitions of that run, read
  from the run's partition key or partition range. A partition missing from the store then is
  a failure: the asset reported it written.
- Launched on its own ("Execute" on the check in the UI; an unpartitioned check runs without
  partitions), it verifies every stored partition of its market and interval.

Dagster 1.13 also offers partitioned asset checks, but only as a preview, and their results
are keyed to a single partition: a ranged run (the way backfills of these assets run, up to 500
partitions at once) would report one result without a partition. One result per check and run,
with the failing partitions listed in its metadata, reads better and works for ranged runs.

The price and feature checks are blocking: in a run that also materializes the next asset,
a failed check stops it, so malformed bars never reach features and non-finite features never
reach the model or detection.
"""

import warnings
from collections.abc import Callable, Iterator, Sequence

import dagster as dg
import numpy as np
import pandas as pd
from dagster_pandas import PandasColumn, create_dagster_pandas_dataframe_type
from dagster_pandas.constraints import (
    ConstraintViolationException,
    DataFrameConstraint,
    DataFrameConstraintViolationException,
)
from dagster_pandas.validation import validate_constraints
from pymongo.database import Database

from anomaly_pipeline.assets.anomalies import anomalies_asset_key
from anomaly_pipeline.assets.features import features_asset_key
from anomaly_pipeline.assets.prices import prices_asset_key
from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.partitions import bar_partitions, bar_windows
from anomaly_pipeline.prices.frames import PRICE_COLUMNS
from anomaly_pipeline.storage.bar_store import (
    bars_from_document,
    features_from_document,
    partition_document_id,
)
from anomaly_pipeline.storage.mongo import (
    ANOMALIES,
    BAR_FEATURES,
    MODEL_BLOBS,
    MODELS,
    PRICE_BARS,
    MongoResource,
)
from anomaly_pipeline.universe import Market, Universe

# Failing partitions listed in a check's metadata; the count is always complete.
MAX_LISTED_FAILURES = 20


class IncreasingTimestamps(DataFrameConstraint):
    """Bar timestamps are strictly increasing (sorted and without duplicates)."""

    def __init__(self) -> None:
        super().__init__(
            error_description="timestamps must be strictly increasing",
            markdown_description="`timestamp` strictly increasing",
        )

    def validate(self, dataframe: pd.DataFrame) -> None:
        steps = dataframe["timestamp"].diff().iloc[1:]
        bad = steps[steps <= pd.Timedelta(0)]
        if len(bad):
            stamp = dataframe["timestamp"].iloc[bad.index[0]]
            raise DataFrameConstraintViolationException(
                "IncreasingTimestamps",
                f"{len(bad)} bar(s) not after the bar before them; first at {stamp.isoformat()}",
            )


class ConsistentOhlc(DataFrameConstraint):
    """Prices are finite and positive; high is the bar's maximum and low its minimum."""

    def __init__(self) -> None:
        super().__init__(
            error_description="high must be the maximum and low the minimum of the bar",
            markdown_description="prices finite and > 0; `low` <= `open`, `close` <= `high`",
        )

    def validate(self, dataframe: pd.DataFrame) -> None:
        prices = dataframe[["open", "high", "low", "close"]].to_numpy(dtype="float64")
        finite = np.isfinite(prices).all(axis=1)
        positive = (np.where(np.isfinite(prices), prices, 1.0) > 0).all(axis=1)
        high_is_max = prices[:, 1] >= prices.max(axis=1)
        low_is_min = prices[:, 2] <= prices.min(axis=1)
        for rule, holds in (
            ("prices finite", finite),
            ("prices > 0", positive),
            ("high is the bar's maximum", high_is_max),
            ("low is the bar's minimum", low_is_min),
        ):
            if not holds.all():
                first = int(np.argmin(holds))
                raise DataFrameConstraintViolationException(
                    "ConsistentOhlc",
                    f"{int((~holds).sum())} bar(s) break '{rule}'; first at "
                    f"{dataframe['timestamp'].iloc[first].isoformat()}",
                )


# dagster-pandas marks its whole API beta; its notice would print on every code-location load.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    BAR_COLUMNS = [
        PandasColumn.datetime_column("timestamp", non_nullable=True, unique=True, tz="UTC"),
        *(PandasColumn.float_column(name, non_nullable=True) for name in PRICE_COLUMNS[:4]),
        PandasColumn.float_column("volume", min_value=0.0, non_nullable=True),
    ]
    BAR_CONSTRAINTS = [IncreasingTimestamps(), ConsistentOhlc()]
    CanonicalBarFrame = create_dagster_pandas_dataframe_type(
        name="CanonicalBarFrame",
        description=(
            "Stored OHLCV bars of one partition, timestamp as a column: UTC bar starts, strictly "
            "increasing; consistent OHLC; no negative volume."
        ),
        columns=BAR_COLUMNS,
        dataframe_constraints=BAR_CONSTRAINTS,
    )


def bars_problem(bars: pd.DataFrame) -> str | None:
    """Why a bar frame (timestamp index, OHLCV columns) breaks the canonical contract, or None.

    Applies the column and frame constraints of the CanonicalBarFrame type, timestamp as a
    column. ``dg.check_dagster_type`` would do the same through a throw-away Dagster instance
    per call (about 0.2 s each), far too slow for hundreds of partitions per check.
    """
    try:
        validate_constraints(
            bars.reset_index(names="timestamp"),
            pandas_columns=BAR_COLUMNS,
            dataframe_constraints=BAR_CONSTRAINTS,
        )
    except ConstraintViolationException as exc:
        # dagster-pandas appends the offending rows as a printed frame; keep it on one line.
        return " ".join(str(exc).split())
    return None


def features_problem(features: pd.DataFrame) -> str | None:
    """Why a feature frame holds a missing, non-finite or absent feature, or None."""
    absent = [name for name in FEATURE_NAMES if name not in features.columns]
    if absent:
        return f"feature {absent[0]} is not stored"
    values = features[list(FEATURE_NAMES)].to_numpy(dtype="float64")
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    row, column = np.argwhere(bad)[0]
    count = int(bad[:, column].sum())
    return (
        f"feature {FEATURE_NAMES[column]} is missing or not finite in {count} row(s); "
        f"first at {features.index[row].isoformat()}"
    )


def price_document_problem(document: dict) -> str | None:
    """Why a stored ``price_bars`` partition breaks the canonical bar contract, or None.

    Bars are read as stored, with no sorting or repair, so the check sees what readers see.
    """
    try:
        bars = bars_from_document(document)
    except (KeyError, ValueError) as exc:
        return f"stored columns cannot be read as bars: {exc}"
    if document.get("bar_count") != len(bars):
        return f"bar_count {document.get('bar_count')} but {len(bars)} bars stored"
    return bars_problem(bars)


def features_document_problem(document: dict) -> str | None:
    """Why a stored ``bar_features`` partition holds a missing or non-finite value, or None."""
    try:
        features = features_from_document(document)
    except KeyError as exc:
        return f"feature {exc.args[0]} is not stored"
    except ValueError as exc:
        return f"stored columns cannot be read as features: {exc}"
    if document.get("row_count") != len(features):
        return f"row_count {document.get('row_count')} but {len(features)} rows stored"
    return features_problem(features)


def missing_model_problems(database: Database, anomaly_query: dict) -> tuple[int, list[str]]:
    """(anomalies checked, problems): each model the anomalies reference must be stored whole."""
    groups = database[ANOMALIES].aggregate(
        [
            {"$match": anomaly_query},
            {
                "$group": {
                    "_id": {"version": "$model_version", "hash": "$model_hash"},
                    "anomalies": {"$sum": 1},
                }
            },
            {"$sort": {"_id.version": 1}},
        ]
    )
    checked, problems = 0, []
    for group in groups:
        version, sha256 = group["_id"].get("version"), group["_id"].get("hash")
        count = group["anomalies"]
        checked += count
        record = database[MODELS].find_one({"_id": version}) if version else None
        if record is None:
            problems.append(f"{count} anomalies reference model {version}, which is not stored")
        elif record["sha256"] != sha256:
            problems.append(
                f"{count} anomalies reference model {version} with hash {str(sha256)[:12]}, "
                f"but the stored {version} hashes to {record['sha256'][:12]}"
            )
        elif database[f"{MODEL_BLOBS}.files"].find_one({"_id": record["blob_id"]}) is None:
            problems.append(f"{count} anomalies reference model {version}, whose bytes are gone")
    return checked, problems


def build_asset_checks(universe: Universe) -> list[dg.AssetChecksDefinition]:
    checks: list[dg.AssetChecksDefinition] = []
    for market, interval in universe.pairs():
        partitions_def = bar_partitions(market, interval, universe.history_start[interval])
        checks += [
            _prices_check(market, interval, partitions_def),
            _features_check(market, interval, partitions_def),
            _anomalies_check(market, interval, partitions_def),
        ]
    return checks


def _prices_check(
    market: Market, interval: str, partitions_def: dg.MultiPartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=prices_asset_key(market, interval),
        name="bars_well_formed",
        blocking=True,
        description=(
            "Stored bars have unique, strictly increasing UTC timestamps, finite positive "
            "prices with high the maximum and low the minimum of each bar, and no negative "
            "volume. Checks the run's partitions, or every stored partition when run alone."
        ),
    )
    def bars_well_formed(
        context: dg.AssetCheckExecutionContext, mongo: MongoResource
    ) -> dg.AssetCheckResult:
        return _check_stored_partitions(
            context, mongo, PRICE_BARS, market, interval, partitions_def,
            price_document_problem, count_field="bar_count", count_label="bars_checked",
        )  # fmt: skip

    return bars_well_formed


def _features_check(
    market: Market, interval: str, partitions_def: dg.MultiPartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=features_asset_key(market, interval),
        name="features_finite",
        blocking=True,
        description=(
            f"Every stored feature value ({len(FEATURE_NAMES)} per bar) is present and finite, "
            "with one value per feature row. Checks the run's partitions, or every stored "
            "partition when run alone."
        ),
    )
    def features_finite(
        context: dg.AssetCheckExecutionContext, mongo: MongoResource
    ) -> dg.AssetCheckResult:
        return _check_stored_partitions(
            context, mongo, BAR_FEATURES, market, interval, partitions_def,
            features_document_problem, count_field="row_count", count_label="rows_checked",
        )  # fmt: skip

    return features_finite


def _check_stored_partitions(
    context: dg.AssetCheckExecutionContext,
    mongo: MongoResource,
    collection: str,
    market: Market,
    interval: str,
    partitions_def: dg.MultiPartitionsDefinition,
    document_problem: Callable[[dict], str | None],
    *,
    count_field: str,
    count_label: str,
) -> dg.AssetCheckResult:
    """Run ``document_problem`` over the partition documents in the check's scope."""
    problems, checked, counted = [], 0, 0
    for key, document in _scoped_documents(
        context, mongo.get_database(), collection, market, interval, partitions_def
    ):
        checked += 1
        if document is None:
            problems.append((key, "not stored"))
            continue
        counted += document.get(count_field) or 0
        problem = document_problem(document)
        if problem:
            problems.append((key, problem))
    return _result(problems, checked, {count_label: dg.MetadataValue.int(counted)})


def _anomalies_check(
    market: Market, interval: str, partitions_def: dg.MultiPartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=anomalies_asset_key(market, interval),
        name="models_on_record",
        description=(
            "Every stored anomaly names a model version that is still in the store with the "
            "same SHA-256 and its bytes, so each finding can be traced to the model behind it. "
            "Checks the run's partitions, or every stored anomaly when run alone."
        ),
    )
    def models_on_record(
        context: dg.AssetCheckExecutionContext, mongo: MongoResource
    ) -> dg.AssetCheckResult:
        query: dict = {"market": market.name, "interval": interval}
        keys = _run_partition_keys(context)
        if keys is not None:
            query["partition_key"] = {"$in": [str(key) for key in keys]}
        checked, problems = missing_model_problems(mongo.get_database(), query)
        return dg.AssetCheckResult(
            passed=not problems,
            description="; ".join(problems) if problems else None,
            metadata={
                "anomalies_checked": dg.MetadataValue.int(checked),
                "scope": dg.MetadataValue.text(
                    "every stored anomaly" if keys is None else f"{len(keys)} partition(s)"
                ),
                "problems": dg.MetadataValue.int(len(problems)),
            },
        )

    return models_on_record


def _run_partition_keys(context: dg.AssetCheckExecutionContext) -> list[str] | None:
    """The partitions of the run the check executes in; None when the run has none."""
    run_context = context.op_execution_context
    if run_context.has_partition_key or run_context.has_partition_key_range:
        return list(run_context.partition_keys)
    return None


def _scoped_documents(
    context: dg.AssetCheckExecutionContext,
    database: Database,
    collection: str,
    market: Market,
    interval: str,
    partitions_def: dg.MultiPartitionsDefinition,
) -> Iterator[tuple[str, dict | None]]:
    """(partition key, stored document or None) for each partition in the check's scope."""
    keys = _run_partition_keys(context)
    if keys is None:
        cursor = database[collection].find(
            {"ticker": {"$in": list(market.tickers)}, "interval": interval},
            sort=[("ticker", 1), ("window_start", 1)],
        )
        for document in cursor:
            yield document["partition_key"], document
        return
    for window in bar_windows(partitions_def, keys, market, interval):
        document_id = partition_document_id(window.ticker, interval, window.start)
        yield str(window.partition_key), database[collection].find_one({"_id": document_id})


def _result(
    problems: Sequence[tuple[str, str]],
    checked: int,
    extra_metadata: dict[str, dg.MetadataValue],
) -> dg.AssetCheckResult:
    metadata = {
        "partitions_checked": dg.MetadataValue.int(checked),
        "partitions_failing": dg.MetadataValue.int(len(problems)),
        **extra_metadata,
    }
    if problems:
        rows = "\n".join(
            f"| {key} | {problem.replace('|', '/')} |"
            for key, problem in problems[:MAX_LISTED_FAILURES]
        )
        metadata["failing_partitions"] = dg.MetadataValue.md(
            f"| partition | problem |\n|---|---|\n{rows}"
        )
        return dg.AssetCheckResult(
            passed=False,
            metadata=metadata,
            description=f"{len(problems)} of {checked} partition(s) fail: {problems[0][1]}",
        )
    return dg.AssetCheckResult(passed=True, metadata=metadata)
