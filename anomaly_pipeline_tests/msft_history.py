"""A small real history for tests of verification and models: MSFT daily bars, 1986 to 1990.

Five yearly partitions (about 1,260 bars, 1,120 feature rows after warm-up) are enough to train
an IsolationForest, and small enough that a test can run the whole pipeline through Dagster.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from pymongo.database import Database

from anomaly_pipeline.assets import build_pipeline_assets
from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.partitions import partition_key_for
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import Universe

MARKET = "US"
INTERVAL = "1d"
TICKER = "MSFT"
YEARS = tuple(str(year) for year in range(1986, 1991))
PARTITION_KEYS = tuple(str(partition_key_for(TICKER, year)) for year in YEARS)


@dataclass
class MsftHistory:
    """The four US 1d assets and where they were materialized."""

    universe: Universe
    assets: dict[str, dg.AssetsDefinition]
    resources: dict
    instance: dg.DagsterInstance
    database: Database

    def materialize(
        self,
        stages: tuple[str, ...],
        *,
        run_config: dict | None = None,
        resources: dict | None = None,
        tags: dict[str, str] | None = None,
    ) -> dg.ExecuteInProcessResult:
        """One run of ``stages``; bar stages run as one range over every year."""
        range_tags = {}
        if any(stage != "model" for stage in stages):
            range_tags = {
                ASSET_PARTITION_RANGE_START_TAG: PARTITION_KEYS[0],
                ASSET_PARTITION_RANGE_END_TAG: PARTITION_KEYS[-1],
            }
        return dg.materialize(
            [self.assets[stage] for stage in stages],
            resources=resources or self.resources,
            instance=self.instance,
            run_config=run_config,
            tags={**range_tags, **(tags or {})},
        )

    def train(
        self, *, train_start: str | None = None, resources: dict | None = None
    ) -> dg.ExecuteInProcessResult:
        config = {"train_start": train_start} if train_start else {}
        return self.materialize(
            ("model",),
            run_config={"ops": {self.model_op_name: {"config": config}}},
            resources=resources,
        )

    @property
    def model_op_name(self) -> str:
        return self.assets["model"].op.name


def build_msft_history(
    universe: Universe, resources: dict, instance: dg.DagsterInstance
) -> MsftHistory:
    """Prices, features, a first model (US-1d-1) and anomalies for MSFT 1986 to 1990."""
    stages = ("prices", "features", "model", "anomalies")
    assets = dict(
        zip(
            stages,
            build_pipeline_assets(universe.markets[MARKET], INTERVAL, universe),
            strict=True,
        )
    )
    history = MsftHistory(
        universe=universe,
        assets=assets,
        resources=resources,
        instance=instance,
        database=resources["mongo"].get_database(),
    )
    history.materialize(("prices", "features"))
    history.train()
    history.materialize(("anomalies",))
    return history


@contextmanager
def built_history(mongo_uri: str, universe: Universe) -> Iterator[MsftHistory]:
    """The history built once in a database and instance of its own, dropped afterwards."""
    mongo = MongoResource(uri=mongo_uri, database=f"test_base_{uuid.uuid4().hex[:12]}")
    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(),
    }
    try:
        with dg.instance_for_test() as instance:
            yield build_msft_history(universe, resources, instance)
    finally:
        mongo.get_database().client.drop_database(mongo.database)


def copy_history(base: MsftHistory, resources: dict, instance: dg.DagsterInstance) -> MsftHistory:
    """``base``'s stored data copied into the database of ``resources``, for one test to change.

    Running the pipeline takes seconds per run on a small machine; copying a few documents and a
    model blob takes milliseconds. New runs go to ``instance``.
    """
    target = resources["mongo"].get_database()
    for name in base.database.list_collection_names():
        documents = list(base.database[name].find())
        if documents:
            target[name].insert_many(documents)
    return MsftHistory(
        universe=base.universe,
        assets=base.assets,
        resources=resources,
        instance=instance,
        database=target,
    )
