"""Scale-free features of each bar, computed from a fixed number of earlier bars.

Every feature of bar t depends only on bars t-LOOKBACK_BARS..t, and every windowed quantity is
summed over a fixed window in a fixed order. A feature therefore never depends on where the input
frame begins: a partition computed with exactly LOOKBACK_BARS bars of history before its start
gives bit-for-bit the numbers it would get inside a much longer frame.

Notation: O, H, L, C, V are open, high, low, close and volume; r_t = log_return_1 at bar t; std
is the sample standard deviation (ddof=1); "bars before" is how far back a feature reaches.

    name                   formula                                              bars before
    ---------------------  ---------------------------------------------------  -----------
    log_return_1           ln(C_t / C_{t-1})                                    1
    log_return_5           ln(C_t / C_{t-5})                                    5
    gap_return             ln(O_t / C_{t-1})                                    1
    volatility_20          std(r over t-19..t)                                  20
    return_zscore_20       (r_t - mean(r over t-20..t-1)) / std(same window)    21
    volatility_ratio_5_20  std(r over t-4..t) / volatility_20                   20
    volume_zscore_20       (ln(1+V_t) - mean(ln(1+V) over t-20..t-1)) / std     20
    volume_ratio_20        ln((1+V_t) / (1 + mean(V over t-20..t-1)))           20
    range_pct              (H_t - L_t) / C_t                                    0
    atr_ratio_14           TR_t / mean(TR over t-14..t-1),                      15
                           TR = max(H-L, |H-C_{t-1}|, |L-C_{t-1}|)
    close_location         (C_t - L_t) / (H_t - L_t)                            0
    rsi_14                 100 * G / (G + D), G and D the mean gain and mean    14
                           loss over the 14 changes C_{t-13}-C_{t-14}..C_t-C_{t-1}
    macd_histogram         (MACD_t - EMA9(MACD)_t) / C_t,                       138
                           MACD = EMA12(C) - EMA26(C)
    bollinger_width_20     4 * std(C over t-19..t) / mean(C over t-19..t)       19

EMAs use a finite window of K = EMA_WINDOW_MULTIPLE * span bars (K = 48, 104 and 36 for spans 12,
26 and 9) with weights (1-a)^k, k = 0..K-1, a = 2/(span+1), normalised to sum to 1. The weight an
infinite EMA would put beyond the window is (1-a)^K, about e^-8 = 3e-4 for these spans: small
enough not to matter for a histogram feature, and it makes the EMA a pure function of its last K
bars. MACD_t reaches back 103 bars (EMA26) and the signal averages 36 MACD values, so the histogram
reaches back 103 + 35 = 138 bars, which is LOOKBACK_BARS.

Degenerate denominators (decided here, never left to produce NaN or inf):

- "Near zero" means <= TINY (1e-12) for dimensionless quantities (log returns, log volumes) and
  <= TINY * C_t for price-unit quantities (true range), i.e. below a 1e-12 relative price move.
- return_zscore_20, volume_zscore_20: a near-zero window std gives 0 when the numerator is also
  near zero (nothing happened) and otherwise +/-Z_CAP with the numerator's sign. Every z-score is
  clipped to +/-Z_CAP.
- volatility_ratio_5_20: near-zero volatility_20 gives 1 when the 5-bar std is near zero too,
  otherwise RATIO_CAP. (Outside that case it cannot exceed sqrt(19/4).)
- atr_ratio_14: a near-zero mean true range gives 1 when TR_t is near zero too, otherwise
  RATIO_CAP. The ratio is always clipped to [0, RATIO_CAP], because a tiny but non-zero mean can
  otherwise make it arbitrarily large.
- close_location: 0.5 when H == L (the close is at neither end of an empty range); clipped to
  [0, 1] when a source reports a close outside its own high/low.
- rsi_14: 50 when all 14 changes are zero.
- volume_ratio_20 (denominator >= 1), range_pct, bollinger_width_20 and the log returns (prices
  are validated > 0) have no degenerate case. A zero-volume bar gives volume_ratio_20 =
  -ln(1 + mean V) <= 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from anomaly_pipeline.prices.frames import is_canonical

FEATURE_NAMES: tuple[str, ...] = (
    "log_return_1",
    "log_return_5",
    "gap_return",
    "volatility_20",
    "return_zscore_20",
    "volatility_ratio_5_20",
    "volume_zscore_20",
    "volume_ratio_20",
    "range_pct",
    "atr_ratio_14",
    "close_location",
    "rsi_14",
    "macd_histogram",
    "bollinger_width_20",
)

Z_CAP = 20.0
RATIO_CAP = 20.0
TINY = 1e-12

RETURN_WINDOW = 20
SHORT_RETURN_WINDOW = 5
VOLUME_WINDOW = 20
ATR_WINDOW = 14
RSI_WINDOW = 14
BOLLINGER_WINDOW = 20
MACD_FAST_SPAN = 12
MACD_SLOW_SPAN = 26
MACD_SIGNAL_SPAN = 9
EMA_WINDOW_MULTIPLE = 4


def ema_window(span: int) -> int:
    """Number of bars K in the finite-window EMA of ``span``."""
    return EMA_WINDOW_MULTIPLE * span


# How many bars before t each feature reads, derived from the windows in the module docstring.
FEATURE_LOOKBACK: dict[str, int] = {
    "log_return_1": 1,
    "log_return_5": 5,
    "gap_return": 1,
    # r over t-19..t needs C_{t-20}.
    "volatility_20": RETURN_WINDOW,
    # r over t-20..t-1 needs C_{t-21}.
    "return_zscore_20": RETURN_WINDOW + 1,
    "volatility_ratio_5_20": max(SHORT_RETURN_WINDOW, RETURN_WINDOW),
    "volume_zscore_20": VOLUME_WINDOW,
    "volume_ratio_20": VOLUME_WINDOW,
    "range_pct": 0,
    # TR over t-14..t-1 needs C_{t-15}.
    "atr_ratio_14": ATR_WINDOW + 1,
    "close_location": 0,
    "rsi_14": RSI_WINDOW,
    # The signal EMA averages MACD over t-(K9-1)..t; each MACD needs K26-1 earlier closes.
    "macd_histogram": (max(ema_window(MACD_FAST_SPAN), ema_window(MACD_SLOW_SPAN)) - 1)
    + (ema_window(MACD_SIGNAL_SPAN) - 1),
    "bollinger_width_20": BOLLINGER_WINDOW - 1,
}

LOOKBACK_BARS: int = max(FEATURE_LOOKBACK.values())


@dataclass(frozen=True)
class FeatureResult:
    """Features of the requested rows, and how many requested rows lacked enough history."""

    features: pd.DataFrame
    warmup_excluded: int


def compute_features(bars: pd.DataFrame, *, start: pd.Timestamp | None = None) -> FeatureResult:
    """Features for every bar of ``bars`` at or after ``start`` that has enough history.

    ``bars`` is a canonical frame (see ``anomaly_pipeline.prices.frames``) and may hold history
    before ``start``. Rows at or after ``start`` with fewer than LOOKBACK_BARS earlier bars in
    ``bars`` are left out and counted in ``warmup_excluded``. Raises ValueError naming the
    timestamp of the first bar with a non-positive or non-finite price or a negative or
    non-finite volume.
    """
    if not is_canonical(bars):
        raise ValueError(
            "bars is not a canonical frame: expected a sorted unique UTC DatetimeIndex named "
            "'timestamp' and float64 columns open, high, low, close, volume"
        )
    _validate_values(bars)

    index = bars.index
    n = len(index)
    requested = 0 if start is None else int(index.searchsorted(_as_utc(start), side="left"))
    warmup_excluded = max(0, min(LOOKBACK_BARS, n) - requested)
    first = max(requested, LOOKBACK_BARS)
    if first >= n:
        empty = pd.DataFrame(
            {name: pd.Series(dtype="float64") for name in FEATURE_NAMES},
            index=pd.DatetimeIndex([], tz="UTC", name="timestamp"),
        )
        return FeatureResult(features=empty, warmup_excluded=warmup_excluded)

    rows = np.arange(first, n)
    columns = _feature_columns(bars, rows)
    matrix = np.column_stack([columns[name] for name in FEATURE_NAMES])
    # Inputs are validated, so this only trips on overflow from absurd price ratios; refuse
    # rather than hand on a value no model can use.
    finite = np.isfinite(matrix)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"bar at {index[rows[row]].isoformat()}: {FEATURE_NAMES[col]} is not finite"
        )
    features = pd.DataFrame(matrix, index=index[rows], columns=list(FEATURE_NAMES))
    return FeatureResult(features=features, warmup_excluded=warmup_excluded)


def _as_utc(start: pd.Timestamp) -> pd.Timestamp:
    start = pd.Timestamp(start)
    if start.tzinfo is None:
        raise ValueError(f"start {start} must be timezone-aware")
    return start.tz_convert("UTC")


def _validate_values(bars: pd.DataFrame) -> None:
    prices = bars[["open", "high", "low", "close"]].to_numpy(dtype="float64")
    volume = bars["volume"].to_numpy(dtype="float64")
    # Compare only finite values so NaN never reaches a comparison.
    price_finite = np.isfinite(prices)
    bad_price = ~price_finite | (np.where(price_finite, prices, 1.0) <= 0.0)
    volume_finite = np.isfinite(volume)
    bad_volume = ~volume_finite | (np.where(volume_finite, volume, 0.0) < 0.0)
    bad_rows = bad_price.any(axis=1) | bad_volume
    if not bad_rows.any():
        return
    row = int(np.argmax(bad_rows))
    if bad_price[row].any():
        column = ("open", "high", "low", "close")[int(np.argmax(bad_price[row]))]
        rule = "prices must be finite and > 0"
    else:
        column = "volume"
        rule = "volume must be finite and >= 0"
    value = float(bars[column].iloc[row])
    raise ValueError(f"bar at {bars.index[row].isoformat()} has {column}={value!r}: {rule}")


def _feature_columns(bars: pd.DataFrame, rows: np.ndarray) -> dict[str, np.ndarray]:
    o = bars["open"].to_numpy(dtype="float64")
    h = bars["high"].to_numpy(dtype="float64")
    low = bars["low"].to_numpy(dtype="float64")
    c = bars["close"].to_numpy(dtype="float64")
    v = bars["volume"].to_numpy(dtype="float64")
    n = len(c)

    # Whole-frame per-bar series; element 0 is a placeholder never read by an output row,
    # since every output row has at least LOOKBACK_BARS earlier bars.
    log_ret = np.zeros(n)
    log_ret[1:] = np.log(c[1:] / c[:-1])
    change = np.zeros(n)
    change[1:] = c[1:] - c[:-1]
    true_range = h - low
    true_range[1:] = np.maximum(
        true_range[1:],
        np.maximum(np.abs(h[1:] - c[:-1]), np.abs(low[1:] - c[:-1])),
    )
    log_volume = np.log1p(v)

    c_t = c[rows]
    c_prev = c[rows - 1]
    h_t = h[rows]
    l_t = low[rows]
    r_t = log_ret[rows]

    _, volatility = _window_mean_std(log_ret, rows, RETURN_WINDOW, end_lag=0)
    _, short_volatility = _window_mean_std(log_ret, rows, SHORT_RETURN_WINDOW, end_lag=0)
    prior_r_mean, prior_r_std = _window_mean_std(log_ret, rows, RETURN_WINDOW, end_lag=1)
    prior_lv_mean, prior_lv_std = _window_mean_std(log_volume, rows, VOLUME_WINDOW, end_lag=1)
    prior_v_mean = _window_sum(v, rows, VOLUME_WINDOW, end_lag=1) / VOLUME_WINDOW
    prior_tr_mean = _window_sum(true_range, rows, ATR_WINDOW, end_lag=1) / ATR_WINDOW
    c_mean, c_std = _window_mean_std(c, rows, BOLLINGER_WINDOW, end_lag=0)

    bar_range = h_t - l_t
    location = np.full(len(rows), 0.5)
    np.divide(c_t - l_t, bar_range, out=location, where=bar_range != 0.0)

    gains = _window_sum(np.maximum(change, 0.0), rows, RSI_WINDOW, end_lag=0)
    losses = _window_sum(np.maximum(-change, 0.0), rows, RSI_WINDOW, end_lag=0)
    moves = gains + losses
    # Dividing before scaling keeps one-sided windows at exactly 100 or 0 (G/G is exactly 1).
    gain_share = np.full(len(rows), 0.5)
    np.divide(gains, moves, out=gain_share, where=moves > 0.0)
    rsi = 100.0 * gain_share

    return {
        "log_return_1": r_t,
        "log_return_5": np.log(c_t / c[rows - 5]),
        "gap_return": np.log(o[rows] / c_prev),
        "volatility_20": volatility,
        "return_zscore_20": _zscore(r_t - prior_r_mean, prior_r_std),
        "volatility_ratio_5_20": _ratio(short_volatility, volatility, TINY),
        "volume_zscore_20": _zscore(log_volume[rows] - prior_lv_mean, prior_lv_std),
        "volume_ratio_20": np.log((1.0 + v[rows]) / (1.0 + prior_v_mean)),
        "range_pct": bar_range / c_t,
        "atr_ratio_14": _ratio(true_range[rows], prior_tr_mean, TINY * c_t),
        "close_location": np.clip(location, 0.0, 1.0),
        "rsi_14": rsi,
        "macd_histogram": _macd_histogram(c, rows),
        "bollinger_width_20": 4.0 * c_std / c_mean,
    }


def _window(x: np.ndarray, rows: np.ndarray, length: int, end_lag: int) -> list[np.ndarray]:
    """The window x[t-end_lag-length+1 .. t-end_lag] of each row, one array per lag, newest first.

    Reductions below loop over these arrays in a fixed order, so each row's result depends only
    on its own window values, never on how many rows there are or where the frame starts.
    """
    return [x[rows - end_lag - k] for k in range(length)]


def _window_sum(x: np.ndarray, rows: np.ndarray, length: int, end_lag: int) -> np.ndarray:
    total = np.zeros(len(rows))
    for values in _window(x, rows, length, end_lag):
        total = total + values
    return total


def _window_mean_std(
    x: np.ndarray, rows: np.ndarray, length: int, end_lag: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) over each row's window.

    Deviations are taken from the window's newest value first: the variance is unchanged by the
    shift, precision is better for prices far from zero, and a constant window gives exactly 0.
    """
    window = _window(x, rows, length, end_lag)
    reference = window[0]
    deviations = [values - reference for values in window]
    total = np.zeros(len(rows))
    for d in deviations:
        total = total + d
    mean_deviation = total / length
    squares = np.zeros(len(rows))
    for d in deviations:
        squares = squares + (d - mean_deviation) ** 2
    return reference + mean_deviation, np.sqrt(squares / (length - 1))


