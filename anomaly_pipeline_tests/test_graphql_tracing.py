"""Tracing a stored anomaly through Dagster's GraphQL API, served by a real webserver.

The webserver reads the same instance the runs were recorded in and loads the project's code
location from ``workspace.yaml`` with the test database in its environment. From an anomaly
document a reviewer reaches the detection run, its partitions and their metadata, the run that
trained the model, the asset lineage, and any verification of the anomaly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.storage.mongo import MongoResource
from anomaly_pipeline.verification import (
    ANOMALY_ID_TAG,
    build_verification_job,
    verification_run_config,
)
from anomaly_pipeline_tests.msft_history import PARTITION_KEYS, build_msft_history

pytestmark = pytest.mark.slow

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
WEBSERVER = Path(sys.executable).parent / "dagster-webserver"
STARTUP_SECONDS = 240
PREFIX = ["us", "1d"]

METADATA_FIELDS = """
    metadataEntries {
      label
      ... on IntMetadataEntry { intValue }
      ... on TextMetadataEntry { text }
      ... on FloatMetadataEntry { floatValue }
      ... on BoolMetadataEntry { boolValue }
    }
"""

RUN_QUERY = f"""
query Run($runId: ID!) {{
  runOrError(runId: $runId) {{
    __typename
    ... on Run {{
      runId
      status
      jobName
      tags {{ key value }}
      assetMaterializations {{
        runId
        partition
        assetKey {{ path }}
        {METADATA_FIELDS}
      }}
    }}
  }}
}}
"""

ASSET_EVENTS_QUERY = f"""
query AssetEvents($key: AssetKeyInput!, $partitions: [String!]) {{
  assetOrError(assetKey: $key) {{
    __typename
    ... on Asset {{
      assetMaterializations(partitions: $partitions) {{ runId partition {METADATA_FIELDS} }}
      assetObservations(partitions: $partitions) {{ runId partition {METADATA_FIELDS} }}
    }}
  }}
}}
"""

LINEAGE_QUERY = """
query Lineage($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    dependencyKeys { path }
  }
}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class GraphQL:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def __call__(self, query: str, **variables) -> dict:
        request = urllib.request.Request(
            f"{self.base}/graphql",
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert "errors" not in answer, answer["errors"]
        return answer["data"]


def metadata_of(event: dict) -> dict:
    values = {}
    for entry in event["metadataEntries"]:
        for field in ("intValue", "text", "floatValue", "boolValue"):
            if field in entry:
                values[entry["label"]] = entry[field]
    return values


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, wait, then SIGKILL whatever is left."""
    if process.poll() is not None:
        return
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    # The webserver's children (the code server) may outlive it; the group takes them too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait(timeout=20)


def wait_until_served(process: subprocess.Popen, graphql: GraphQL, log: Path) -> None:
    """Until the server answers and the code location has loaded its assets."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster-webserver exited early:\n{log.read_text()[-4000:]}")
        try:
            nodes = graphql(LINEAGE_QUERY, keys=[{"path": [*PREFIX, "anomalies"]}])["assetNodes"]
        except (urllib.error.URLError, ConnectionError, AssertionError):
            nodes = []
        if nodes:
            return
        time.sleep(1)
    pytest.fail(f"dagster-webserver did not serve the code location:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def traced(mongo_uri, sample_universe, tmp_path_factory):
    """Runs recorded in a persistent instance, and a webserver reading that instance."""
    home = tmp_path_factory.mktemp("dagster-home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    mongo = MongoResource(uri=mongo_uri, database=f"test_graphql_{uuid.uuid4().hex[:12]}")
    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(),
    }
    with dg.DagsterInstance.from_config(str(home)) as instance:
        history = build_msft_history(sample_universe, resources, instance)
        anomaly = history.database["anomalies"].find_one(sort=[("anomaly_score", -1)])
        verification = build_verification_job(sample_universe).execute_in_process(
            run_config=verification_run_config(anomaly["_id"]),
            resources=resources,
            instance=instance,
            tags={ANOMALY_ID_TAG: anomaly["_id"]},
        )

    port = free_port()
    log = home / "webserver.log"
    environment = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MONGODB_URI": mongo_uri,
        "ANOMALY_PIPELINE_DATABASE": mongo.database,
    }
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(WEBSERVER), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
            cwd=REPOSITORY_ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    graphql = GraphQL(port)
    try:
        wait_until_served(process, graphql, log)
        yield {
            "graphql": graphql,
            "database": history.database,
            "anomaly": anomaly,
            "verification_run_id": verification.run_id,
        }
    finally:
        stop_process_group(process)
        mongo.get_database().client.drop_database(mongo.database)


