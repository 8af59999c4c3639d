"""Shared fixtures: one real MongoDB-wire server per test session, a fresh database per test,
and a throw-away Dagster instance. Nothing touches the network or the developer's own home."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

# Set before any project module reads it: tests never use the working directory's home.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="anomaly-pipeline-tests-"))
os.environ["ANOMALY_PIPELINE_HOME"] = str(_SESSION_HOME)
os.environ.pop("MONGODB_URI", None)
os.environ.pop("ANOMALY_PIPELINE_UNIVERSE", None)
os.environ.pop("ANOMALY_PIPELINE_PRICE_SOURCE", None)

from anomaly_pipeline.modeling.model_store import ModelStoreResource  # noqa: E402
from anomaly_pipeline.prices.files_source import FilesPriceSource  # noqa: E402
from anomaly_pipeline.storage.local_server import LocalMongoServer  # noqa: E402
from anomaly_pipeline.storage.mongo import MongoResource  # noqa: E402
from anomaly_pipeline.universe import PACKAGED_UNIVERSE, Universe, load_universe  # noqa: E402


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """A real SecantusDB server (standalone topology) for the whole session."""
    server = LocalMongoServer(_SESSION_HOME / "server")
    uri = server.ensure_running()
    yield uri
    server.stop()


@pytest.fixture
def mongo(mongo_uri: str) -> Iterator[MongoResource]:
    """A MongoResource on a database of its own, dropped after the test."""
    resource = MongoResource(uri=mongo_uri, database=f"test_{uuid.uuid4().hex[:12]}")
    yield resource
    resource.get_database().client.drop_database(resource.database)


@pytest.fixture
def database(mongo: MongoResource):
    return mongo.get_database()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture(scope="session")
def sample_universe() -> Universe:
    return load_universe(PACKAGED_UNIVERSE)


@pytest.fixture
def resources(mongo: MongoResource) -> dict:
    """The resources of the offline default, pointed at the test database."""
    return {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(),
    }
