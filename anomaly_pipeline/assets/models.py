"""One IsolationForest per market and interval, trained on that market's stored features."""

import dagster as dg
import numpy as np
import pandas as pd
import sklearn
from pydantic import Field, ValidationInfo, field_validator, model_validator

from anomaly_pipeline.assets.features import features_asset_key
from anomaly_pipeline.modeling.model_store import ModelStoreResource
from anomaly_pipeline.modeling.training import (
    DEFAULT_FLAG_RATE,
    FOREST_PARAMS,
    MIN_TRAINING_ROWS,
    train_model,
)
from anomaly_pipeline.storage.bar_store import BarStore
from anomaly_pipeline.universe import Market


class ModelTrainingConfig(dg.Config):
    train_start: str | None = Field(
        default=None, description="First bar (ISO date, UTC) to train on; default: all history."
    )
    train_end: str | None = Field(
        default=None, description="Train on bars before this ISO date (UTC); default: up to now."
    )
    flag_rate: float = Field(
        default=DEFAULT_FLAG_RATE,
        description="Share of bars like the training data that the threshold flags.",
    )
    max_training_rows: int = Field(
        default=2_000_000,
        description="Above this, evenly spaced rows are kept (deterministic) to bound memory.",
    )

    # Checked when the run starts, before any feature is read: a typo in run config should fail
    # in seconds with the field's name, not after minutes of reading or as a pandas traceback.
    @field_validator("train_start", "train_end")
    @classmethod
    def _iso_date(cls, text: str | None, info: ValidationInfo) -> str | None:
        if text is not None:
            _utc_timestamp(text, info.field_name)
        return text

    @field_validator("flag_rate")
    @classmethod
    def _rate_in_range(cls, rate: float) -> float:
        if not 0 < rate < 0.5:
            raise ValueError(f"flag_rate must be more than 0 and less than 0.5, got {rate}")
        return rate

    @field_validator("max_training_rows")
    @classmethod
    def _enough_rows(cls, rows: int) -> int:
        if rows < MIN_TRAINING_ROWS:
            raise ValueError(f"max_training_rows must be at least {MIN_TRAINING_ROWS}, got {rows}")
        return rows

    @model_validator(mode="after")
    def _start_before_end(self) -> "ModelTrainingConfig":
        start, end = self.training_bounds()
        if start is not None and end is not None and start >= end:
            raise ValueError(
                f"train_start ({self.train_start}) must be before train_end ({self.train_end})"
            )
        return self

    def training_bounds(self) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
        """The requested training window in UTC; a date without a zone is read as UTC."""
        return (
            _utc_timestamp(self.train_start, "train_start") if self.train_start else None,
            _utc_timestamp(self.train_end, "train_end") if self.train_end else None,
        )


def _utc_timestamp(text: str, field_name: str) -> pd.Timestamp:
    try:
        moment = pd.Timestamp(text)
    except ValueError:
        moment = pd.NaT
    if moment is pd.NaT:
        raise ValueError(
            f"{field_name} must be an ISO date or date-time such as 2024-01-31, got {text!r}"
        )
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


def model_asset_key(market: Market, interval: str) -> dg.AssetKey:
    return dg.AssetKey([market.key_prefix, interval, "model"])


