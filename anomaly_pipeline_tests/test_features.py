"""Tests for the per-bar feature computation.

Expected values are computed independently here with plain Python (math, statistics) from lists
of bar values, never by calling the module's own helpers.
"""

from __future__ import annotations

import math
import re
import statistics

import numpy as np
import pandas as pd
import pytest

from anomaly_pipeline.features import (
    EMA_WINDOW_MULTIPLE,
    FEATURE_LOOKBACK,
    FEATURE_NAMES,
    LOOKBACK_BARS,
    RATIO_CAP,
    Z_CAP,
    FeatureResult,
    compute_features,
)

pytestmark = pytest.mark.filterwarnings("error")

Bar = tuple[float, float, float, float, float]  # open, high, low, close, volume


def _frame(bars: list[Bar], timestamps: pd.DatetimeIndex | None = None) -> pd.DataFrame:
    if timestamps is None:
        timestamps = pd.date_range("2024-01-02 14:30", periods=len(bars), freq="15min", tz="UTC")
    frame = pd.DataFrame(
        np.array(bars, dtype="float64").reshape(len(bars), 5),
        index=pd.DatetimeIndex(timestamps, name="timestamp"),
        columns=["open", "high", "low", "close", "volume"],
    )
    return frame


def _random_bars(n: int, seed: int, start_price: float = 100.0) -> pd.DataFrame:
    """A random walk with gaps, some zero-volume bars and a few flat (H == L) bars."""
    rng = np.random.default_rng(seed)
    bars: list[Bar] = []
    close = start_price
    for i in range(n):
        if i % 17 == 5:
            bars.append((close, close, close, close, 0.0))
            continue
        open_ = close * math.exp(rng.normal(0.0, 0.002))
        close = open_ * math.exp(rng.normal(0.0, 0.01))
        high = max(open_, close) * math.exp(abs(rng.normal(0.0, 0.004)))
        low = min(open_, close) * math.exp(-abs(rng.normal(0.0, 0.004)))
        volume = float(rng.integers(0, 5000)) if i % 11 else 0.0
        bars.append((open_, high, low, close, volume))
    return _frame(bars)


def _columns(frame: pd.DataFrame) -> tuple[list[float], ...]:
    return tuple(frame[name].tolist() for name in ("open", "high", "low", "close", "volume"))


def _reference_row(frame: pd.DataFrame, t: int) -> dict[str, float]:
    """Every feature except macd_histogram for bar t, straight from the formulas."""
    o, h, low, c, v = _columns(frame)

    def ret(i: int) -> float:
        return math.log(c[i] / c[i - 1])

    def true_range(i: int) -> float:
        return max(h[i] - low[i], abs(h[i] - c[i - 1]), abs(low[i] - c[i - 1]))

    prior_returns = [ret(i) for i in range(t - 20, t)]
    prior_log_volume = [math.log(1.0 + v[i]) for i in range(t - 20, t)]
    changes = [c[i] - c[i - 1] for i in range(t - 13, t + 1)]
    gains = sum(x for x in changes if x > 0) / 14
    losses = sum(-x for x in changes if x < 0) / 14
    closes = c[t - 19 : t + 1]
    volatility = statistics.stdev([ret(i) for i in range(t - 19, t + 1)])
    return {
        "log_return_1": ret(t),
        "log_return_5": math.log(c[t] / c[t - 5]),
        "gap_return": math.log(o[t] / c[t - 1]),
        "volatility_20": volatility,
        "return_zscore_20": (ret(t) - statistics.mean(prior_returns))
        / statistics.stdev(prior_returns),
        "volatility_ratio_5_20": statistics.stdev([ret(i) for i in range(t - 4, t + 1)])
        / volatility,
        "volume_zscore_20": (math.log(1.0 + v[t]) - statistics.mean(prior_log_volume))
        / statistics.stdev(prior_log_volume),
        "volume_ratio_20": math.log((1.0 + v[t]) / (1.0 + statistics.mean(v[t - 20 : t]))),
        "range_pct": (h[t] - low[t]) / c[t],
        "atr_ratio_14": true_range(t) / statistics.mean(true_range(i) for i in range(t - 14, t)),
        # No range: the documented neutral value.
        "close_location": (c[t] - low[t]) / (h[t] - low[t]) if h[t] > low[t] else 0.5,
        "rsi_14": 100.0 * gains / (gains + losses),
        "bollinger_width_20": 4.0 * statistics.stdev(closes) / statistics.mean(closes),
    }


