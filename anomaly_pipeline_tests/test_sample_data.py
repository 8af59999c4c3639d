"""The shipped sample data: real MSFT daily bars and generated SET and crypto intraday bars.

Known values of the MSFT file come from pmdarima 2.1.1's bundled dataset; the generated files
are checked against exchange_calendars, against their own 15m bars and against a fresh run of
the generator.
"""

from __future__ import annotations

from pathlib import Path

import exchange_calendars as xcals
import numpy as np
import pandas as pd
import pytest

from anomaly_pipeline.prices.frames import PRICE_COLUMNS, is_canonical
from anomaly_pipeline.sample_data import generate_synthetic

SAMPLE_DIR = Path(generate_synthetic.__file__).resolve().parent
STAMP_PATTERN = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"
SET_TICKERS = ("SYNA.BK", "SYNB.BK", "SYNC.BK")
CRYPTO_TICKERS = ("SYNX-USD", "SYNY-USD", "SYNZ-USD")
TIMEZONES = {**dict.fromkeys(SET_TICKERS, "Asia/Bangkok"), **dict.fromkeys(CRYPTO_TICKERS, "UTC")}
FIFTEEN_MINUTES = pd.Timedelta(minutes=15)


def read_bars(path: Path) -> pd.DataFrame:
    """A sample CSV as a canonical bar frame, after checking the raw timestamp text."""
    raw = pd.read_csv(path, dtype={"timestamp": str})
    assert list(raw.columns) == ["timestamp", *PRICE_COLUMNS]
    assert raw["timestamp"].str.fullmatch(STAMP_PATTERN).all()
    index = pd.DatetimeIndex(pd.to_datetime(raw["timestamp"], utc=True), name="timestamp")
    bars = raw[list(PRICE_COLUMNS)].astype("float64").set_index(index)
    assert is_canonical(bars)
    return bars


def assert_ohlc_consistent(bars: pd.DataFrame) -> None:
    assert (bars[["open", "high", "low", "close"]] > 0).all().all()
    assert (bars["high"] >= bars[["open", "close"]].max(axis=1)).all()
    assert (bars["low"] <= bars[["open", "close"]].min(axis=1)).all()
    assert (bars["volume"] >= 0).all()


@pytest.fixture(scope="module")
def xbkk() -> xcals.ExchangeCalendar:
    return xcals.get_calendar("XBKK", start="2024-12-01", end="2025-04-30")


@pytest.fixture(scope="module")
def planted() -> pd.DataFrame:
    return pd.read_csv(SAMPLE_DIR / "planted_anomalies.csv", dtype=str)


def test_msft_daily_matches_pmdarima() -> None:
    bars = read_bars(SAMPLE_DIR / "MSFT_1d.csv")
    assert len(bars) == 7983
    first, last = bars.iloc[0], bars.iloc[-1]
    assert bars.index[0] == pd.Timestamp("1986-03-13T05:00:00Z")
    assert bars.index[-1] == pd.Timestamp("2017-11-10T05:00:00Z")
    assert first.tolist() == [0.0672, 0.07533, 0.0672, 0.07533, 1371330506.0]
    assert last.tolist() == [83.79, 84.095, 83.23, 83.87, 19396301.0]
    # Every stamp is the session date's midnight in New York, whether EST or EDT applied.
    local = bars.index.tz_convert("America/New_York")
    assert (local == local.normalize()).all()
    assert_ohlc_consistent(bars)


def test_msft_quirks_are_kept_not_repaired() -> None:
    bars = read_bars(SAMPLE_DIR / "MSFT_1d.csv")
    zero_volume = bars.index[bars["volume"] == 0]
    assert list(zero_volume) == [pd.Timestamp("2010-04-26T04:00:00Z")]
    # The source's binary-float artefacts survive verbatim.
    text = (SAMPLE_DIR / "MSFT_1d.csv").read_text(encoding="utf-8")
    assert "1986-04-25T05:00:00Z,0.08388999999999999," in text


@pytest.mark.parametrize("ticker", SET_TICKERS)
def test_set_bars_lie_inside_xbkk_sessions(ticker: str, xbkk: xcals.ExchangeCalendar) -> None:
    bars = read_bars(SAMPLE_DIR / f"{ticker}_15m.csv")
    schedule = xbkk.schedule.loc["2025-01-01":"2025-03-31"]
    session_dates = bars.index.tz_convert("Asia/Bangkok").tz_localize(None).normalize()
    # Weekends and SET holidays (New Year's Day, Makha Bucha) hold no bars.
    assert set(session_dates) == set(schedule.index)
    assert (session_dates.dayofweek < 5).all()
    assert not {pd.Timestamp("2025-01-01"), pd.Timestamp("2025-02-12")} & set(session_dates)

    rows = schedule.loc[session_dates].set_axis(bars.index)
    starts = bars.index.to_series()
    ends = starts + FIFTEEN_MINUTES
    assert (starts >= rows["open"]).all()
    assert (ends <= rows["close"]).all()
    in_break = (ends > rows["break_start"]) & (starts < rows["break_end"])
    assert not in_break.any()
    # Every 15m slot of every session is filled.
    per_session = pd.Series(1, index=session_dates).groupby(level=0).sum()
    trading_time = schedule["close"] - schedule["open"]
    trading_time -= (schedule["break_end"] - schedule["break_start"]).fillna(pd.Timedelta(0))
    assert (per_session == trading_time / FIFTEEN_MINUTES).all()
    assert (bars.index.minute % 15 == 0).all()