def build_model_asset(market: Market, interval: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=model_asset_key(market, interval),
        deps=[features_asset_key(market, interval)],
        group_name=f"{market.key_prefix}_{interval}",
        kinds={"scikitlearn", "mongodb"},
        description=(
            f"The IsolationForest that scores {market.name} {interval} bars, trained on the "
            "market's stored features. Its joblib bytes live in GridFS bucket `model_blobs` and "
            "its record (SHA-256, scikit-learn version, features, parameters, training window, "
            "rows, threshold) in collection `models`. Retraining on unchanged data keeps the "
            "version; new bytes get the next version, e.g. US-1d-3."
        ),
    )
    def model(
        context: dg.AssetExecutionContext,
        config: ModelTrainingConfig,
        model_store: ModelStoreResource,
    ) -> dg.MaterializeResult:
        store = model_store.store()
        start, end = config.training_bounds()
        features = BarStore(store.database).read_features(market.tickers, interval, start, end)
        if len(features) > config.max_training_rows:
            keep = np.linspace(0, len(features) - 1, config.max_training_rows).round().astype(int)
            features = features.iloc[np.unique(keep)]
        context.log.info(
            f"training {market.name} {interval} on {len(features)} rows from "
            f"{features['ticker'].nunique()} ticker(s)"
        )
        try:
            trained = train_model(features, flag_rate=config.flag_rate)
        except ValueError as exc:
            raise dg.Failure(f"{market.name} {interval} model: {exc}") from exc

        training_window = {
            "requested_start": start,
            "requested_end": end,
            "first_bar": features.index.min(),
            "last_bar": features.index.max(),
        }
        record, is_new = store.save(
            market.name,
            interval,
            trained,
            training_window=training_window,
            tickers=sorted(features["ticker"].unique().tolist()),
            params=FOREST_PARAMS,
            run_id=context.run.run_id,
        )
        removed = store.prune(market.name, interval, keep=model_store.keep_versions)
        context.log.info(
            f"{'recorded new model' if is_new else 'unchanged bytes, kept model'} {record['_id']} "
            f"(sha256 {record['sha256'][:12]}); pruned {removed or 'nothing'}"
        )
        return dg.MaterializeResult(
            metadata=model_metadata(
                record,
                is_new,
                store.records(market.name, interval),
                keep_versions=model_store.keep_versions,
                pruned=removed,
            ),
            data_version=dg.DataVersion(record["sha256"]),
        )

    return model


def model_metadata(
    record: dict,
    is_new: bool,
    history: list[dict],
    *,
    keep_versions: int | None = None,
    pruned: list[str] | None = None,
) -> dict:
    window = record["training_window"]
    versions = pd.DataFrame(
        [
            {
                "version": r["_id"],
                "sha256": r["sha256"][:16],
                "rows": r["training_rows"],
                "threshold": round(r["threshold"], 6),
                "created_at": r["created_at"].isoformat(),
            }
            for r in history
        ]
    )
    retention = {}
    if keep_versions is not None:
        retention["keep_versions"] = dg.MetadataValue.int(keep_versions)
    if pruned is not None:
        retention["pruned_versions"] = dg.MetadataValue.json(list(pruned))
    return {
        "model_version": dg.MetadataValue.text(record["_id"]),
        "model_hash": dg.MetadataValue.text(record["sha256"]),
        "new_version": dg.MetadataValue.bool(is_new),
        "sklearn_version": dg.MetadataValue.text(record["sklearn_version"]),
        "training_rows": dg.MetadataValue.int(record["training_rows"]),
        "training_first_bar": dg.MetadataValue.timestamp(window["first_bar"]),
        "training_last_bar": dg.MetadataValue.timestamp(window["last_bar"]),
        "training_requested": dg.MetadataValue.text(
            f"{_iso_or(window['requested_start'], 'all history')} to "
            f"{_iso_or(window['requested_end'], 'now')}"
        ),
        "threshold": dg.MetadataValue.float(record["threshold"]),
        "flag_rate": dg.MetadataValue.float(record["flag_rate"]),
        "size_bytes": dg.MetadataValue.int(record["size_bytes"]),
        # The record's own list: the order the forest was fitted with, whatever the code says now.
        "feature_names": dg.MetadataValue.json(list(record["feature_names"])),
        "params": dg.MetadataValue.json(record["params"]),
        "tickers": dg.MetadataValue.json(record["tickers"]),
        "kept_versions": dg.MetadataValue.md(versions.to_markdown(index=False)),
        "serving_sklearn": dg.MetadataValue.text(sklearn.__version__),
        **retention,
    }


def _iso_or(moment: object, missing: str) -> str:
    return missing if moment is None else pd.Timestamp(moment).isoformat()