def _reference_macd_histogram(closes: list[float], t: int) -> float:
    """Finite-window EMAs with explicit loops: K = EMA_WINDOW_MULTIPLE * span bars."""

    def ema(series, end: int, span: int) -> float:
        alpha = 2.0 / (span + 1.0)
        weights = [(1.0 - alpha) ** k for k in range(EMA_WINDOW_MULTIPLE * span)]
        total = 0.0
        for k, weight in enumerate(weights):
            total += weight * series(end - k)
        return total / sum(weights)

    def close(i: int) -> float:
        return closes[i]

    def macd(i: int) -> float:
        return ema(close, i, 12) - ema(close, i, 26)

    return (macd(t) - ema(macd, t, 9)) / closes[t]


# A small frame of simple numbers. Its first bar follows LOOKBACK_BARS flat bars at 100 so the
# MACD has its history; every non-MACD expectation below reads only these 30 bars.
SIMPLE_CLOSES = [
    100, 102, 101, 103, 104, 102, 105, 107, 106, 108,
    107, 110, 109, 111, 113, 112, 114, 113, 116, 115,
    117, 119, 118, 120, 121, 119, 122, 124, 123, 125,
]  # fmt: skip


def _simple_frame() -> pd.DataFrame:
    bars: list[Bar] = [(100.0, 100.0, 100.0, 100.0, 1000.0)] * LOOKBACK_BARS
    previous = 100.0
    for i, close in enumerate(SIMPLE_CLOSES):
        open_ = previous + (0.5 if i % 2 == 0 else -0.5)
        volume = 1000.0 + 100.0 * (i % 7) + (2500.0 if i == 29 else 0.0)
        bars.append((open_, max(open_, close) + 1.0, min(open_, close) - 1.0, close, volume))
        previous = close
    return _frame(bars)


def test_lookback_is_derived_from_windows() -> None:
    assert EMA_WINDOW_MULTIPLE == 4
    # EMA26 over 104 closes reaches back 103 bars; the 36-bar signal EMA adds 35 more.
    assert FEATURE_LOOKBACK["macd_histogram"] == (4 * 26 - 1) + (4 * 9 - 1) == 138
    assert FEATURE_LOOKBACK["return_zscore_20"] == 21
    assert FEATURE_LOOKBACK["atr_ratio_14"] == 15
    assert LOOKBACK_BARS == max(FEATURE_LOOKBACK.values()) == 138
    assert set(FEATURE_LOOKBACK) == set(FEATURE_NAMES)


def test_hand_computed_values_on_last_simple_bar() -> None:
    bars = _simple_frame()
    features = compute_features(bars).features
    last = features.iloc[-1]
    # Last bar: open 122.5 (previous close 123 - 0.5), high 126, low 121.5, close 125.
    assert last["log_return_1"] == pytest.approx(math.log(125 / 123), rel=1e-12)
    assert last["log_return_5"] == pytest.approx(math.log(125 / 121), rel=1e-12)
    assert last["gap_return"] == pytest.approx(math.log(122.5 / 123), rel=1e-12)
    assert last["range_pct"] == pytest.approx(4.5 / 125, rel=1e-12)
    assert last["close_location"] == pytest.approx(3.5 / 4.5, rel=1e-12)
    # Changes over the last 14 bars: +2 -1 +3 -1 +2 +2 -1 +2 +1 -2 +3 +2 -1 +2.
    assert last["rsi_14"] == pytest.approx(100 * 19 / (19 + 6), rel=1e-12)

    # TR of the last bar is its own range 4.5 (|126-123| = 3, |121.5-123| = 1.5).
    true_ranges = []
    for i in range(15, 29):
        open_ = SIMPLE_CLOSES[i - 1] + (0.5 if i % 2 == 0 else -0.5)
        high = max(open_, SIMPLE_CLOSES[i]) + 1.0
        low = min(open_, SIMPLE_CLOSES[i]) - 1.0
        prev = SIMPLE_CLOSES[i - 1]
        true_ranges.append(max(high - low, abs(high - prev), abs(low - prev)))
    assert last["atr_ratio_14"] == pytest.approx(4.5 / (sum(true_ranges) / 14), rel=1e-12)

    # Volume 1000 + 100 * (i % 7), with a 2500 spike on the last bar.
    prior_volume = [1000.0 + 100.0 * (i % 7) for i in range(9, 29)]
    last_volume = 1000.0 + 100.0 * (29 % 7) + 2500.0
    expected_ratio = math.log((1 + last_volume) / (1 + sum(prior_volume) / 20))
    assert last["volume_ratio_20"] == pytest.approx(expected_ratio, rel=1e-12)

    returns = [math.log(SIMPLE_CLOSES[i] / SIMPLE_CLOSES[i - 1]) for i in range(9, 30)]
    prior = returns[:20]
    expected_z = (returns[20] - statistics.mean(prior)) / statistics.stdev(prior)
    assert last["return_zscore_20"] == pytest.approx(expected_z, rel=1e-9)

    closes = SIMPLE_CLOSES[10:30]
    expected_width = 4 * statistics.stdev(closes) / statistics.mean(closes)
    assert last["bollinger_width_20"] == pytest.approx(expected_width, rel=1e-9)


