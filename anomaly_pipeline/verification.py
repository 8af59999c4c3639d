"""Verification of a stored anomaly: does the model that found it, and today's model, agree?

A check recomputes the bar's features from the stored prices (the bar and the
``LOOKBACK_BARS`` stored bars before it, the same inputs the features asset uses), then scores
them twice:

- with the model that found the anomaly, looked up by the version and SHA-256 in the anomaly
  document. When neither prices nor that model changed, this reproduces the stored score to
  within ``SCORE_TOLERANCE``; a larger difference means something upstream changed;
- with the current model of the market and interval, which tells whether the bar is still
  anomalous under today's threshold and how far its score moved.

Each check is one document in collection ``anomaly_verifications`` with an ``anomaly_id``
field, never part of the anomaly document itself: the anomalies asset replaces whole partitions
of ``anomalies``, and the history of checks must survive that.

The Dagster job ``verify_anomaly`` runs one check per run, so every check is a run a reviewer
can find in the UI. It reads anomalies, prices and models and writes only its own collection:
it never rewrites a partition.
"""

import math
from dataclasses import asdict, dataclass

import dagster as dg
import numpy as np
import pandas as pd
import pymongo
from pydantic import Field
from pymongo.database import Database

from anomaly_pipeline.assets.anomalies import anomalies_asset_key
from anomaly_pipeline.features import FEATURE_NAMES, LOOKBACK_BARS, compute_features
from anomaly_pipeline.intervals import interval_spec
from anomaly_pipeline.modeling.model_store import (
    ModelStore,
    ModelStoreResource,
    ModelUnavailableError,
    ServedModel,
)
from anomaly_pipeline.modeling.training import anomaly_scores
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.storage.mongo import ANOMALIES, ANOMALY_VERIFICATIONS, MODELS, bson_safe
from anomaly_pipeline.universe import Universe

# Re-scoring the same features with the same forest is deterministic; anything beyond rounding
# noise means the prices or the model bytes are not what produced the stored score.
SCORE_TOLERANCE = 1e-9
VERIFICATION_JOB_NAME = "verify_anomaly"
ANOMALY_ID_TAG = "anomaly_pipeline/anomaly_id"


class AnomalyNotFoundError(LookupError):
    """No stored anomaly has the requested ``_id``."""


@dataclass(frozen=True)
class ModelScore:
    """One model's verdict on the bar; ``score`` is None when the model could not be used."""

    version: str | None
    sha256: str | None
    threshold: float | None
    score: float | None
    # Why the model could not be used, or how it was found when not by its version.
    note: str | None = None

    @property
    def available(self) -> bool:
        return self.score is not None

    @property
    def anomalous(self) -> bool | None:
        if self.score is None or self.threshold is None:
            return None
        # The same rule as detection: strictly above the threshold.
        return self.score > self.threshold


@dataclass(frozen=True)
class Verification:
    """The outcome of re-running detection for one stored anomaly."""

    anomaly_id: str
    ticker: str
    interval: str
    market: str
    timestamp: pd.Timestamp
    partition_key: str
    checked_at: pd.Timestamp
    run_id: str
    stored_score: float
    stored_threshold: float
    stored_model_version: str
    stored_model_hash: str
    # "recomputed" from stored prices, or "stored" (the anomaly's own copy) when that failed.
    features_source: str
    features_match: bool | None
    max_feature_difference: float | None
    features_note: str | None
    original: ModelScore
    current: ModelScore

    @property
    def original_score_difference(self) -> float | None:
        if self.original.score is None:
            return None
        return self.original.score - self.stored_score

    @property
    def reproduced(self) -> bool | None:
        """Whether the original model gives the stored score again (None: model unavailable)."""
        difference = self.original_score_difference
        return None if difference is None else abs(difference) <= SCORE_TOLERANCE

    @property
    def model_changed(self) -> bool | None:
        if self.current.sha256 is None:
            return None
        return self.current.sha256 != self.stored_model_hash

    @property
    def score_change(self) -> float | None:
        """Current model's score minus the stored score."""
        return None if self.current.score is None else self.current.score - self.stored_score

    @property
    def still_anomalous(self) -> bool | None:
        return self.current.anomalous

    def summary(self) -> str:
        """One sentence a reviewer can act on."""
        parts = []
        if self.reproduced is None:
            parts.append(f"the model that found it ({self.stored_model_version}) is unavailable")
        elif self.reproduced:
            parts.append(f"{self.original.version} reproduces the stored score")
        else:
            parts.append(
                f"{self.original.version} gives {self.original.score:.6f}, not the stored "
                f"{self.stored_score:.6f}: prices or features changed since detection"
            )
        if self.current.score is None:
            parts.append("no current model could score it")
        else:
            verdict = "still anomalous" if self.still_anomalous else "no longer anomalous"
            model = "the same model" if not self.model_changed else self.current.version
            parts.append(f"{verdict} under {model} (score change {self.score_change:+.6f})")
        return "; ".join(parts)

    def to_document(self) -> dict:
        """The ``anomaly_verifications`` document: one per check, keyed by anomaly and run."""
        return bson_safe(
            {
                "_id": f"{self.anomaly_id}|{self.run_id}",
                **{
                    name: value
                    for name, value in asdict(self).items()
                    if name not in ("original", "current")
                },
                "original_model": _model_fields(self.original),
                "current_model": _model_fields(self.current),
                "original_score_difference": self.original_score_difference,
                "reproduced": self.reproduced,
                "model_changed": self.model_changed,
                "score_change": self.score_change,
                "still_anomalous": self.still_anomalous,
                "summary": self.summary(),
            }
        )


