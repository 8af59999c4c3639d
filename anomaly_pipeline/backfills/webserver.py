"""A small client for the parts of a Dagster webserver's GraphQL API that backfills use.

Plain HTTP with the standard library: ``GET /server_info`` to check that a webserver answers,
the ``launchPartitionBackfill`` mutation to launch, and ``partitionBackfillOrError`` to follow
a backfill's partitions and runs. Failure messages of failed runs are read from their step
failure events, so a person sees why a partition failed without opening the UI.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg

TERMINAL_STATUSES = frozenset(
    {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
)

_LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PartitionKeysNotFoundError { message partitionKeys }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

_BACKFILL_STATUS = """
query BackfillStatus($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill {
      status
      numPartitions
      error { message }
      assetBackfillData {
        assetBackfillStatuses {
          __typename
          ... on AssetPartitionsStatusCounts {
            assetKey { path }
            numPartitionsTargeted
            numPartitionsInProgress
            numPartitionsMaterialized
            numPartitionsFailed
          }
          ... on UnpartitionedAssetStatus {
            assetKey { path }
            inProgress
            materialized
            failed
          }
        }
      }
      runs(limit: 100000) { runId status }
    }
    ... on PythonError { message }
    ... on Error { message }
  }
}
"""

_ASSET_NODES = """
query AssetNodes($assetKeys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $assetKeys) { assetKey { path } }
}
"""

_RUN_FAILURES = """
query RunFailures($runId: ID!) {
  logsForRun(runId: $runId, limit: 10000) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on ExecutionStepFailureEvent { stepKey error { message } }
        ... on RunFailureEvent { message }
      }
    }
  }
}
"""


class WebserverUnreachableError(RuntimeError):
    """Nothing that looks like a Dagster webserver answered at the URL."""


class WebserverRequestError(RuntimeError):
    """The webserver answered, but refused or failed the request."""


@dataclass(frozen=True)
class AssetProgress:
    """Where one asset of a backfill stands; an unpartitioned asset counts as one partition."""

    asset_key: str
    targeted: int
    materialized: int
    failed: int
    in_progress: int
    partitioned: bool


@dataclass(frozen=True)
class BackfillProgress:
    status: str
    assets: list[AssetProgress]
    runs_by_status: dict[str, int]
    run_ids_by_status: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status in {"COMPLETED", "COMPLETED_SUCCESS"} and not any(
            asset.failed for asset in self.assets
        )

    @property
    def runs_launched(self) -> int:
        return sum(self.runs_by_status.values())

    def asset(self, asset_key: str) -> AssetProgress | None:
        return next((asset for asset in self.assets if asset.asset_key == asset_key), None)


class DagsterWebserver:
    """One Dagster webserver, addressed by its base URL (``http://127.0.0.1:3000``)."""

    def __init__(self, url: str, timeout_seconds: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout_seconds = timeout_seconds

    def server_info(self) -> dict:
        """The webserver's version facts; raises ``WebserverUnreachableError`` when none answers."""
        try:
            with urllib.request.urlopen(
                f"{self.url}/server_info", timeout=self.timeout_seconds
            ) as response:
                info = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise WebserverUnreachableError(str(getattr(exc, "reason", exc))) from None
        if not isinstance(info, dict) or "dagster_webserver_version" not in info:
            raise WebserverUnreachableError("it answered, but not as a Dagster webserver")
        return info

    def graphql(self, document: str, variables: Mapping[str, object]) -> dict:
        body = json.dumps({"query": document, "variables": dict(variables)}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=body,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise WebserverRequestError(f"{self.url}/graphql: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise WebserverUnreachableError(f"{self.url}: {getattr(exc, 'reason', exc)}") from None
        if answer.get("errors"):
            messages = "; ".join(error.get("message", str(error)) for error in answer["errors"])
            raise WebserverRequestError(f"GraphQL error: {messages}")
        return answer["data"]

    def missing_assets(self, asset_keys: Sequence[dg.AssetKey]) -> list[dg.AssetKey]:
        """Those of ``asset_keys`` that no code location of this webserver defines."""
        variables = {"assetKeys": [{"path": list(key.path)} for key in asset_keys]}
        served = {
            tuple(node["assetKey"]["path"])
            for node in self.graphql(_ASSET_NODES, variables)["assetNodes"]
        }
        return [key for key in asset_keys if tuple(key.path) not in served]

    def launch_partition_backfill(
        self,
        asset_keys: Sequence[dg.AssetKey],
        partition_names: Sequence[str],
        *,
        title: str,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, object] | None = None,
    ) -> str:
        """Launch one asset backfill of ``partition_names``; returns its backfill id."""
        params: dict[str, object] = {
            "assetSelection": [{"path": list(key.path)} for key in asset_keys],
            "partitionNames": list(partition_names),
            "title": title,
            "description": description,
            "tags": [{"key": key, "value": value} for key, value in (tags or {}).items()],
        }
        if run_config is not None:
            params["runConfigData"] = dict(run_config)
        result = self.graphql(_LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        if result["__typename"] == "LaunchBackfillSuccess":
            return result["backfillId"]
        message = result.get("message") or result["__typename"]
        if result.get("partitionKeys"):
            message += f" ({', '.join(result['partitionKeys'][:10])})"
        raise WebserverRequestError(f"the webserver refused the backfill: {message}")

    def backfill_progress(self, backfill_id: str) -> BackfillProgress:
        answer = self.graphql(_BACKFILL_STATUS, {"backfillId": backfill_id})
        backfill = answer["partitionBackfillOrError"]
        if backfill["__typename"] != "PartitionBackfill":
            raise WebserverRequestError(
                f"backfill {backfill_id}: {backfill.get('message', backfill['__typename'])}"
            )
        assets = []
        for status in (backfill.get("assetBackfillData") or {}).get("assetBackfillStatuses", []):
            key = "/".join(status["assetKey"]["path"])
            if status["__typename"] == "AssetPartitionsStatusCounts":
                assets.append(
                    AssetProgress(
                        asset_key=key,
                        targeted=status["numPartitionsTargeted"],
                        materialized=status["numPartitionsMaterialized"],
                        failed=status["numPartitionsFailed"],
                        in_progress=status["numPartitionsInProgress"],
                        partitioned=True,
                    )
                )
            else:
                assets.append(
                    AssetProgress(
                        asset_key=key,
                        targeted=1,
                        materialized=int(status["materialized"]),
                        failed=int(status["failed"]),
                        in_progress=int(status["inProgress"]),
                        partitioned=False,
                    )
                )
        run_ids_by_status: dict[str, list[str]] = {}
        for run in backfill.get("runs") or []:
            run_ids_by_status.setdefault(run["status"], []).append(run["runId"])
        return BackfillProgress(
            status=backfill["status"],
            assets=assets,
            runs_by_status={status: len(ids) for status, ids in run_ids_by_status.items()},
            run_ids_by_status=run_ids_by_status,
            error=(backfill.get("error") or {}).get("message"),
        )

    def run_failure_messages(self, run_id: str) -> list[str]:
        """Why a run failed: each failed step's error message, else the run failure message."""
        logs = self.graphql(_RUN_FAILURES, {"runId": run_id})["logsForRun"]
        if logs["__typename"] != "EventConnection":
            return []
        step_errors = [
            f"{event['stepKey']}: {event['error']['message'].strip()}"
            for event in logs["events"]
            if event["__typename"] == "ExecutionStepFailureEvent" and event.get("error")
        ]
        if step_errors:
            return step_errors
        return [
            event["message"] for event in logs["events"] if event["__typename"] == "RunFailureEvent"
        ]

    def backfill_page(self, backfill_id: str) -> str:
        return f"{self.url}/runs/b/{backfill_id}"
