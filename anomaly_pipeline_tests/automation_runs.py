"""Helpers for tests that drive the schedules and sensors through real Dagster machinery."""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.assets import build_all_assets
from anomaly_pipeline.automation import build_automation_definitions
from anomaly_pipeline.partitions import bar_partitions
from anomaly_pipeline.universe import Universe

# Fields a detection sets per run or per write; everything else must come out identical.
RUN_SPECIFIC_FIELDS = ("detection_run_id", "updated_at", "created_at")


def automation_definitions(universe: Universe, resources: dict) -> dg.Definitions:
    """The pipeline's assets with the given resources, plus every schedule, sensor and job."""
    return dg.Definitions.merge(
        dg.Definitions(assets=build_all_assets(universe), resources=resources),
        build_automation_definitions(universe),
    )


def evaluate_sensor(
    definitions: dg.Definitions, name: str, instance: dg.DagsterInstance, cursor: str | None
):
    """One tick of a sensor, as the daemon evaluates it: the SensorExecutionData."""
    sensor = definitions.resolve_sensor_def(name)
    # The daemon hands a sensor the code location's resources; a built context needs them given.
    with dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=definitions,
        sensor_name=name,
        resources=definitions.resources,
    ) as context:
        return sensor.evaluate_tick(context)


def execute_request(
    definitions: dg.Definitions,
    request: dg.RunRequest,
    instance: dg.DagsterInstance,
    *,
    extra_tags: dict | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """Run what a run request asks for, in process, on ``instance``."""
    job = definitions.resolve_job_def(request.job_name)
    return job.execute_in_process(
        instance=instance,
        partition_key=request.partition_key,
        tags={**request.tags, **(extra_tags or {})},
        asset_selection=request.asset_selection,
        raise_on_error=raise_on_error,
    )


def requested_partitions(
    request: dg.RunRequest, universe: Universe, market: str, interval: str
) -> list[str]:
    """The partition keys a run request covers."""
    if request.partition_key:
        return [str(request.partition_key)]
    partitions = bar_partitions(
        universe.markets[market], interval, universe.history_start[interval]
    )
    return [
        str(key)
        for key in partitions.get_partition_keys_in_range(
            dg.PartitionKeyRange(
                request.tags[ASSET_PARTITION_RANGE_START_TAG],
                request.tags[ASSET_PARTITION_RANGE_END_TAG],
            )
        )
    ]


def comparable_anomalies(database) -> dict[str, dict]:
    """Stored anomalies by _id without the fields that differ between runs."""
    return {
        document["_id"]: {k: v for k, v in document.items() if k not in RUN_SPECIFIC_FIELDS}
        for document in database["anomalies"].find()
    }
