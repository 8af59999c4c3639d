"""Environment settings shared by the CLI, the Dagster definitions and the tests."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "ANOMALY_PIPELINE_HOME"
MONGODB_URI_ENV_VAR = "MONGODB_URI"
DATABASE_ENV_VAR = "ANOMALY_PIPELINE_DATABASE"
PRICE_SOURCE_ENV_VAR = "ANOMALY_PIPELINE_PRICE_SOURCE"
FILES_DIR_ENV_VAR = "ANOMALY_PIPELINE_FILES_DIR"

DEFAULT_DATABASE = "anomaly_pipeline"
SAMPLE_DATA_DIR = Path(__file__).parent / "sample_data"


def pipeline_home() -> Path:
    """Where the local database and the Dagster instance live (created on first use)."""
    home = Path(os.environ.get(HOME_ENV_VAR, ".anomaly_pipeline")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def dagster_home() -> Path:
    """``$DAGSTER_HOME`` when set, else the ``dagster`` folder of the pipeline home."""
    configured = os.environ.get("DAGSTER_HOME")
    path = Path(configured).expanduser().resolve() if configured else pipeline_home() / "dagster"
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_name() -> str:
    return os.environ.get(DATABASE_ENV_VAR, DEFAULT_DATABASE)
