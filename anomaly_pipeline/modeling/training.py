"""Training an IsolationForest on one market's stored features, deterministically.

The stored artifact is the fitted forest together with its decision threshold. The threshold is
the ``1 - flag_rate`` quantile of the training rows' anomaly scores, so on new data drawn like the
training data about ``flag_rate`` of bars are flagged. Same rows in, same bytes out: a fixed
``random_state``, rows in a fixed order, and a single-threaded fit.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
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


def feature_matrix(
    features: pd.DataFrame, feature_names: Sequence[str] = FEATURE_NAMES
) -> pd.DataFrame:
    """The ``feature_names`` columns of ``features`` in that order, as finite float64 values.

    Columns are matched by name, never by position, so a frame whose columns come in another
    order scores the same; extra columns (such as ``ticker``) are ignored. A missing feature, a
    frame without column names, or a value that is not a finite number raises ValueError naming
    the feature and the bar, because scikit-learn would otherwise score a NaN or a shuffled
    column without complaint, or fail with a message that names neither.
    """
    if not isinstance(features, pd.DataFrame):
        raise ValueError(
            f"features must be a DataFrame with named columns {', '.join(feature_names)}; "
            f"got {type(features).__name__}"
        )
    missing = [name for name in feature_names if name not in features.columns]
    if missing:
        raise ValueError(
            f"features lack {', '.join(missing)}; the model needs {', '.join(feature_names)}"
        )
    try:
        matrix = features[list(feature_names)].astype("float64")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"features are not all numbers: {exc}") from None
    finite = np.isfinite(matrix.to_numpy())
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        value = float(matrix.iat[row, column])
        raise ValueError(
            f"{_describe_row(features, int(row))}: {feature_names[column]} is {value}; features "
            "must be finite numbers"
        )
    return matrix


def _describe_row(features: pd.DataFrame, row: int) -> str:
    label = features.index[row]
    stamp = label.isoformat() if isinstance(label, pd.Timestamp) else str(label)
    ticker = f"{features['ticker'].iloc[row]} " if "ticker" in features.columns else ""
    return f"{ticker}bar at {stamp}"


def anomaly_scores(forest: IsolationForest, features: pd.DataFrame) -> np.ndarray:
    """Scores oriented so that higher means more anomalous (the paper's s(x, n), in (0, 1]).

    Columns are given to the forest in the order it was fitted with, by name.
    """
    fitted_names = getattr(forest, "feature_names_in_", None)
    if fitted_names is None:
        raise ValueError("the forest was fitted without feature names; retrain it")
    return -forest.score_samples(feature_matrix(features, [str(n) for n in fitted_names]))


def train_model(features: pd.DataFrame, *, flag_rate: float = DEFAULT_FLAG_RATE) -> TrainedModel:
    """Fit on ``features`` (FEATURE_NAMES columns, rows in a fixed order) and pick the threshold."""
    if not 0 < flag_rate < 0.5:
        raise ValueError(f"flag_rate must be between 0 and 0.5, got {flag_rate}")
    if len(features) < MIN_TRAINING_ROWS:
        raise ValueError(
            f"only {len(features)} feature rows to train on; "
            f"at least {MIN_TRAINING_ROWS} are needed"
        )
    training = feature_matrix(features)
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