def _model_fields(model: ModelScore) -> dict:
    return {**asdict(model), "available": model.available, "anomalous": model.anomalous}


def verify_anomaly(
    model_store: ModelStoreResource, anomaly_id: str, *, run_id: str
) -> Verification:
    """Re-run detection for the stored anomaly ``anomaly_id`` with its own and the current model.

    Raises AnomalyNotFoundError when no anomaly has that ``_id``. Every other problem (prices
    gone, model deleted, model from another scikit-learn) is reported in the result.
    """
    store = model_store.store()
    database = store.database
    anomaly = database[ANOMALIES].find_one({"_id": anomaly_id})
    if anomaly is None:
        raise AnomalyNotFoundError(f"no stored anomaly has _id {anomaly_id!r}")

    stored_features = pd.DataFrame(
        [[anomaly["features"][name] for name in FEATURE_NAMES]],
        columns=list(FEATURE_NAMES),
        index=pd.DatetimeIndex([anomaly["timestamp"]], name="timestamp"),
    )
    recomputed, features_note = recompute_bar_features(
        BarStore(database), anomaly["ticker"], anomaly["interval"], anomaly["timestamp"]
    )
    if recomputed is None:
        features, features_match, max_difference = stored_features, None, None
    else:
        features = recomputed
        # Exact equality on purpose: features are a pure function of the stored bars.
        features_match = bool((recomputed.to_numpy() == stored_features.to_numpy()).all())
        max_difference = float(np.abs(recomputed.to_numpy() - stored_features.to_numpy()).max())

    original = _score(
        features,
        _original_model(store, anomaly),
        identity=(anomaly["model_version"], anomaly["model_hash"]),
    )
    current = _score(features, _current_model(store, anomaly))
    return Verification(
        anomaly_id=anomaly_id,
        ticker=anomaly["ticker"],
        interval=anomaly["interval"],
        market=anomaly["market"],
        timestamp=pd.Timestamp(anomaly["timestamp"]),
        partition_key=anomaly["partition_key"],
        checked_at=pd.Timestamp.now(tz="UTC"),
        run_id=run_id,
        stored_score=anomaly["anomaly_score"],
        stored_threshold=anomaly["threshold"],
        stored_model_version=anomaly["model_version"],
        stored_model_hash=anomaly["model_hash"],
        features_source="stored" if recomputed is None else "recomputed",
        features_match=features_match,
        max_feature_difference=max_difference,
        features_note=features_note,
        original=original,
        current=current,
    )


def recompute_bar_features(
    bar_store: BarStore, ticker: str, interval: str, timestamp: pd.Timestamp
) -> tuple[pd.DataFrame | None, str | None]:
    """The bar's feature row from stored prices, or None and the reason it cannot be computed."""
    timestamp = pd.Timestamp(timestamp).tz_convert("UTC")
    bar = bar_store.read_bars(
        ticker, interval, timestamp, timestamp + interval_spec(interval).bar_length
    )
    bar = bar[bar.index == timestamp]
    if bar.empty:
        return None, "the bar is no longer in price_bars; scored the anomaly's stored features"
    history = bar_store.bars_before(ticker, interval, timestamp, LOOKBACK_BARS)
    try:
        result = compute_features(pd.concat([history, bar]), start=timestamp)
    except ValueError as exc:
        return None, f"stored prices give no features ({exc}); scored the stored features"
    if result.features.empty:
        return None, (
            f"only {len(history)} stored bars precede the bar and {LOOKBACK_BARS} are needed; "
            "scored the anomaly's stored features"
        )
    return result.features[list(FEATURE_NAMES)], None


