"""``anomaly-pipeline runs show RUN_ID``: what one Dagster run did, from the audit trail.

Combines the run's audit documents in ``detection_runs`` (trigger, partitions, counts, model,
duration, status, error) with the Dagster instance's record of the run, and lists the anomalies
still attributed to it. A unique prefix of the run id (such as the 8 characters the demo
prints) is enough.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json

from anomaly_pipeline.cli.errors import CliError, non_negative_int


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("runs", help="look up what a pipeline run did")
    actions = parser.add_subparsers(metavar="ACTION")
    show = actions.add_parser(
        "show", help="a run's trigger, partitions, counts, model, duration, status and anomalies"
    )
    show.add_argument("run_id", metavar="RUN_ID", help="Dagster run id or a unique prefix of it")
    show.add_argument(
        "--anomalies",
        type=non_negative_int,
        default=20,
        help="how many of the run's anomalies to list (default 20; 0 means all)",
    )
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=run_show)
    parser.set_defaults(handler=lambda _args: parser.print_help() or 2)


def run_show(args: argparse.Namespace) -> int:
    from anomaly_pipeline.audit import AuditTrail
    from anomaly_pipeline.instance import local_instance
    from anomaly_pipeline.resources import build_mongo_resource
    from anomaly_pipeline.storage.mongo import ANOMALIES

    # Outside a Dagster run the resource's EnvVar is not resolved on its own.
    database = build_mongo_resource().process_config_and_initialize().get_database()
    trail = AuditTrail(database)
    instance = local_instance()
    run_id = _resolve_run_id(args.run_id, trail, instance)

    record = instance.get_run_record_by_id(run_id)
    audits = trail.documents_for_run(run_id)
    query = {"detection_run_id": run_id}
    attributed = database[ANOMALIES].count_documents(query)
    cursor = database[ANOMALIES].find(query).sort([("anomaly_score", -1), ("_id", 1)])
    if args.anomalies:
        cursor = cursor.limit(args.anomalies)
    anomalies = list(cursor)
    run = _run_facts(run_id, record)

    if args.json:
        from anomaly_pipeline.cli.anomalies import json_value

        print(
            json.dumps(
                {
                    "run": run,
                    "detections": audits,
                    "anomalies_attributed": attributed,
                    "anomalies": anomalies,
                },
                default=json_value,
                indent=2,
            )
        )
        return 0
    _print_run(run)
    for audit in audits:
        _print_audit(audit)
    if not audits:
        print(
            "\nNo audit documents: the run did not detect anomalies, its failure is not audited "
            "yet (the audit_failed_runs sensor needs the Dagster daemon), or they expired."
        )
    _print_anomalies(anomalies, attributed, audits)
    return 0


def _resolve_run_id(text: str, trail, instance) -> str:
    if instance.get_run_record_by_id(text) is not None or trail.documents_for_run(text):
        return text
    matches = set(trail.run_ids_with_prefix(text))
    matches.update(run_id for run_id in instance.get_run_ids() if run_id.startswith(text))
    if not matches:
        raise CliError(f"no run {text!r} in the Dagster instance or the audit trail")
    if len(matches) > 1:
        listed = ", ".join(sorted(matches)[:5])
        raise CliError(f"{text!r} matches {len(matches)} runs ({listed}); give more characters")
    return matches.pop()


def _run_facts(run_id: str, record) -> dict:
    if record is None:
        return {"run_id": run_id, "in_instance": False}
    run = record.dagster_run
    started = _from_timestamp(record.start_time)
    ended = _from_timestamp(record.end_time)
    return {
        "run_id": run_id,
        "in_instance": True,
        "status": run.status.value,
        "job": run.job_name,
        "started_at": started,
        "ended_at": ended,
        "duration_seconds": (ended - started).total_seconds() if started and ended else None,
        "tags": {key: value for key, value in run.tags.items() if not key.startswith(".")},
    }


def _from_timestamp(timestamp: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc) if timestamp else None


def _print_run(run: dict) -> None:
    print(f"Run {run['run_id']}")
    if not run["in_instance"]:
        print("  not in this Dagster instance (run elsewhere, or deleted); audit trail only")
        return
    print(f"  Dagster status: {run['status']}   job: {run['job']}")
    print(
        f"  started {_stamp(run['started_at'])}, ended {_stamp(run['ended_at'])}"
        + (f" ({run['duration_seconds']:.1f} s)" if run["duration_seconds"] is not None else "")
    )
    shown = {key: value for key, value in run["tags"].items() if "partition" not in key}
    if shown:
        print("  tags: " + ", ".join(f"{key}={value}" for key, value in sorted(shown.items())))


def _print_audit(audit: dict) -> None:
    subject = audit["ticker"] or f"all {audit['market']} tickers"
    trigger = audit["trigger"] + (f" ({audit['trigger_name']})" if audit["trigger_name"] else "")
    print(
        f"\n{audit['market']} {audit['interval']} {subject}: {audit['status'].upper()}"
        f"   trigger: {trigger}   stages: {', '.join(audit['stages'])}"
    )
    keys = audit["partition_keys"]
    if keys:
        print(
            f"  partitions: {len(keys)}, {keys[0]} to {keys[-1]}  "
            f"[{_stamp(audit['window_start'])}, {_stamp(audit['window_end'])})"
        )
    if audit["status"] == "success":
        print(
            f"  bars in {audit['bars_in']}, warm-up excluded {audit['warmup_excluded']}, "
            f"scored {audit['bars_scored']}, anomalies found {audit['anomalies_found']}"
        )
        print(f"  model {audit['model_version']}  sha256 {audit['model_hash']}")
    duration = audit["duration_seconds"]
    detection = audit["detection_seconds"]
    print(
        f"  finished {_stamp(audit['finished_at'])}"
        + (f", {duration:.1f} s after the run started" if duration is not None else "")
        + (f" (detection step {detection:.1f} s)" if detection is not None else "")
    )
    if audit["status"] == "success":
        print("  per partition:  bars  warm-up  scored  anomalies  prices run  features run")
        for partition in audit["partitions"]:
            print(
                f"    {partition['partition_key']:<20} {_count(partition['bars_in']):>5} "
                f"{_count(partition['warmup_excluded']):>8} {partition['bars_scored']:>7} "
                f"{partition['anomalies']:>10}  {_short(partition['prices_run_id']):<10}  "
                f"{_short(partition['features_run_id'])}"
            )
    if audit["error"]:
        print(f"  error: {audit['error']['message']}")
        for step in audit["error"]["failed_steps"]:
            print(f"    failed step {step['step']}")


def _print_anomalies(anomalies: list[dict], attributed: int, audits: list[dict]) -> None:
    found = sum(audit["anomalies_found"] or 0 for audit in audits)
    print(f"\nAnomalies attributed to this run: {attributed}", end="")
    if found > attributed:
        print(f" (it found {found}; later runs re-detected or removed the others)", end="")
    print()
    if not anomalies:
        return
    if len(anomalies) < attributed:
        print(f"  the {len(anomalies)} highest scores:")
    print(f"  {'score':>7}  {'ticker':<10} {'interval':<8} {'bar start (UTC)':<17} {'close':>12}")
    for document in anomalies:
        print(
            f"  {document['anomaly_score']:7.4f}  {document['ticker']:<10} "
            f"{document['interval']:<8} {document['timestamp']:%Y-%m-%d %H:%M}  "
            f"{document['close']:12.6g}"
        )


def _stamp(moment: dt.datetime | None) -> str:
    if moment is None:
        return "unknown"
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _short(run_id: str | None) -> str:
    return run_id[:8] if run_id else "-"