def test_an_anomaly_leads_to_its_run_partitions_and_metadata(traced):
    graphql, database, anomaly = traced["graphql"], traced["database"], traced["anomaly"]

    run = graphql(RUN_QUERY, runId=anomaly["detection_run_id"])["runOrError"]

    assert run["__typename"] == "Run"
    assert run["status"] == "SUCCESS"
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    assert tags[ASSET_PARTITION_RANGE_START_TAG] == PARTITION_KEYS[0]
    assert tags[ASSET_PARTITION_RANGE_END_TAG] == PARTITION_KEYS[-1]
    # The run materialized the anomalies asset only, one event per partition of its range.
    assert {tuple(event["assetKey"]["path"]) for event in run["assetMaterializations"]} == {
        ("us", "1d", "anomalies")
    }

    materializations = run["assetMaterializations"]
    assert sorted(event["partition"] for event in materializations) == list(PARTITION_KEYS)
    for event in materializations:
        assert event["runId"] == anomaly["detection_run_id"]
        metadata = metadata_of(event)
        assert metadata["anomalies"] == database["anomalies"].count_documents(
            {"interval": "1d", "partition_key": event["partition"]}
        )
        assert metadata["model_hash"] == anomaly["model_hash"]
        assert metadata["model_version"] == anomaly["model_version"]
        assert metadata["ticker"] == anomaly["ticker"]
    (own,) = [event for event in materializations if event["partition"] == anomaly["partition_key"]]
    assert metadata_of(own)["anomalies"] >= 1
    assert metadata_of(own)["threshold"] == pytest.approx(anomaly["threshold"], abs=1e-12)


def test_the_model_that_found_it_leads_to_the_run_that_trained_it(traced):
    graphql, database, anomaly = traced["graphql"], traced["database"], traced["anomaly"]

    asset = graphql(ASSET_EVENTS_QUERY, key={"path": [*PREFIX, "model"]}, partitions=None)[
        "assetOrError"
    ]

    (training,) = [
        event
        for event in asset["assetMaterializations"]
        if metadata_of(event)["model_hash"] == anomaly["model_hash"]
    ]
    record = database["models"].find_one({"sha256": anomaly["model_hash"]})
    assert training["runId"] == record["created_by_run_id"]
    metadata = metadata_of(training)
    assert metadata["model_version"] == anomaly["model_version"]
    assert metadata["training_rows"] == record["training_rows"]
    assert metadata["sklearn_version"] == record["sklearn_version"]


def test_lineage_of_the_anomalies_asset(traced):
    keys = [{"path": [*PREFIX, stage]} for stage in ("anomalies", "model", "features")]

    nodes = traced["graphql"](LINEAGE_QUERY, keys=keys)["assetNodes"]

    upstream = {
        tuple(node["assetKey"]["path"]): {tuple(key["path"]) for key in node["dependencyKeys"]}
        for node in nodes
    }
    assert upstream[("us", "1d", "anomalies")] == {("us", "1d", "features"), ("us", "1d", "model")}
    assert upstream[("us", "1d", "model")] == {("us", "1d", "features")}
    assert upstream[("us", "1d", "features")] == {("us", "1d", "prices")}


def test_a_verification_is_a_run_and_an_observation_of_the_partition(traced):
    graphql, database, anomaly = traced["graphql"], traced["database"], traced["anomaly"]
    (check,) = database["anomaly_verifications"].find({"anomaly_id": anomaly["_id"]})
    assert check["run_id"] == traced["verification_run_id"]

    run = graphql(RUN_QUERY, runId=check["run_id"])["runOrError"]

    assert run["status"] == "SUCCESS"
    assert run["jobName"] == "verify_anomaly"
    assert {tag["key"]: tag["value"] for tag in run["tags"]}[ANOMALY_ID_TAG] == anomaly["_id"]
    assert run["assetMaterializations"] == []

    asset = graphql(
        ASSET_EVENTS_QUERY,
        key={"path": [*PREFIX, "anomalies"]},
        partitions=[anomaly["partition_key"]],
    )["assetOrError"]
    (observation,) = asset["assetObservations"]
    assert observation["runId"] == check["run_id"]
    metadata = metadata_of(observation)
    assert metadata["anomaly_id"] == anomaly["_id"]
    assert metadata["reproduced"] is True
    assert metadata["original_score"] == pytest.approx(check["original_model"]["score"], abs=1e-12)
    assert metadata["current_model_hash"] == anomaly["model_hash"]
    # The observation did not replace the partition: its materialization is the detection run's.
    (materialization,) = asset["assetMaterializations"]
    assert materialization["runId"] == anomaly["detection_run_id"]
