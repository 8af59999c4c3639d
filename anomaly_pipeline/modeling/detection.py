"""Scoring bars with a served model and turning anomalous bars into stored documents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from anomaly_pipeline.features import FEATURE_NAMES
from anomaly_pipeline.modeling.model_store import ServedModel
from anomaly_pipeline.modeling.training import anomaly_scores, feature_matrix
from anomaly_pipeline.prices.frames import PRICE_COLUMNS
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.storage.anomaly_store import ANOMALY_ID_TIME_FORMAT


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
    """Score every window's feature rows in one call and build the anomaly documents.

    Raises ValueError naming the ticker, interval and partition when a window's features cannot
    be scored as they are: a missing feature, a value that is not a finite number, two rows for
    one bar, or a feature row whose bar is not stored.
    """
    for window, features, bars in zip(windows, features_by_window, bars_by_window, strict=True):
        _check_window_inputs(model, window, features, bars)
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
        documents = _anomaly_documents(
            window, features, bars, flagged, window_scores[flagged], model, run_id, trigger
        )
        detections.append(WindowDetection(window, len(features), documents))
    return detections


def _check_window_inputs(
    model: ServedModel, window: BarWindow, features: pd.DataFrame, bars: pd.DataFrame
) -> None:
    where = f"{window.ticker} {window.interval} partition {window.partition_key}"
    # Two rows for one bar would become two documents with the same _id in one batch.
    duplicated = features.index[features.index.duplicated()]
    if len(duplicated):
        raise ValueError(
            f"{where}: the stored features hold {len(duplicated)} bar(s) twice, first "
            f"{pd.Timestamp(duplicated[0]).isoformat()}; materialize the features asset for "
            "this partition again"
        )
    without_bar = features.index.difference(bars.index)
    if len(without_bar):
        raise ValueError(
            f"{where}: {len(without_bar)} feature row(s) have no stored bar, first "
            f"{pd.Timestamp(without_bar[0]).isoformat()}; the prices changed after the features "
            "were computed, so materialize the features asset for this partition again"
        )
    try:
        feature_matrix(features, model.artifact["feature_names"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _anomaly_documents(
    window: BarWindow,
    features: pd.DataFrame,
    bars: pd.DataFrame,
    rows: np.ndarray,
    scores: np.ndarray,
    model: ServedModel,
    run_id: str,
    trigger: str,
) -> list[dict]:
    """Documents for the flagged ``rows`` of one window, gathered column-wise, not row by row."""
    if not len(rows):
        return []
    stamps = features.index[rows]
    prices = bars[list(PRICE_COLUMNS)].to_numpy()[bars.index.get_indexer(stamps)].tolist()
    feature_values = features[list(FEATURE_NAMES)].to_numpy()[rows].tolist()
    shared = {
        "ticker": window.ticker,
        "interval": window.interval,
        "market": window.market.name,
        "threshold": model.threshold,
        "model_version": model.version,
        "model_hash": model.sha256,
        "detection_run_id": run_id,
        "trigger": trigger,
        "partition_key": str(window.partition_key),
    }
    return [
        {
            "_id": f"{window.ticker}|{window.interval}|{label}",
            **shared,
            "timestamp": stamp,
            **dict(zip(PRICE_COLUMNS, bar_prices, strict=True)),
            "anomaly_score": score,
            "features": dict(zip(FEATURE_NAMES, values, strict=True)),
        }
        for label, stamp, bar_prices, values, score in zip(
            stamps.strftime(ANOMALY_ID_TIME_FORMAT),
            stamps.to_pydatetime(),
            prices,
            feature_values,
            scores.tolist(),
            strict=True,
        )
    ]
