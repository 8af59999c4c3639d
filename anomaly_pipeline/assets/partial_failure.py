"""How a ranged run that fails part-way reports the partitions it did store.

Every partition is written with one atomic write per document, so after a failure part-way
through a ranged run each partition holds either what it held before the run or its complete new
data, never a mix. The partitions completely stored before the failure are reported to Dagster
as materialized, with their metadata; the partition that failed and those the run never reached
are marked failed. "Materialize failed partitions" then repeats only those, and the UI shows
which data is really there.

The prices and features assets work this way. The anomalies asset does not: it checks every
partition's inputs before its first write, and its audit record covers the whole run, so a
failure there marks the whole range failed; partitions it had already replaced hold their
complete new anomaly sets, and running the range again converges (see storage/anomaly_store.py).
"""

from collections.abc import Mapping, Sequence
from typing import NoReturn

import dagster as dg


def fail_after_storing(
    context: dg.AssetExecutionContext,
    stored: Mapping[str, Mapping[str, dg.MetadataValue]],
    problems: Sequence[str],
    *,
    planned: int,
    allow_retries: bool = False,
) -> NoReturn:
    """Report ``stored`` partitions (key -> metadata) as materialized, then fail the step.

    ``problems`` are messages that each name the ticker, interval and partition at fault;
    ``planned`` is how many partitions the run was asked for.
    """
    for partition_key, metadata in stored.items():
        context.log_event(
            dg.AssetMaterialization(
                asset_key=context.asset_key, partition=partition_key, metadata=dict(metadata)
            )
        )
    asset = context.asset_key.to_user_string()
    raise dg.Failure(
        description=(
            f"{planned - len(stored)} of {planned} partition(s) of {asset} were not stored; the "
            f"{len(stored)} stored before the failure are complete and are reported as "
            "materialized:\n" + "\n".join(problems)
        ),
        allow_retries=allow_retries,
    )
