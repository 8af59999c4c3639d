"""Runs one materialization in its own process, for tests that kill it at a failpoint.

Usage: ``python -m anomaly_pipeline_tests.crash_runner '<json>'`` with keys ``uri``,
``database``, ``market``, ``interval``, ``stages``, ``first`` and ``last``. The parent sets
``ANOMALY_PIPELINE_KILL_AT`` to choose where this process dies.
"""

from __future__ import annotations

import json
import sys

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import PACKAGED_UNIVERSE, load_universe
from anomaly_pipeline_tests.pipeline_runs import pipeline_assets


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    mongo = MongoResource(uri=spec["uri"], database=spec["database"])
    assets = pipeline_assets(load_universe(PACKAGED_UNIVERSE), spec["market"], spec["interval"])
    result = dg.materialize(
        [assets[stage] for stage in spec["stages"]],
        tags={
            ASSET_PARTITION_RANGE_START_TAG: spec["first"],
            ASSET_PARTITION_RANGE_END_TAG: spec["last"],
        },
        resources={
            "mongo": mongo,
            "model_store": ModelStoreResource(mongo=mongo),
            "price_source": FilesPriceSource(),
        },
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
