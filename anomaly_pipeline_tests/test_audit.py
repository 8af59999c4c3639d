"""The audit trail of successful detections, the materialization metadata, the TTL index and
``anomaly-pipeline runs show``, against one real run on the shipped sample.

The run: CRYPTO 1h bars of SYNX-USD for January to March 2025 are ingested, a model is trained,
and one ranged run detects anomalies in the three windows. Expected values come from the sample
CSV file, the stored model bytes, the ``anomalies`` collection and the Dagster instance, never
from the audit code.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid

import dagster as dg
import gridfs
import pandas as pd
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.assets import build_pipeline_assets
from anomaly_pipeline.audit import (
    AUDIT_TTL_ENV_VAR,
    TTL_INDEX_NAME,
    AuditTrail,
    audit_ttl_days,
)
from anomaly_pipeline.charts import MAX_CHART_BYTES
from anomaly_pipeline.checks import build_asset_checks
from anomaly_pipeline.cli import main
from anomaly_pipeline.features import LOOKBACK_BARS
from anomaly_pipeline.instance import local_instance
from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.prices.files_source import FilesPriceSource
from anomaly_pipeline.settings import SAMPLE_DATA_DIR
from anomaly_pipeline.storage.mongo import MongoResource

TICKER = "SYNX-USD"
WINDOWS = {
    "2025-01": (pd.Timestamp("2025-01-01", tz="UTC"), pd.Timestamp("2025-02-01", tz="UTC")),
    "2025-02": (pd.Timestamp("2025-02-01", tz="UTC"), pd.Timestamp("2025-03-01", tz="UTC")),
    "2025-03": (pd.Timestamp("2025-03-01", tz="UTC"), pd.Timestamp("2025-04-01", tz="UTC")),
}
KEYS = [f"{TICKER}|{window}" for window in WINDOWS]
RANGE_TAGS = {ASSET_PARTITION_RANGE_START_TAG: KEYS[0], ASSET_PARTITION_RANGE_END_TAG: KEYS[-1]}


@pytest.fixture(scope="module")
def detected(mongo_uri, sample_universe, tmp_path_factory):
    """Ingest, train and detect once; yields what the tests need to look at."""
    mongo = MongoResource(uri=mongo_uri, database=f"test_audit_{uuid.uuid4().hex[:8]}")
    resources = {
        "mongo": mongo,
        "model_store": ModelStoreResource(mongo=mongo),
        "price_source": FilesPriceSource(),
    }
    prices, features, model, anomalies = build_pipeline_assets(
        sample_universe.markets["CRYPTO"], "1h", sample_universe
    )
    with pytest.MonkeyPatch.context() as env:
        # runs show reads the instance of $DAGSTER_HOME, so the runs go through that one.
        env.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("dagster_home")))
        instance = local_instance()
        ingest = dg.materialize(
            [prices, features], resources=resources, instance=instance, tags=RANGE_TAGS
        )
        train = dg.materialize([model], resources=resources, instance=instance)
        # A backfill first, then the run the tests follow, which the anomalies end up naming.
        backfill = dg.materialize(
            [anomalies],
            resources=resources,
            instance=instance,
            tags={**RANGE_TAGS, "dagster/backfill": "nightly-reload"},
        )
        # With the asset's checks, as a materialization launched from the UI would run.
        checks = [
            check
            for check in build_asset_checks(sample_universe)
            if next(iter(check.check_keys)).asset_key == anomalies.key
        ]
        detect = dg.materialize(
            [anomalies, *checks],
            resources=resources,
            instance=instance,
            tags=RANGE_TAGS,
        )
        assert ingest.success and train.success and backfill.success and detect.success
        yield {
            "mongo": mongo,
            "database": mongo.get_database(),
            "resources": resources,
            "instance": instance,
            "anomalies_asset": anomalies,
            "ingest_run_id": ingest.run_id,
            "backfill_run_id": backfill.run_id,
            "detect": detect,
            "dagster_home": instance.root_directory,
        }
    mongo.get_database().client.drop_database(mongo.database)


def _sample_bars_per_window() -> dict[str, int]:
    frame = pd.read_csv(SAMPLE_DATA_DIR / f"{TICKER}_1h.csv")
    stamps = pd.to_datetime(frame["timestamp"], utc=True)
    return {
        f"{TICKER}|{window}": int(((stamps >= start) & (stamps < end)).sum())
        for window, (start, end) in WINDOWS.items()
    }


def _stored_model(database) -> tuple[dict, str]:
    (record,) = database["models"].find({"market": "CRYPTO", "interval": "1h"})
    blob = gridfs.GridFSBucket(database, "model_blobs").open_download_stream(record["blob_id"])
    return record, hashlib.sha256(blob.read()).hexdigest()


def test_success_document_holds_what_the_run_covered_and_found(detected):
    database = detected["database"]
    run_id = detected["detect"].run_id
    (audit,) = database["detection_runs"].find({"run_id": run_id})

    bars = _sample_bars_per_window()
    assert bars == {KEYS[0]: 744, KEYS[1]: 672, KEYS[2]: 744}
    # No bars before January are stored, so its first LOOKBACK_BARS bars lack history.
    warmup = {KEYS[0]: LOOKBACK_BARS, KEYS[1]: 0, KEYS[2]: 0}
    found = {
        key: database["anomalies"].count_documents({"partition_key": key, "interval": "1h"})
        for key in KEYS
    }
    assert sum(found.values()) > 0
    record, bytes_hash = _stored_model(database)
    assert bytes_hash == record["sha256"]

    assert audit["_id"] == f"{run_id}|1h|{TICKER}"
    assert audit["status"] == "success"
    assert audit["error"] is None
    assert audit["trigger"] == "manual"
    assert audit["trigger_name"] is None
    assert (audit["market"], audit["interval"], audit["ticker"]) == ("CRYPTO", "1h", TICKER)
    assert audit["stages"] == ["anomalies"]
    assert audit["partition_keys"] == KEYS
    assert audit["window_start"] == WINDOWS["2025-01"][0]
    assert audit["window_end"] == WINDOWS["2025-03"][1]
    assert audit["bars_in"] == sum(bars.values()) == 2160
    assert audit["warmup_excluded"] == LOOKBACK_BARS
    assert audit["bars_scored"] == 2160 - LOOKBACK_BARS
    assert audit["anomalies_found"] == sum(found.values())
    assert audit["model_version"] == "CRYPTO-1h-1" == record["_id"]
    assert audit["model_hash"] == bytes_hash
    assert audit["model_threshold"] == record["threshold"]

    for partition, key in zip(audit["partitions"], KEYS, strict=True):
        start, end = WINDOWS[key.split("|")[1]]
        assert partition == {
            "partition_key": key,
            "window_start": start,
            "window_end": end,
            "bars_in": bars[key],
            "warmup_excluded": warmup[key],
            "bars_scored": bars[key] - warmup[key],
            "anomalies": found[key],
            "prices_run_id": detected["ingest_run_id"],
            "price_source": "FilesPriceSource",
            "features_run_id": detected["ingest_run_id"],
        }


def test_success_document_times_the_run_from_its_dagster_record(detected):
    run_id = detected["detect"].run_id
    (audit,) = detected["database"]["detection_runs"].find({"run_id": run_id})
    run_record = detected["instance"].get_run_record_by_id(run_id)

    started = dt.datetime.fromtimestamp(run_record.start_time, tz=dt.timezone.utc)
    # BSON keeps milliseconds.
    assert abs((audit["run_started_at"] - started).total_seconds()) < 0.001
    assert (
        started
        < audit["finished_at"]
        <= dt.datetime.fromtimestamp(run_record.end_time, tz=dt.timezone.utc)
    )
    expected = (audit["finished_at"] - audit["run_started_at"]).total_seconds()
    assert audit["duration_seconds"] == pytest.approx(expected, abs=0.002)
    assert 0 < audit["detection_seconds"] <= audit["duration_seconds"] + 0.002


def test_anomalies_stay_traceable_without_their_audit_document(detected):
    database = detected["database"]
    run_id = detected["detect"].run_id
    (audit,) = database["detection_runs"].find({"run_id": run_id})
    documents = list(database["anomalies"].find({"ticker": TICKER}))

    assert len(documents) == audit["anomalies_found"]
    for document in documents:
        assert document["detection_run_id"] == run_id
        assert document["trigger"] == "manual"
        assert document["model_version"] == audit["model_version"]
        assert document["model_hash"] == audit["model_hash"]
        assert document["partition_key"] in KEYS


def test_trigger_comes_from_the_run_tags(detected):
    runs = detected["database"]["detection_runs"]
    (backfill,) = runs.find({"run_id": detected["backfill_run_id"]})
    (manual,) = runs.find({"run_id": detected["detect"].run_id})
    assert (backfill["trigger"], backfill["trigger_name"]) == ("backfill", "nightly-reload")
    assert (manual["trigger"], manual["trigger_name"]) == ("manual", None)
    # The same bars and model twice: the same counts, each run in a document of its own.
    assert backfill["anomalies_found"] == manual["anomalies_found"]
    assert runs.count_documents({}) == 2


def test_each_partition_materialization_carries_actionable_metadata(detected):
    detect = detected["detect"]
    database = detected["database"]
    record, bytes_hash = _stored_model(database)
    bars = _sample_bars_per_window()
    warmup = {KEYS[0]: LOOKBACK_BARS, KEYS[1]: 0, KEYS[2]: 0}
    materializations = {
        m.partition: m.metadata
        for m in detect.asset_materializations_for_node(detected["anomalies_asset"].op.name)
    }
    assert sorted(materializations) == KEYS

    for key, metadata in materializations.items():
        start, end = WINDOWS[key.split("|")[1]]
        found = database["anomalies"].count_documents({"partition_key": key})
        scored = bars[key] - warmup[key]
        assert metadata["ticker"].value == TICKER
        assert metadata["window_start"].value == start.timestamp()
        assert metadata["window_end"].value == end.timestamp()
        assert metadata["bars"].value == bars[key]
        assert metadata["warmup_excluded"].value == warmup[key]
        assert metadata["bars_scored"].value == scored
        assert metadata["anomalies"].value == found
        assert metadata["anomaly_rate"].value == pytest.approx(found / scored)
        assert metadata["model_version"].value == record["_id"]
        assert metadata["model_hash"].value == bytes_hash
        assert metadata["threshold"].value == record["threshold"]
        assert metadata["trigger"].value == "manual"
        assert isinstance(metadata["duration_seconds"], dg.FloatMetadataValue)
        assert metadata["duration_seconds"].value > 0

        if found:
            markdown = metadata["chart"].value
            assert isinstance(metadata["chart"], dg.MarkdownMetadataValue)
            assert len(markdown) < MAX_CHART_BYTES
            caption = f"{key} (1h): closes with anomalies marked ({found} anomalies, in red)"
            prefix = f"**{caption}**\n\n![{caption}](data:image/png;base64,"
            assert markdown.startswith(prefix) and markdown.endswith(")")
            assert base64.b64decode(markdown[len(prefix) : -1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert "chart" not in metadata


def test_anomaly_check_of_the_run_finds_every_anomaly_on_a_stored_model(detected):
    (evaluation,) = detected["detect"].get_asset_check_evaluations()
    stored = detected["database"]["anomalies"].count_documents({"partition_key": {"$in": KEYS}})
    assert (evaluation.check_name, evaluation.passed) == ("models_on_record", True)
    assert evaluation.metadata["scope"].value == "3 partition(s)"
    assert evaluation.metadata["anomalies_checked"].value == stored > 0


def test_ttl_index_keeps_the_configured_age(database, monkeypatch):
    monkeypatch.delenv(AUDIT_TTL_ENV_VAR, raising=False)
    AuditTrail(database)
    index = database["detection_runs"].index_information()[TTL_INDEX_NAME]
    assert index["key"] == [("finished_at", 1)]
    assert index["expireAfterSeconds"] == 30 * 86_400

    # A new configured age changes the existing index in place.
    monkeypatch.setenv(AUDIT_TTL_ENV_VAR, "7")
    AuditTrail(database)
    assert database["detection_runs"].index_information()[TTL_INDEX_NAME]["expireAfterSeconds"] == (
        7 * 86_400
    )

    monkeypatch.setenv(AUDIT_TTL_ENV_VAR, "0.5")
    AuditTrail(database)
    assert database["detection_runs"].index_information()[TTL_INDEX_NAME]["expireAfterSeconds"] == (
        43_200
    )


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_ttl_setting_must_be_a_positive_number_of_days(value, monkeypatch):
    monkeypatch.setenv(AUDIT_TTL_ENV_VAR, value)
    with pytest.raises(ValueError, match=AUDIT_TTL_ENV_VAR):
        audit_ttl_days()


def _cli_env(detected, monkeypatch) -> None:
    monkeypatch.setenv("MONGODB_URI", detected["mongo"].uri)
    monkeypatch.setenv("ANOMALY_PIPELINE_DATABASE", detected["mongo"].database)
    monkeypatch.setenv("DAGSTER_HOME", detected["dagster_home"])


def test_runs_show_prints_what_the_run_did(detected, monkeypatch, capsys):
    _cli_env(detected, monkeypatch)
    database = detected["database"]
    run_id = detected["detect"].run_id
    bars = _sample_bars_per_window()
    record, bytes_hash = _stored_model(database)
    found = database["anomalies"].count_documents({"detection_run_id": run_id})
    top = list(database["anomalies"].find({"detection_run_id": run_id}).sort("anomaly_score", -1))

    # The 8-character prefix the demo prints is enough.
    assert main(["runs", "show", run_id[:8], "--anomalies", "3"]) == 0
    out = capsys.readouterr().out

    assert f"Run {run_id}" in out
    assert "Dagster status: SUCCESS" in out
    assert f"CRYPTO 1h {TICKER}: SUCCESS   trigger: manual   stages: anomalies" in out
    assert f"partitions: 3, {KEYS[0]} to {KEYS[2]}" in out
    assert "[2025-01-01 00:00:00 UTC, 2025-04-01 00:00:00 UTC)" in out
    assert (
        f"bars in 2160, warm-up excluded {LOOKBACK_BARS}, scored {2160 - LOOKBACK_BARS}, "
        f"anomalies found {found}"
    ) in out
    assert f"model {record['_id']}  sha256 {bytes_hash}" in out
    ingest = detected["ingest_run_id"][:8]
    assert f"{KEYS[1]:<20} {bars[KEYS[1]]:>5} {0:>8} {bars[KEYS[1]]:>7}" in out
    assert f"{ingest}    {ingest}" in out
    assert f"Anomalies attributed to this run: {found}" in out
    listed = [line for line in out.splitlines() if f"  {TICKER}   1h" in line]
    assert [line.split()[0] for line in listed] == [f"{d['anomaly_score']:.4f}" for d in top[:3]]
    assert [" ".join(line.split()[3:5]) for line in listed] == [
        f"{d['timestamp']:%Y-%m-%d %H:%M}" for d in top[:3]
    ]


def test_runs_show_json_carries_the_audit_documents(detected, monkeypatch, capsys):
    _cli_env(detected, monkeypatch)
    run_id = detected["detect"].run_id
    assert main(["runs", "show", run_id, "--json", "--anomalies", "0"]) == 0
    shown = json.loads(capsys.readouterr().out)

    assert shown["run"]["status"] == "SUCCESS"
    assert shown["run"]["run_id"] == run_id
    (audit,) = shown["detections"]
    assert audit["bars_in"] == 2160
    assert audit["partition_keys"] == KEYS
    assert audit["window_start"] == "2025-01-01T00:00:00Z"
    found = detected["database"]["anomalies"].count_documents({"detection_run_id": run_id})
    assert shown["anomalies_attributed"] == found == len(shown["anomalies"])


def test_runs_show_refuses_an_unknown_run(detected, monkeypatch, capsys):
    _cli_env(detected, monkeypatch)
    assert main(["runs", "show", "0000dead"]) == 1
    assert "no run '0000dead'" in capsys.readouterr().err