def test_all_features_match_reference_on_simple_frame() -> None:
    bars = _simple_frame()
    features = compute_features(bars).features
    closes = bars["close"].tolist()
    # Bars whose 21-bar windows lie inside the simple segment.
    for t in range(LOOKBACK_BARS + 21, len(bars)):
        row = features.loc[bars.index[t]]
        for name, expected in _reference_row(bars, t).items():
            assert row[name] == pytest.approx(expected, rel=1e-9, abs=1e-12), (t, name)
        expected_macd = _reference_macd_histogram(closes, t)
        assert row["macd_histogram"] == pytest.approx(expected_macd, rel=1e-9, abs=1e-13)


def test_all_features_match_reference_on_random_bars() -> None:
    bars = _random_bars(200, seed=3)
    features = compute_features(bars).features
    closes = bars["close"].tolist()
    for t in range(LOOKBACK_BARS, len(bars), 7):
        row = features.loc[bars.index[t]]
        for name, expected in _reference_row(bars, t).items():
            assert row[name] == pytest.approx(expected, rel=1e-9, abs=1e-12), (t, name)
        expected_macd = _reference_macd_histogram(closes, t)
        assert row["macd_histogram"] == pytest.approx(expected_macd, rel=1e-9, abs=1e-13)


def test_output_shape_and_types() -> None:
    bars = _random_bars(160, seed=1)
    result = compute_features(bars)
    assert isinstance(result, FeatureResult)
    features = result.features
    assert tuple(features.columns) == FEATURE_NAMES
    assert all(features[name].dtype == "float64" for name in FEATURE_NAMES)
    assert str(features.index.tz) == "UTC"
    assert features.index.name == "timestamp"
    assert features.index.equals(bars.index[LOOKBACK_BARS:])
    assert np.isfinite(features.to_numpy()).all()


@pytest.mark.parametrize("split", [LOOKBACK_BARS, LOOKBACK_BARS + 1, 211, 300, 399])
def test_partition_with_lookback_history_matches_full_computation_exactly(split: int) -> None:
    bars = _random_bars(400, seed=7)
    full = compute_features(bars).features
    start = bars.index[split]
    part = compute_features(bars.iloc[split - LOOKBACK_BARS :], start=start)
    expected = full.loc[start:]
    assert part.warmup_excluded == 0
    assert part.features.index.equals(expected.index)
    np.testing.assert_array_equal(part.features.to_numpy(), expected.to_numpy())


def test_one_bar_short_of_history_excludes_exactly_the_first_row() -> None:
    bars = _random_bars(250, seed=8)
    split = 200
    part = compute_features(bars.iloc[split - LOOKBACK_BARS + 1 :], start=bars.index[split])
    assert part.warmup_excluded == 1
    assert part.features.index[0] == bars.index[split + 1]


def test_each_feature_reads_exactly_its_declared_lookback() -> None:
    bars = _random_bars(300, seed=11)
    base = compute_features(bars).features
    # Perturb one bar late enough that every feature's reach lands on an output row.
    p = LOOKBACK_BARS + 2
    perturbed = bars.copy()
    perturbed.iloc[p] = perturbed.iloc[p] * np.array([1.01, 1.02, 1.005, 1.015, 1.0]) + np.array(
        [0.0, 0.0, 0.0, 0.0, 777.0]
    )
    changed = compute_features(perturbed).features
    for name, lookback in FEATURE_LOOKBACK.items():
        reach = bars.index[p + lookback]
        assert changed.loc[reach, name] != base.loc[reach, name], name
        after = bars.index[p + lookback + 1]
        np.testing.assert_array_equal(changed.loc[after:, name], base.loc[after:, name], name)


