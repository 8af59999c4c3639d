"""Scoring bars with a served model and turning anomalous bars into stored documents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.model_store import ServedModel
from anomaly_pipeline.modeling.training import anomaly_scores
from anomaly_pipeline.prices.frames import PRICE_COLUMNS
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.storage.anomaly_store import anomaly_id


@dataclass(frozen=True)
class WindowDetection:
    window: BarWindow
    scored_bars: int
    documents: list[dict]


def detect(
    model: ServedModel,
    windows: Sequence[BarWindow],
    features_by_window: Sequence[pd.DataFrame],
    bars_by_window: Sequence[pd.DataFrame],
    *,
    run_id: str,
    trigger: str,
) -> list[WindowDetection]:
    """Score every window's feature rows in one call and build the anomaly documents."""
    # One scoring call for all windows: IsolationForest has a fixed cost per call.
    stacked = pd.concat(list(features_by_window)) if features_by_window else None
    scores = (
        anomaly_scores(model.artifact["forest"], stacked)
        if stacked is not None and len(stacked)
        else np.empty(0)
    )

    detections = []
    offset = 0
    for window, features, bars in zip(windows, features_by_window, bars_by_window, strict=True):
        window_scores = scores[offset : offset + len(features)]
        offset += len(features)
        flagged = np.flatnonzero(window_scores > model.threshold)
        documents = [
            _anomaly_document(
                window, features, bars, row, float(window_scores[row]), model, run_id, trigger
            )
            for row in flagged
        ]
        detections.append(WindowDetection(window, len(features), documents))
    return detections


def _anomaly_document(
    window: BarWindow,
    features: pd.DataFrame,
    bars: pd.DataFrame,
    row: int,
    score: float,
    model: ServedModel,
    run_id: str,
    trigger: str,
) -> dict:
    timestamp = features.index[row]
    bar = bars.loc[timestamp]
    feature_values = features.iloc[row]
    return {
        "_id": anomaly_id(window.ticker, window.interval, timestamp),
        "ticker": window.ticker,
        "interval": window.interval,
        "market": window.market.name,
        "timestamp": timestamp,
        **{column: float(bar[column]) for column in PRICE_COLUMNS},
        "anomaly_score": score,
        "threshold": model.threshold,
        "features": {name: float(feature_values[name]) for name in FEATURE_NAMES},
        "model_version": model.version,
        "model_hash": model.sha256,
        "detection_run_id": run_id,
        "trigger": trigger,
        "partition_key": str(window.partition_key),
    }
