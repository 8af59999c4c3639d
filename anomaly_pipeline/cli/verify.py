"""``anomaly-pipeline verify ANOMALY_ID``: re-run detection for one stored anomaly.

The check runs as the Dagster job ``verify_anomaly`` on the local instance, so it is a run a
reviewer can open in the UI; this command prints what the run found.
"""

from __future__ import annotations

import argparse
import json

from anomaly_pipeline.cli.anomalies import json_value
from anomaly_pipeline.cli.errors import CliError


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "verify",
        help="check a stored anomaly against the model that found it and the current model",
    )
    parser.add_argument(
        "anomaly_id", metavar="ANOMALY_ID", help="e.g. 'MSFT|1d|1987-10-19T04:00:00Z'"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the stored verification document as JSON"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from anomaly_pipeline.definitions import build_definitions
    from anomaly_pipeline.instance import local_instance
    from anomaly_pipeline.resources import build_mongo_resource
    from anomaly_pipeline.storage.mongo import ANOMALIES
    from anomaly_pipeline.verification import (
        ANOMALY_ID_TAG,
        VERIFICATION_JOB_NAME,
        VerificationStore,
        verification_run_config,
    )

    # Outside a run nothing resolves the resource's dg.EnvVar for MONGODB_URI; this does.
    database = build_mongo_resource().process_config_and_initialize().get_database()
    # A mistyped id should not cost a Dagster run.
    if database[ANOMALIES].find_one({"_id": args.anomaly_id}, {"_id": 1}) is None:
        raise CliError(
            f"no stored anomaly has _id {args.anomaly_id!r}; "
            "list them with `anomaly-pipeline anomalies --json`"
        )

    job = build_definitions().resolve_job_def(VERIFICATION_JOB_NAME)
    with local_instance() as instance:
        result = job.execute_in_process(
            run_config={
                **verification_run_config(args.anomaly_id),
                # The printed result is what a person reads; step events stay in the UI.
                "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            },
            instance=instance,
            tags={ANOMALY_ID_TAG: args.anomaly_id, "anomaly_pipeline/entry_point": "cli"},
            raise_on_error=False,
        )
    if not result.success:
        failures = result.get_step_failure_events()
        reason = failures[0].step_failure_data.error.message if failures else "see the run logs"
        raise CliError(f"verification run {result.run_id} failed: {reason.strip()}")

    document = result.output_for_node("verify_stored_anomaly")
    if args.json:
        print(json.dumps(document, default=json_value, indent=2))
        return 0
    history = VerificationStore(database).history(args.anomaly_id)
    print_verification(document, previous_checks=len(history) - 1)
    return 0


def print_verification(document: dict, *, previous_checks: int = 0) -> None:
    original, current = document["original_model"], document["current_model"]
    print(f"Verification of {document['anomaly_id']} (Dagster run {document['run_id']})")
    print(
        f"  bar:            {document['ticker']} {document['interval']} "
        f"{document['timestamp']:%Y-%m-%d %H:%M} UTC, partition {document['partition_key']}"
    )
    print(
        f"  stored:         score {document['stored_score']:.9f}, threshold "
        f"{document['stored_threshold']:.6f}, model {document['stored_model_version']} "
        f"(sha256 {document['stored_model_hash'][:12]})"
    )

    if document["features_source"] == "recomputed":
        same = "identical to" if document["features_match"] else "DIFFERENT from"
        print(
            f"  features:       recomputed from stored prices, {same} the stored features "
            f"(largest difference {document['max_feature_difference']:.3g})"
        )
    else:
        print(f"  features:       {document['features_note']}")

    if original["available"]:
        outcome = "reproduced" if document["reproduced"] else "NOT reproduced"
        print(
            f"  original model: {original['version']} (sha256 {original['sha256'][:12]}) "
            f"score {original['score']:.9f}, difference "
            f"{document['original_score_difference']:+.2e}: {outcome}"
        )
    else:
        print(f"  original model: {original['version']} unavailable: {original['note']}")
    if original["available"] and original["note"]:
        print(f"                  {original['note']}")

    if current["available"]:
        verdict = "still anomalous" if document["still_anomalous"] else "no longer anomalous"
        changed = "a newer model" if document["model_changed"] else "the same model"
        print(
            f"  current model:  {current['version']} (sha256 {current['sha256'][:12]}, "
            f"{changed}) score {current['score']:.9f}, change {document['score_change']:+.6f}, "
            f"threshold {current['threshold']:.6f}: {verdict}"
        )
    else:
        print(f"  current model:  none usable: {current['note']}")

    print(f"  summary:        {document['summary']}")
    if previous_checks:
        print(f"  ({previous_checks} earlier check(s) of this anomaly are kept)")