@pytest.mark.parametrize("ticker", CRYPTO_TICKERS)
def test_crypto_has_every_quarter_hour(ticker: str) -> None:
    bars = read_bars(SAMPLE_DIR / f"{ticker}_15m.csv")
    per_day = bars.groupby(bars.index.normalize()).size()
    assert len(per_day) == 90
    assert (per_day == 96).all()
    expected = pd.date_range("2025-01-01", "2025-04-01", freq="15min", tz="UTC", inclusive="left")
    assert bars.index.equals(expected)


@pytest.mark.parametrize("ticker", SET_TICKERS + CRYPTO_TICKERS)
def test_hourly_is_the_exact_aggregation_of_15m(ticker: str) -> None:
    bars_15m = read_bars(SAMPLE_DIR / f"{ticker}_15m.csv")
    bars_1h = read_bars(SAMPLE_DIR / f"{ticker}_1h.csv")
    assert_ohlc_consistent(bars_15m)
    assert_ohlc_consistent(bars_1h)
    local = bars_15m.index.tz_convert(TIMEZONES[ticker])
    hours = pd.DatetimeIndex(local.floor("h").tz_convert("UTC"), name="timestamp")
    grouped = bars_15m.groupby(hours)
    expected = pd.DataFrame(
        {
            "open": grouped["open"].first(),
            "high": grouped["high"].max(),
            "low": grouped["low"].min(),
            "close": grouped["close"].last(),
            "volume": grouped["volume"].sum(),
        }
    )
    pd.testing.assert_frame_equal(bars_1h, expected, check_exact=True, check_freq=False)


def test_planted_anomalies_are_listed_for_both_intervals(planted: pd.DataFrame) -> None:
    assert list(planted.columns) == ["ticker", "interval", "timestamp", "kind"]
    assert planted["timestamp"].str.fullmatch(STAMP_PATTERN).all()
    kinds = {"price_shock", "volume_spike", "range_blowout"}
    for ticker in SET_TICKERS + CRYPTO_TICKERS:
        for interval in ("15m", "1h"):
            rows = planted[(planted["ticker"] == ticker) & (planted["interval"] == interval)]
            assert sorted(rows["kind"]) == sorted(kinds), (ticker, interval)
        fine = planted[(planted["ticker"] == ticker) & (planted["interval"] == "15m")]
        coarse = planted[(planted["ticker"] == ticker) & (planted["interval"] == "1h")]
        for kind in kinds:
            start = pd.Timestamp(fine.loc[fine["kind"] == kind, "timestamp"].item())
            hour = pd.Timestamp(coarse.loc[coarse["kind"] == kind, "timestamp"].item())
            local_hour = start.tz_convert(TIMEZONES[ticker]).floor("h")
            assert hour == local_hour.tz_convert("UTC")


@pytest.mark.parametrize("interval", ["15m", "1h"])
@pytest.mark.parametrize("ticker", SET_TICKERS + CRYPTO_TICKERS)
def test_planted_bars_exist_and_stand_out(
    ticker: str, interval: str, planted: pd.DataFrame
) -> None:
    bars = read_bars(SAMPLE_DIR / f"{ticker}_{interval}.csv")
    rows = planted[(planted["ticker"] == ticker) & (planted["interval"] == interval)]
    stamps = {row.kind: pd.Timestamp(row.timestamp) for row in rows.itertuples()}
    assert set(stamps.values()) <= set(bars.index)
    # Detectors need a clean warm-up: nothing is planted in the first 10 trading days.
    eleventh_day = np.unique(bars.index.tz_convert(TIMEZONES[ticker]).date)[10]
    for stamp in stamps.values():
        assert stamp.tz_convert(TIMEZONES[ticker]).date() >= eleventh_day
    # Each planted bar is the most extreme bar of the file on the measure its kind targets.
    body = np.log(bars["close"] / bars["open"]).abs()
    price_range = np.log(bars["high"] / bars["low"])
    assert body.idxmax() == stamps["price_shock"]
    assert bars["volume"].idxmax() == stamps["volume_spike"]
    assert price_range.idxmax() == stamps["range_blowout"]


def test_generator_reproduces_the_shipped_files(tmp_path: Path) -> None:
    written = generate_synthetic.generate(tmp_path)
    names = sorted(path.name for path in written)
    expected_names = sorted(
        [f"{ticker}_{interval}.csv" for ticker in TIMEZONES for interval in ("15m", "1h")]
        + ["planted_anomalies.csv"]
    )
    assert names == expected_names
    for name in names:
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name
