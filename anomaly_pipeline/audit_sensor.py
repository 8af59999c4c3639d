"""The sensor that audits failed runs, including runs that failed because MongoDB was down.

For every run that failed and meant to materialize assets of this universe, it writes one
``failure`` document per ticker × interval (or per market, for the unpartitioned model) into
``detection_runs``: which stages and partitions the run targeted, which steps failed and why.

It is a plain sensor that walks the instance's run-failure events with its own cursor, not a
``@run_failure_sensor``: in Dagster 1.13 a run status sensor moves its cursor past a run even
when its function raises (the daemon does this on purpose so that side effects are not
repeated), so a failure that happened while the store was unreachable would never be audited.
Here, when MongoDB cannot be reached the tick raises: Dagster records a failed tick, keeps the
cursor, and the next tick retries the same runs. The writes are idempotent, so retrying after a
partial write adds nothing twice.
"""

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)
from pymongo.errors import PyMongoError

from anomaly_pipeline.assets.metadata import trigger_of
from anomaly_pipeline.audit import AuditTrail, FailedRunTarget, audit_ttl_days
from anomaly_pipeline.partitions import bar_partitions, bar_windows
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.storage.local_server import LocalServerError
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import Market, Universe

SENSOR_NAME = "audit_failed_runs"
STAGES = ("prices", "features", "model", "anomalies")
# Failed runs handled per tick; more wait for the next tick (the cursor marks the last one).
RUNS_PER_TICK = 50
_MAX_ERROR_CHARS = 2_000


class AuditStoreUnavailableError(RuntimeError):
    """MongoDB could not be reached; the failed runs stay queued for the next tick."""


@dataclass(frozen=True)
class PipelineAsset:
    market: Market
    interval: str
    stage: str
    partitions_def: dg.MultiPartitionsDefinition | None


def pipeline_asset_index(universe: Universe) -> dict[dg.AssetKey, PipelineAsset]:
    """Every asset of the universe by key, with its market, interval, stage and partitions."""
    index = {}
    for market, interval in universe.pairs():
        partitions_def = bar_partitions(market, interval, universe.history_start[interval])
        for stage in STAGES:
            index[dg.AssetKey([market.key_prefix, interval, stage])] = PipelineAsset(
                market=market,
                interval=interval,
                stage=stage,
                partitions_def=None if stage == "model" else partitions_def,
            )
    return index


def failed_run_targets(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    index: dict[dg.AssetKey, PipelineAsset],
) -> list[FailedRunTarget]:
    """What ``run`` meant to produce, per ticker × interval, with the steps that failed.

    Read from the run's planned materializations (the run's own account of which assets and
    partitions it would write); a run that failed before planning falls back to its asset
    selection and partition tags. Runs that target no asset of the universe give no target.
    """
    planned = _planned_partitions(instance, run.run_id, index)
    if not planned:
        planned = _selected_partitions(run, index)
    step_failures = _step_failures(instance, run.run_id)

    grouped: dict[tuple[str, str, str | None], dict] = {}
    for asset_key, keys in planned.items():
        asset = index[asset_key]
        if asset.partitions_def is None or not keys:
            windows_by_ticker: dict[str | None, list[BarWindow]] = {None: []}
        else:
            windows_by_ticker = {}
            for window in bar_windows(asset.partitions_def, keys, asset.market, asset.interval):
                windows_by_ticker.setdefault(window.ticker, []).append(window)
        for ticker, windows in windows_by_ticker.items():
            entry = grouped.setdefault(
                (asset.market.name, asset.interval, ticker),
                {"asset": asset, "stages": set(), "windows": {}},
            )
            entry["stages"].add(asset.stage)
            entry["windows"].update({str(window.partition_key): window for window in windows})

    targets = []
    for (_, interval, ticker), entry in sorted(grouped.items(), key=lambda item: str(item[0])):
        market = entry["asset"].market
        step_prefix = f"{market.key_prefix}__{interval}__"
        targets.append(
            FailedRunTarget(
                market=market,
                interval=interval,
                ticker=ticker,
                stages=tuple(stage for stage in STAGES if stage in entry["stages"]),
                windows=tuple(sorted(entry["windows"].values(), key=lambda window: window.start)),
                failed_steps=tuple(
                    failure for failure in step_failures if failure["step"].startswith(step_prefix)
                ),
            )
        )
    return targets


def audit_failed_runs(
    instance: dg.DagsterInstance,
    failure_records: Sequence[dg.EventLogRecord],
    trail: AuditTrail,
    index: dict[dg.AssetKey, PipelineAsset],
) -> dict[str, int]:
    """Write failure documents for the runs behind ``failure_records``; returns counts."""
    oldest_kept = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=trail.ttl_days)
    counts = {"runs": 0, "documents": 0, "not_pipeline_runs": 0, "expired": 0}
    for record in failure_records:
        run_record = instance.get_run_record_by_id(record.event_log_entry.run_id)
        if run_record is None:
            counts["not_pipeline_runs"] += 1
            continue
        run = run_record.dagster_run
        finished_at = _utc(run_record.end_time or record.timestamp)
        if finished_at < oldest_kept:
            # The TTL index would delete the document at once.
            counts["expired"] += 1
            continue
        targets = failed_run_targets(instance, run, index)
        if not targets:
            counts["not_pipeline_runs"] += 1
            continue
        counts["runs"] += 1
        counts["documents"] += trail.record_failure(
            run=run,
            trigger=trigger_of(run.tags),
            run_started_at=_utc(run_record.start_time) if run_record.start_time else None,
            finished_at=finished_at,
            targets=targets,
            run_error=_run_error(record),
        )
    return counts


