"""The shared model store: joblib bytes in GridFS, one record per model version.

A model's identity is the SHA-256 of its bytes plus the scikit-learn version that wrote them:
a forest pickled by one scikit-learn may not score correctly in another. ``joblib.load`` runs
code from the bytes it reads, so bytes are loaded only after their hash matches the record.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from dataclasses import dataclass

import dagster as dg
import gridfs
import joblib
import pandas as pd
import sklearn
from pydantic import Field
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError
from sklearn.exceptions import InconsistentVersionWarning

from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.training import TrainedModel
from anomaly_pipeline.storage.mongo import ANOMALIES, MODEL_BLOBS, MODELS, MongoResource, bson_safe


class ModelUnavailableError(RuntimeError):
    """No usable model: never trained, deleted, tampered with, or from another scikit-learn."""


@dataclass(frozen=True)
class ServedModel:
    record: dict
    artifact: dict

    @property
    def version(self) -> str:
        return self.record["_id"]

    @property
    def sha256(self) -> str:
        return self.record["sha256"]

    @property
    def threshold(self) -> float:
        return self.artifact["threshold"]


def model_version_id(market: str, interval: str, sequence: int) -> str:
    return f"{market}-{interval}-{sequence}"


# Models loaded by this process, keyed by (market, interval, sha256, scikit-learn version).
# The record is not cached with them: the same bytes can be stored under two versions.
_LOADED: dict[tuple[str, str, str, str], dict] = {}
_LOADED_LOCK = threading.Lock()


class ModelStore:
    def __init__(self, database: Database):
        self.database = database
        self.blobs = gridfs.GridFSBucket(database, bucket_name=MODEL_BLOBS)

    def current_record(self, market: str, interval: str) -> dict | None:
        return self.database[MODELS].find_one(
            {"market": market, "interval": interval}, sort=[("sequence", -1)]
        )

    def record_by_version(self, version: str) -> dict | None:
        return self.database[MODELS].find_one({"_id": version})

    def records(self, market: str, interval: str) -> list[dict]:
        return list(
            self.database[MODELS].find(
                {"market": market, "interval": interval}, sort=[("sequence", -1)]
            )
        )

    def save(
        self,
        market: str,
        interval: str,
        trained: TrainedModel,
        *,
        training_window: dict,
        tickers: list[str],
        params: dict,
        run_id: str,
    ) -> tuple[dict, bool]:
        """Record ``trained`` as the market's current model; returns (record, is_new_version).

        Bytes identical to the current model's keep its version: retraining on unchanged data
        records nothing new.
        """
        current = self.current_record(market, interval)
        if current is not None and current["sha256"] == trained.sha256:
            return current, False

        # Blob first, record second: a crash in between leaves an unreferenced blob, never a
        # record pointing at missing bytes.
        blob_id = self.blobs.upload_from_stream(
            f"{market}-{interval}-{trained.sha256[:12]}.joblib", io.BytesIO(trained.model_bytes)
        )
        sequence = (current["sequence"] if current else 0) + 1
        record = bson_safe(
            {
                "_id": model_version_id(market, interval, sequence),
                "market": market,
                "interval": interval,
                "sequence": sequence,
                "sha256": trained.sha256,
                "sklearn_version": sklearn.__version__,
                "feature_names": trained.artifact["feature_names"],
                "params": params,
                "flag_rate": trained.artifact["flag_rate"],
                "threshold": trained.threshold,
                "training_window": training_window,
                "training_rows": trained.training_rows,
                "tickers": tickers,
                "size_bytes": len(trained.model_bytes),
                "blob_id": blob_id,
                "created_at": pd.Timestamp.now(tz="UTC"),
                "created_by_run_id": run_id,
            }
        )
        try:
            self.database[MODELS].insert_one(record)
        except DuplicateKeyError:
            self.blobs.delete(blob_id)
            raise RuntimeError(
                f"another run recorded model {record['_id']} at the same time; run again"
            ) from None
        forget_loaded_models(market, interval)
        return record, True

    def prune(self, market: str, interval: str, keep: int) -> list[str]:
        """Delete versions beyond the newest ``keep``, except those stored anomalies reference."""
        removed = []
        for record in self.records(market, interval)[keep:]:
            if self.database[ANOMALIES].find_one({"model_hash": record["sha256"]}, {"_id": 1}):
                continue
            self.database[MODELS].delete_one({"_id": record["_id"]})
            self.blobs.delete(record["blob_id"])
            removed.append(record["_id"])
        return removed

    def load(self, record: dict) -> ServedModel:
        """The model behind ``record``, loaded at most once per process."""
        key = (record["market"], record["interval"], record["sha256"], record["sklearn_version"])
        with _LOADED_LOCK:
            artifact = _LOADED.get(key)
        if artifact is not None:
            return ServedModel(record=record, artifact=artifact)

        if record["sklearn_version"] != sklearn.__version__:
            raise ModelUnavailableError(
                f"model {record['_id']} was written by scikit-learn "
                f"{record['sklearn_version']} and "
                f"this process runs {sklearn.__version__}; retrain it by materializing the "
                f"{record['market'].lower()}/{record['interval']}/model asset"
            )
        if sorted(record["feature_names"]) != sorted(FEATURE_NAMES):
            raise ModelUnavailableError(
                f"model {record['_id']} was trained on features {record['feature_names']}, not "
                f"the {len(FEATURE_NAMES)} this code computes; retrain it by materializing the "
                f"{record['market'].lower()}/{record['interval']}/model asset"
            )
        try:
            model_bytes = self.blobs.open_download_stream(record["blob_id"]).read()
        except gridfs.errors.NoFile:
            raise ModelUnavailableError(f"the bytes of model {record['_id']} are missing") from None
        digest = hashlib.sha256(model_bytes).hexdigest()
        if digest != record["sha256"]:
            raise ModelUnavailableError(
                f"refusing to load model {record['_id']}: its bytes hash to {digest}, "
                f"not the recorded {record['sha256']}"
            )
        artifact = _unpickle_same_version(record, model_bytes)
        with _LOADED_LOCK:
            _LOADED[key] = artifact
        return ServedModel(record=record, artifact=artifact)


def _unpickle_same_version(record: dict, model_bytes: bytes) -> dict:
    """The artifact in ``model_bytes``, refused if scikit-learn says another version wrote it.

    The record's ``sklearn_version`` is checked before this; the pickle's own stamp is checked
    here too, so a record that disagrees with its bytes cannot slip an old forest through with
    no more than a warning.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InconsistentVersionWarning)
        artifact = joblib.load(io.BytesIO(model_bytes))
    for warning in caught:
        if issubclass(warning.category, InconsistentVersionWarning):
            raise ModelUnavailableError(
                f"model {record['_id']} was pickled by scikit-learn "
                f"{warning.message.original_sklearn_version} although its record says "
                f"{record['sklearn_version']}; this process runs {sklearn.__version__}; retrain "
                f"it by materializing the {record['market'].lower()}/{record['interval']}/model "
                "asset"
            )
        # Anything else joblib warned about is passed on unchanged.
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return artifact


def forget_loaded_models(market: str, interval: str) -> None:
    """Drop this process's cached models of one market and interval (after a retrain)."""
    with _LOADED_LOCK:
        for key in [key for key in _LOADED if key[:2] == (market, interval)]:
            del _LOADED[key]


class ModelStoreResource(dg.ConfigurableResource):
    """Serves each market's current model, loading each model once per process."""

    mongo: MongoResource
    keep_versions: int = Field(
        default=5, ge=1, description="Model versions kept per market and interval."
    )

    def store(self) -> ModelStore:
        return ModelStore(self.mongo.get_database())

    def current_model(self, market: str, interval: str) -> ServedModel:
        store = self.store()
        record = store.current_record(market, interval)
        if record is None:
            raise ModelUnavailableError(
                f"no model for market {market} interval {interval}; materialize the "
                f"{market.lower()}/{interval}/model asset first"
            )
        return store.load(record)

    def model_by_version(self, version: str) -> ServedModel:
        store = self.store()
        record = store.record_by_version(version)
        if record is None:
            raise ModelUnavailableError(f"model {version} is no longer in the store")
        return store.load(record)