def test_warmup_counts() -> None:
    bars = _random_bars(200, seed=2)
    whole = compute_features(bars)
    assert whole.warmup_excluded == LOOKBACK_BARS
    assert len(whole.features) == 200 - LOOKBACK_BARS

    with_history = compute_features(bars, start=bars.index[150])
    assert with_history.warmup_excluded == 0
    assert len(with_history.features) == 50

    partly_warm = compute_features(bars, start=bars.index[100])
    assert partly_warm.warmup_excluded == LOOKBACK_BARS - 100
    assert partly_warm.features.index[0] == bars.index[LOOKBACK_BARS]

    between_bars = compute_features(bars, start=bars.index[150] + pd.Timedelta(minutes=1))
    assert between_bars.features.index[0] == bars.index[151]

    after_end = compute_features(bars, start=bars.index[-1] + pd.Timedelta(days=1))
    assert after_end.warmup_excluded == 0
    assert after_end.features.empty
    assert tuple(after_end.features.columns) == FEATURE_NAMES

    too_short = compute_features(bars.iloc[:50])
    assert too_short.warmup_excluded == 50
    assert too_short.features.empty
    assert str(too_short.features.index.tz) == "UTC"


def _flat_then_rise(prefix: list[Bar], flat_close: float) -> pd.DataFrame:
    bars = list(prefix)
    bars += [(flat_close, flat_close, flat_close, flat_close, 1000.0)] * 15
    close = flat_close
    for _ in range(10):
        opened, close = close, close * 1.01
        bars.append((opened, close, opened, close, 1000.0))
    return _frame(bars)


def test_flat_history_then_rise() -> None:
    prefix: list[Bar] = [(50.0, 50.0, 50.0, 50.0, 1000.0)] * 160
    bars = _flat_then_rise(prefix, 50.0)
    features = compute_features(bars).features
    assert np.isfinite(features.to_numpy()).all()

    flat = features.iloc[:-10]
    assert (flat["rsi_14"] == 50.0).all()
    assert (flat["return_zscore_20"] == 0.0).all()
    assert (flat["volume_zscore_20"] == 0.0).all()
    assert (flat["volume_ratio_20"] == 0.0).all()
    assert (flat["volatility_20"] == 0.0).all()
    assert (flat["volatility_ratio_5_20"] == 1.0).all()
    assert (flat["atr_ratio_14"] == 1.0).all()
    assert (flat["close_location"] == 0.5).all()
    assert (flat["bollinger_width_20"] == 0.0).all()
    assert (flat["macd_histogram"] == 0.0).all()

    rise = features.iloc[-10:]
    assert (rise["rsi_14"] == 100.0).all()
    first = rise.iloc[0]
    assert first["log_return_1"] == pytest.approx(math.log(1.01))
    # Out of nowhere: the z-score and true-range ratio hit their caps.
    assert first["return_zscore_20"] == Z_CAP
    assert first["atr_ratio_14"] == RATIO_CAP
    # std of (0, 0, 0, 0, r) over std of (0 x 19, r) is exactly 2.
    assert first["volatility_ratio_5_20"] == pytest.approx(2.0, rel=1e-12)
    assert first["close_location"] == 1.0


def test_noisy_history_then_flat_then_rise() -> None:
    noisy = _random_bars(150, seed=5)
    prefix = [tuple(row) for row in noisy.itertuples(index=False)]
    bars = _flat_then_rise(prefix, float(noisy["close"].iloc[-1]))
    features = compute_features(bars).features
    assert np.isfinite(features.to_numpy()).all()
    last_flat = features.iloc[-11]
    assert last_flat["rsi_14"] == 50.0
    assert last_flat["log_return_1"] == 0.0
    assert last_flat["range_pct"] == 0.0
    assert last_flat["close_location"] == 0.5
    assert (features["rsi_14"].iloc[-10:] == 100.0).all()


def test_alternating_zero_volume_bars() -> None:
    # Every other 15m bar trades nothing and leaves the price where it was.
    bars: list[Bar] = []
    close = 20.0
    for i in range(200):
        if i % 2:
            bars.append((close, close, close, close, 0.0))
        else:
            opened, close = close, close * (1.004 if i % 6 else 0.993)
            bars.append(
                (opened, max(opened, close) + 0.01, min(opened, close) - 0.01, close, 1000.0)
            )
    frame = _frame(bars)
    features = compute_features(frame).features
    assert np.isfinite(features.to_numpy()).all()

    # Each 20-bar window holds ten ln(1001) and ten 0: mean a/2, std (a/2)sqrt(20/19), so a bar
    # sits sqrt(19/20) standard deviations above (traded) or below (idle) the mean.
    idle = features[frame["volume"].reindex(features.index) == 0.0]
    traded = features[frame["volume"].reindex(features.index) > 0.0]
    assert len(idle) and len(traded)
    np.testing.assert_allclose(idle["volume_zscore_20"], -math.sqrt(19 / 20), rtol=1e-12)
    np.testing.assert_allclose(traded["volume_zscore_20"], math.sqrt(19 / 20), rtol=1e-12)
    # Mean volume over the window is 500.
    np.testing.assert_allclose(idle["volume_ratio_20"], -math.log(501), rtol=1e-12)
    np.testing.assert_allclose(traded["volume_ratio_20"], math.log(1001 / 501), rtol=1e-12)
    assert (idle["log_return_1"] == 0.0).all()
    assert (idle["range_pct"] == 0.0).all()
    assert (idle["close_location"] == 0.5).all()