def _zscore(numerator: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = np.where(np.abs(numerator) <= TINY, 0.0, np.copysign(Z_CAP, numerator))
    np.divide(numerator, std, out=out, where=std > TINY)
    return np.clip(out, -Z_CAP, Z_CAP)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, tiny: np.ndarray | float) -> np.ndarray:
    """numerator / denominator for non-negative inputs, neutral 1 when both are near zero."""
    out = np.where(numerator <= tiny, 1.0, RATIO_CAP)
    np.divide(numerator, denominator, out=out, where=denominator > tiny)
    return np.clip(out, 0.0, RATIO_CAP)


def _ema_weights(span: int) -> np.ndarray:
    decay = 1.0 - 2.0 / (span + 1.0)
    weights = decay ** np.arange(ema_window(span), dtype="float64")
    return weights / weights.sum()


def _ema(x: np.ndarray, ends: np.ndarray, span: int) -> np.ndarray:
    """Finite-window EMA of x ending at each index in ``ends`` (weights newest first).

    Written as x_t + sum_k w_k (x_{t-k} - x_t), which equals sum_k w_k x_{t-k} because the
    weights sum to 1, but gives exactly x_t on a constant series.
    """
    latest = x[ends]
    total = np.zeros(len(ends))
    window = _window(x, ends, ema_window(span), end_lag=0)
    for weight, values in zip(_ema_weights(span), window, strict=True):
        total = total + weight * (values - latest)
    return latest + total


def _macd_histogram(c: np.ndarray, rows: np.ndarray) -> np.ndarray:
    signal_window = ema_window(MACD_SIGNAL_SPAN)
    # MACD is needed for each output row and the signal_window - 1 bars before it.
    macd_ends = np.arange(rows[0] - (signal_window - 1), rows[-1] + 1)
    macd = _ema(c, macd_ends, MACD_FAST_SPAN) - _ema(c, macd_ends, MACD_SLOW_SPAN)
    positions = rows - macd_ends[0]
    signal = _ema(macd, positions, MACD_SIGNAL_SPAN)
    return (macd[positions] - signal) / c[rows]
