"""Training an IsolationForest on one market's stored features, deterministically.

The stored artifact is the fitted forest together with its decision threshold. The threshold is
the ``1 - flag_rate`` quantile of the training rows' anomaly scores, so on new data drawn like the
training data about ``flag_rate`` of bars are flagged. Same rows in, same bytes out: a fixed
``random_state``, rows in a fixed order, and a single-threaded fit.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.ensemble import IsolationForest

from anomaly_pipeline.features import FEATURE_NAMES

FOREST_PARAMS: dict = {
    "n_estimators": 200,
    "max_samples": 256,
    # 'auto' keeps fit from scoring every training row; the threshold below is our own.
    "contamination": "auto",
    "random_state": 20240308,
    "n_jobs": 1,
}
DEFAULT_FLAG_RATE = 0.01
# Fewer rows than this cannot give a meaningful 1% tail.
MIN_TRAINING_ROWS = 500


@dataclass(frozen=True)
class TrainedModel:
    artifact: dict
    model_bytes: bytes
    sha256: str
    threshold: float
    training_rows: int


def anomaly_scores(forest: IsolationForest, features: pd.DataFrame) -> np.ndarray:
    """Scores oriented so that higher means more anomalous (the paper's s(x, n), in (0, 1])."""
    return -forest.score_samples(features[list(FEATURE_NAMES)])


def train_model(features: pd.DataFrame, *, flag_rate: float = DEFAULT_FLAG_RATE) -> TrainedModel:
    """Fit on ``features`` (FEATURE_NAMES columns, rows in a fixed order) and pick the threshold."""
    if not 0 < flag_rate < 0.5:
        raise ValueError(f"flag_rate must be between 0 and 0.5, got {flag_rate}")
    if len(features) < MIN_TRAINING_ROWS:
        raise ValueError(
            f"only {len(features)} feature rows to train on; "
            f"at least {MIN_TRAINING_ROWS} are needed"
        )
    training = features[list(FEATURE_NAMES)].astype("float64")
    forest = IsolationForest(**FOREST_PARAMS).fit(training)
    threshold = float(np.quantile(anomaly_scores(forest, training), 1.0 - flag_rate))
    artifact = {
        "forest": forest,
        "threshold": threshold,
        "flag_rate": flag_rate,
        "feature_names": list(FEATURE_NAMES),
        "sklearn_version": sklearn.__version__,
    }
    model_bytes = serialize_artifact(artifact)
    return TrainedModel(
        artifact=artifact,
        model_bytes=model_bytes,
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        threshold=threshold,
        training_rows=len(training),
    )


def serialize_artifact(artifact: dict) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(artifact, buffer)
    return buffer.getvalue()
