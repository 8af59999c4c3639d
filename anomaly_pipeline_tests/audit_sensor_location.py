"""A code location holding only the failed-run audit sensor, for tests that tick it through
Dagster's own sensor daemon code. Its MongoDB comes from two environment variables the test
sets before loading it."""

from __future__ import annotations

import os

import dagster as dg

from anomaly_pipeline.audit_sensor import build_failed_run_audit_sensor
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.universe import PACKAGED_UNIVERSE, load_universe

URI_ENV_VAR = "AUDIT_SENSOR_TEST_MONGODB_URI"
DATABASE_ENV_VAR = "AUDIT_SENSOR_TEST_DATABASE"

defs = dg.Definitions(
    sensors=[build_failed_run_audit_sensor(load_universe(PACKAGED_UNIVERSE))],
    resources={
        "mongo": MongoResource(
            uri=os.environ[URI_ENV_VAR],
            database=os.environ[DATABASE_ENV_VAR],
            server_selection_timeout_ms=2_000,
        )
    },
)