def build_failed_run_audit_sensor(universe: Universe) -> dg.SensorDefinition:
    index = pipeline_asset_index(universe)

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Writes an audit document to MongoDB collection `detection_runs` for every failed "
            "run of the pipeline's assets: per ticker and interval, the stages and partitions "
            "it targeted and the error of each failed step. While MongoDB is unreachable its "
            "ticks fail and keep their place, so failures from an outage are audited once the "
            "store is back. Requests no runs; a tick that audited runs says how many."
        ),
    )
    def audit_failed_runs_sensor(
        context: dg.SensorEvaluationContext, mongo: MongoResource
    ) -> dg.SkipReason:
        changes = context.instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(
                event_type=dg.DagsterEventType.RUN_FAILURE,
                after_storage_id=int(context.cursor) if context.cursor else None,
            ),
            limit=RUNS_PER_TICK,
            ascending=True,
        )
        if not changes.records:
            return dg.SkipReason("no runs failed since the last tick")
        try:
            trail = AuditTrail(mongo.get_database(), ttl_days=audit_ttl_days())
            counts = audit_failed_runs(context.instance, changes.records, trail, index)
        except (PyMongoError, LocalServerError) as exc:
            raise AuditStoreUnavailableError(
                f"could not reach MongoDB to audit {len(changes.records)} failed run(s); the "
                f"next tick retries them: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        context.update_cursor(str(changes.records[-1].storage_id))
        return dg.SkipReason(
            f"audited {counts['runs']} failed run(s), {counts['documents']} new document(s); "
            f"skipped {counts['not_pipeline_runs']} run(s) outside the pipeline and "
            f"{counts['expired']} older than the audit retention"
        )

    return audit_failed_runs_sensor


def _planned_partitions(
    instance: dg.DagsterInstance, run_id: str, index: dict[dg.AssetKey, PipelineAsset]
) -> dict[dg.AssetKey, list[str]]:
    planned: dict[dg.AssetKey, list[str]] = {}
    cursor = None
    while True:
        connection = instance.get_records_for_run(
            run_id,
            cursor=cursor,
            of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
            limit=1_000,
        )
        for record in connection.records:
            data = record.event_log_entry.dagster_event.asset_materialization_planned_data
            if data.asset_key not in index:
                continue
            keys = planned.setdefault(data.asset_key, [])
            if data.partition is not None:
                keys.append(str(data.partition))
            elif data.partitions_subset is not None:
                keys.extend(str(key) for key in data.partitions_subset.get_partition_keys())
        if not connection.has_more:
            return planned
        cursor = connection.cursor


def _selected_partitions(
    run: dg.DagsterRun, index: dict[dg.AssetKey, PipelineAsset]
) -> dict[dg.AssetKey, list[str]]:
    selected: dict[dg.AssetKey, list[str]] = {}
    for key in run.asset_selection or ():
        if key in index:
            selected[key] = _tagged_partition_keys(run.tags, index[key].partitions_def)
    return selected


def _tagged_partition_keys(
    tags: dict[str, str], partitions_def: dg.MultiPartitionsDefinition | None
) -> list[str]:
    if partitions_def is None:
        return []
    if PARTITION_NAME_TAG in tags:
        return [tags[PARTITION_NAME_TAG]]
    if ASSET_PARTITION_RANGE_START_TAG in tags and ASSET_PARTITION_RANGE_END_TAG in tags:
        key_range = dg.PartitionKeyRange(
            tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG]
        )
        return [str(key) for key in partitions_def.get_partition_keys_in_range(key_range)]
    return []


def _step_failures(instance: dg.DagsterInstance, run_id: str) -> list[dict[str, str]]:
    connection = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_FAILURE, limit=1_000
    )
    failures = []
    for record in connection.records:
        event = record.event_log_entry.dagster_event
        failures.append({"step": event.step_key, "message": _step_error(event)})
    return failures


def _step_error(event: dg.DagsterEvent) -> str:
    data = event.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description[:_MAX_ERROR_CHARS]
    error = data.error
    if error is None:
        return event.message or "step failed without an error message"
    # Dagster wraps what the step raised; the reader needs the exception underneath.
    while error.cause is not None and error.cls_name.startswith("DagsterExecution"):
        error = error.cause
    return error.message.strip()[:_MAX_ERROR_CHARS]


def _run_error(record: dg.EventLogRecord) -> str | None:
    event = record.event_log_entry.dagster_event
    message = event.message if event is not None else record.event_log_entry.message
    failure_data = event.job_failure_data if event is not None else None
    if failure_data is not None and failure_data.error is not None:
        message = f"{message} {failure_data.error.message.strip()}"
    return message[:_MAX_ERROR_CHARS] if message else None


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc)
