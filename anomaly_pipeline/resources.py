"""The resources a deployment uses, chosen from environment variables.

``MONGODB_URI`` selects a real MongoDB (read through ``dg.EnvVar`` so the URI never lands in
run config); without it, the local server under ``ANOMALY_PIPELINE_HOME`` is used.
``ANOMALY_PIPELINE_PRICE_SOURCE`` is ``files`` (default: the shipped sample, or the folder in
``ANOMALY_PIPELINE_FILES_DIR``) or ``yfinance``. ``ANOMALY_PIPELINE_KEEP_MODELS`` is how many
model versions per market and interval the store keeps (default 5; versions that stored
anomalies reference are kept as well).
"""

from __future__ import annotations

import os

import dagster as dg

from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.prices.source import PriceSource
from anomaly_pipeline.settings import (
    FILES_DIR_ENV_VAR,
    MONGODB_URI_ENV_VAR,
    PRICE_SOURCE_ENV_VAR,
    SAMPLE_DATA_DIR,
    database_name,
)
from anomaly_pipeline.storage.mongo import MongoResource

PRICE_SOURCES = ("files", "yfinance")
KEEP_MODELS_ENV_VAR = "ANOMALY_PIPELINE_KEEP_MODELS"
DEFAULT_KEEP_MODELS = 5


def build_mongo_resource() -> MongoResource:
    if os.environ.get(MONGODB_URI_ENV_VAR):
        return MongoResource(uri=dg.EnvVar(MONGODB_URI_ENV_VAR), database=database_name())
    return MongoResource(database=database_name())


def build_price_source() -> PriceSource:
    kind = os.environ.get(PRICE_SOURCE_ENV_VAR, "files")
    if kind == "files":
        return FilesPriceSource(directory=os.environ.get(FILES_DIR_ENV_VAR, str(SAMPLE_DATA_DIR)))
    if kind == "yfinance":
        from anomaly_pipeline.prices.yfinance_source import YFinancePriceSource

        return YFinancePriceSource()
    raise ValueError(
        f"{PRICE_SOURCE_ENV_VAR}={kind!r} is not a price source; expected one of {PRICE_SOURCES}"
    )


def keep_model_versions() -> int:
    text = os.environ.get(KEEP_MODELS_ENV_VAR, str(DEFAULT_KEEP_MODELS))
    # Zero would let pruning delete the model that is serving right now.
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{KEEP_MODELS_ENV_VAR}={text!r} must be a whole number of at least 1")
    return int(text)


def build_resources() -> dict[str, dg.ConfigurableResource]:
    mongo = build_mongo_resource()
    return {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo, keep_versions=keep_model_versions()),
        "price_source": build_price_source(),
    }