@dataclass(frozen=True)
class _ModelLookup:
    # The version's identity comes from the store's record: the per-process model cache may
    # hand out the same bytes with the record of another version that holds them.
    record: dict | None
    served: ServedModel | None
    note: str | None = None


def _original_model(store: ModelStore, anomaly: dict) -> _ModelLookup:
    """The model whose bytes hash to the anomaly's ``model_hash``, preferably by its version."""
    version, sha256 = anomaly["model_version"], anomaly["model_hash"]
    record = store.record_by_version(version)
    if record is None:
        note = f"model {version} is no longer in the store"
    elif record["sha256"] != sha256:
        note = (
            f"{version} now names other bytes (sha256 {record['sha256'][:12]}), not the "
            f"{sha256[:12]} that found this bar"
        )
    else:
        try:
            return _ModelLookup(record, store.load(record))
        except ModelUnavailableError as exc:
            note = str(exc)

    # Identical bytes saved again later get a new version: they are still the same model.
    same_bytes = store.database[MODELS].find_one(
        {"market": anomaly["market"], "interval": anomaly["interval"], "sha256": sha256},
        sort=[("sequence", -1)],
    )
    if same_bytes is not None and same_bytes["_id"] != version:
        try:
            served = store.load(same_bytes)
        except ModelUnavailableError as exc:
            note = f"{note}; {exc}"
        else:
            note = f"{note}; the same bytes are stored as {same_bytes['_id']}"
            return _ModelLookup(same_bytes, served, note)
    return _ModelLookup(None, None, note)


def _current_model(store: ModelStore, anomaly: dict) -> _ModelLookup:
    market, interval = anomaly["market"], anomaly["interval"]
    record = store.current_record(market, interval)
    if record is None:
        return _ModelLookup(None, None, f"no model is stored for {market} {interval}")
    try:
        return _ModelLookup(record, store.load(record))
    except ModelUnavailableError as exc:
        return _ModelLookup(record, None, str(exc))


def _score(
    features: pd.DataFrame,
    lookup: _ModelLookup,
    *,
    identity: tuple[str | None, str | None] = (None, None),
) -> ModelScore:
    if lookup.served is None:
        version, sha256 = identity
        if lookup.record is not None:
            version, sha256 = lookup.record["_id"], lookup.record["sha256"]
        return ModelScore(
            version=version, sha256=sha256, threshold=None, score=None, note=lookup.note
        )
    score = float(anomaly_scores(lookup.served.artifact["forest"], features)[0])
    return ModelScore(
        version=lookup.record["_id"],
        sha256=lookup.record["sha256"],
        threshold=float(lookup.served.threshold),
        score=score,
        note=lookup.note,
    )


class VerificationStore:
    """The ``anomaly_verifications`` collection: every check ever made, one document each."""

    def __init__(self, database: Database):
        self.collection = database[ANOMALY_VERIFICATIONS]
        self.collection.create_index(
            [("anomaly_id", pymongo.ASCENDING), ("checked_at", pymongo.DESCENDING)],
            name="anomaly_checked_at",
        )

    def record(self, verification: Verification) -> dict:
        """Store one check; a retried step of the same run replaces its own document."""
        document = verification.to_document()
        self.collection.replace_one({"_id": document["_id"]}, document, upsert=True)
        return document

    def history(self, anomaly_id: str) -> list[dict]:
        """Every check of one anomaly, newest first."""
        return list(
            self.collection.find({"anomaly_id": anomaly_id}).sort(
                [("checked_at", pymongo.DESCENDING), ("_id", pymongo.ASCENDING)]
            )
        )