def test_session_ending_in_a_zero_volume_bar() -> None:
    days = pd.bdate_range("2024-03-04", periods=8)
    timestamps = pd.DatetimeIndex(
        [day + pd.Timedelta(hours=14, minutes=30) + k * pd.Timedelta(minutes=15) for day in days
         for k in range(26)],
        tz="UTC",
    )  # fmt: skip
    bars: list[Bar] = []
    close = 40.0
    for i in range(len(timestamps)):
        if i % 26 == 25:
            bars.append((close, close, close, close, 0.0))
            continue
        opened, close = close, close * (1.002 if i % 3 else 0.997)
        volume = 1000.0 + 37.0 * ((7 * i) % 11)
        bars.append((opened, max(opened, close) + 0.02, min(opened, close) - 0.02, close, volume))
    frame = _frame(bars, timestamps)
    features = compute_features(frame).features
    assert np.isfinite(features.to_numpy()).all()

    v = frame["volume"].tolist()
    for t in range(LOOKBACK_BARS, len(frame)):
        if t % 26 not in (25, 0):
            continue
        expected = _reference_row(frame, t)
        row = features.loc[frame.index[t]]
        assert row["volume_ratio_20"] == pytest.approx(expected["volume_ratio_20"], rel=1e-12)
        if t % 26 == 25:
            # ln(1+V) varies by ~0.1 around 7, so a bar with no volume is ~70 standard
            # deviations below: capped. Its ratio is -ln(1 + mean V).
            assert row["volume_zscore_20"] == -Z_CAP
            assert row["volume_ratio_20"] == pytest.approx(
                -math.log(1 + statistics.mean(v[t - 20 : t])), rel=1e-12
            )
        else:
            # The next session's first bar sees the idle bar inside its window: a normal value.
            assert row["volume_zscore_20"] == pytest.approx(expected["volume_zscore_20"], rel=1e-9)
            assert 0.0 < row["volume_zscore_20"] < 1.0


@pytest.mark.parametrize("factor", [1000.0, 1e-3])
def test_scale_free(factor: float) -> None:
    bars = _random_bars(220, seed=4)
    scaled = bars.copy()
    scaled[["open", "high", "low", "close"]] *= factor
    np.testing.assert_allclose(
        compute_features(scaled).features.to_numpy(),
        compute_features(bars).features.to_numpy(),
        rtol=1e-9,
        atol=1e-9,
    )


def test_sub_micro_prices_match_the_same_series_times_1e9() -> None:
    tiny = _random_bars(220, seed=9, start_price=5e-7)
    assert tiny["close"].between(1e-7, 2e-6).all()
    big = tiny.copy()
    big[["open", "high", "low", "close"]] *= 1e9
    tiny_features = compute_features(tiny).features.to_numpy()
    assert np.isfinite(tiny_features).all()
    np.testing.assert_allclose(
        tiny_features, compute_features(big).features.to_numpy(), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize(
    ("column", "row", "value"),
    [
        ("close", 150, 0.0),
        ("open", 10, float("nan")),
        ("high", 199, float("inf")),
        ("low", 5, -1.0),
        ("volume", 42, -1.0),
        ("volume", 43, float("nan")),
    ],
)
def test_bad_values_raise_naming_the_timestamp(column: str, row: int, value: float) -> None:
    bars = _random_bars(200, seed=6)
    bars.iloc[row, bars.columns.get_loc(column)] = value
    with pytest.raises(ValueError, match=re.escape(bars.index[row].isoformat())):
        compute_features(bars)


def test_zero_volume_is_valid() -> None:
    bars = _random_bars(200, seed=6)
    bars["volume"] = 0.0
    features = compute_features(bars).features
    assert (features["volume_zscore_20"] == 0.0).all()
    assert (features["volume_ratio_20"] == 0.0).all()


def test_rejects_non_canonical_frames_and_naive_start() -> None:
    bars = _random_bars(200, seed=6)
    with pytest.raises(ValueError, match="canonical"):
        compute_features(bars.astype("float32"))
    with pytest.raises(ValueError, match="canonical"):
        compute_features(bars.tz_convert(None))
    with pytest.raises(ValueError, match="timezone-aware"):
        compute_features(bars, start=pd.Timestamp("2024-01-03 14:30"))