def verification_metadata(verification: Verification) -> dict[str, dg.MetadataValue]:
    """What a check found, as typed metadata for the run and the anomalies partition."""
    original, current = verification.original, verification.current
    metadata: dict[str, dg.MetadataValue] = {
        "anomaly_id": dg.MetadataValue.text(verification.anomaly_id),
        "bar_timestamp": dg.MetadataValue.timestamp(verification.timestamp.to_pydatetime()),
        "stored_score": dg.MetadataValue.float(verification.stored_score),
        "features_source": dg.MetadataValue.text(verification.features_source),
        "original_model_version": dg.MetadataValue.text(original.version or "unknown"),
        "original_model_hash": dg.MetadataValue.text(original.sha256 or "unknown"),
        "original_model_available": dg.MetadataValue.bool(original.available),
        "current_model_version": dg.MetadataValue.text(current.version or "none"),
        "current_model_hash": dg.MetadataValue.text(current.sha256 or "none"),
        "summary": dg.MetadataValue.text(verification.summary()),
    }
    optional = {
        "features_match": _bool_value(verification.features_match),
        "max_feature_difference": _float_value(verification.max_feature_difference),
        "original_score": _float_value(original.score),
        "original_score_difference": _float_value(verification.original_score_difference),
        "reproduced": _bool_value(verification.reproduced),
        "current_score": _float_value(current.score),
        "current_threshold": _float_value(current.threshold),
        "score_change": _float_value(verification.score_change),
        "still_anomalous": _bool_value(verification.still_anomalous),
        "model_changed": _bool_value(verification.model_changed),
    }
    metadata.update({label: value for label, value in optional.items() if value is not None})
    notes = [note for note in (verification.features_note, original.note, current.note) if note]
    if notes:
        metadata["notes"] = dg.MetadataValue.md("\n".join(f"- {note}" for note in notes))
    return metadata


def _float_value(value: float | None) -> dg.MetadataValue | None:
    if value is None or math.isnan(value):
        return None
    return dg.MetadataValue.float(value)


def _bool_value(value: bool | None) -> dg.MetadataValue | None:
    return None if value is None else dg.MetadataValue.bool(value)


class VerificationConfig(dg.Config):
    anomaly_id: str = Field(
        description=(
            "`_id` of the stored anomaly to check, TICKER|interval|bar start in UTC, "
            "e.g. MSFT|1d|1987-10-19T04:00:00Z (listed by `anomaly-pipeline anomalies --json`)."
        )
    )


def build_verification_job(universe: Universe) -> dg.JobDefinition:
    @dg.op(
        name="verify_stored_anomaly",
        description=(
            "Recomputes one stored anomaly's features from the stored prices, scores them with "
            "the model that found it and with the current model, and records the outcome in "
            "MongoDB collection `anomaly_verifications`. Reads only; no partition is rewritten."
        ),
    )
    def verify_stored_anomaly(
        context: dg.OpExecutionContext,
        config: VerificationConfig,
        model_store: ModelStoreResource,
    ) -> dg.Output[dict]:
        try:
            verification = verify_anomaly(model_store, config.anomaly_id, run_id=context.run_id)
        except AnomalyNotFoundError as exc:
            raise dg.Failure(
                f"{exc}; list stored anomalies with `anomaly-pipeline anomalies`"
            ) from exc
        document = VerificationStore(model_store.store().database).record(verification)
        metadata = verification_metadata(verification)
        context.log.info(f"{verification.anomaly_id}: {verification.summary()}")
        if verification.reproduced is False:
            context.log.warning(
                f"{verification.anomaly_id}: the original model no longer reproduces the stored "
                f"score (difference {verification.original_score_difference:+.3e})"
            )

        # Also shown on the anomaly's partition of the anomalies asset, next to the
        # materialization that stored it. An observation does not rewrite the partition.
        market = universe.markets.get(verification.market)
        if market is not None and verification.interval in market.intervals:
            context.log_event(
                dg.AssetObservation(
                    asset_key=anomalies_asset_key(market, verification.interval),
                    partition=verification.partition_key,
                    metadata=metadata,
                )
            )
        return dg.Output(document, metadata=metadata)

    @dg.job(
        name=VERIFICATION_JOB_NAME,
        description=(
            "Checks one stored anomaly against today's data and models: does the model that "
            "found it still give the same score, and is the bar still anomalous under the "
            "current model? Set `anomaly_id` in the op config. Results are kept per check in "
            "MongoDB collection `anomaly_verifications` and shown in this run's metadata."
        ),
    )
    def verify_anomaly_job() -> None:
        verify_stored_anomaly()

    return verify_anomaly_job


def verification_run_config(anomaly_id: str) -> dict:
    return {"ops": {"verify_stored_anomaly": {"config": {"anomaly_id": anomaly_id}}}}


def build_verification_definitions(universe: Universe) -> dg.Definitions:
    return dg.Definitions(jobs=[build_verification_job(universe)])
