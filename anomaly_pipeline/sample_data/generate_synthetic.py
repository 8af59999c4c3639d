"""Deterministic generator of the synthetic intraday sample bars and their planted anomalies.

Every ticker written here is invented (``SYN*``); none of the prices is real. Run
``python -m anomaly_pipeline.sample_data.generate_synthetic [--output-dir DIR]`` to rewrite the
files next to this module (or into ``DIR``). With the same numpy and exchange_calendars versions
the output is byte-identical on every run, which the tests check.

What is written, for each ticker in ``TICKERS``:

* ``<TICKER>_15m.csv``: 15-minute bars from 2025-01-01 to 2025-03-31 inclusive. Thai SET tickers
  only have bars inside the XBKK sessions of exchange_calendars (its open and close, and its
  break when the calendar defines one); crypto tickers have all 96 bars of every UTC day.
* ``<TICKER>_1h.csv``: those 15-minute bars aggregated into clock hours of the exchange's local
  time (first open, highest high, lowest low, last close, summed volume), stamped at the hour's
  start.
* ``planted_anomalies.csv``: every planted bar, at 15m and as the hour bar that contains it.

Prices are a geometric random walk. Each bar's "typical move" is ``sigma`` (the ticker's
annualised volatility scaled to one bar) times the intraday shape factor; the planted anomalies
are sized in multiples of it (see ``PLANTED``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import exchange_calendars as xcals
import numpy as np
import pandas as pd

SEED = 20250101
FIRST_DAY = pd.Timestamp("2025-01-01")
LAST_DAY = pd.Timestamp("2025-03-31")
BAR = pd.Timedelta(minutes=15)
SIGNIFICANT_DIGITS = 6
# Planted bars must leave detectors a clean history to warm up on.
WARM_UP_TRADING_DAYS = 10
COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# Random-walk shape. Returns are clipped so that no ordinary bar can rival a planted one.
RETURN_CLIP_SIGMAS = 4.0
# Each wick is |N(0, 1)| * WICK_SIGMAS * sigma beyond the body.
WICK_SIGMAS = 0.5
# Expected high-low range of an ordinary bar in sigmas: E|z| + 2 * WICK_SIGMAS * E|z|, with
# E|z| = sqrt(2 / pi) ~ 0.8. The range blowout is measured against it.
TYPICAL_RANGE_SIGMAS = 1.6
# SET sessions open away from the previous close; the gap is drawn in bar sigmas.
OVERNIGHT_GAP_SIGMAS = 3.0
# Log-volume noise is AR(1) so busy and quiet stretches cluster as in real tape.
VOLUME_NOISE_SD = 0.3
VOLUME_NOISE_PHI = 0.6
VOLUME_NOISE_CLIP_SDS = 3.0
# SET volume is highest at the open and the close: factor 1 at mid-session, 1 + U_SHAPE_DEPTH at
# either end. Volatility follows the square root of the same curve.
U_SHAPE_DEPTH = 2.0
SPIKE_VOLUME_FACTOR = 25.0
# A range blowout's close stays within this many sigmas of its open.
BLOWOUT_BODY_SIGMAS = 0.25


@dataclass(frozen=True)
class Market:
    name: str
    timezone: str
    # exchange_calendars code; None for markets that never close.
    calendar: str | None
    # Used only to turn annualised volatility into a per-bar sigma.
    bars_per_year: int
    # Board lot for share volume; 1 for volume quoted in currency.
    volume_lot: int


SET = Market("SET", "Asia/Bangkok", "XBKK", bars_per_year=244 * 26, volume_lot=100)
CRYPTO = Market("CRYPTO", "UTC", None, bars_per_year=365 * 96, volume_lot=1)


@dataclass(frozen=True)
class TickerSpec:
    ticker: str
    market: Market
    start_price: float
    annual_volatility: float
    # Mean volume of a mid-session bar: shares on SET, US dollars for crypto.
    bar_volume: float


TICKERS: tuple[TickerSpec, ...] = (
    TickerSpec("SYNA.BK", SET, 30.0, 0.28, 250_000),
    TickerSpec("SYNB.BK", SET, 150.0, 0.22, 60_000),
    TickerSpec("SYNC.BK", SET, 4.6, 0.45, 1_500_000),
    TickerSpec("SYNX-USD", CRYPTO, 60_000.0, 0.55, 25_000_000),
    TickerSpec("SYNY-USD", CRYPTO, 2.0, 0.85, 1_500_000),
    TickerSpec("SYNZ-USD", CRYPTO, 0.0005, 1.30, 120_000),
)


@dataclass(frozen=True)
class PlantedAnomaly:
    ticker: str
    # Start of the planted 15m bar in the exchange's local time.
    local_start: str
    kind: str
    # price_shock and volume_spike: the bar's log return in sigmas (signed).
    # range_blowout: the high-low range as a multiple of the typical range.
    size: float


PRICE_SHOCK = "price_shock"
VOLUME_SPIKE = "volume_spike"
RANGE_BLOWOUT = "range_blowout"

# Fixed, mid-session, spread over the period, one hour bar each, never in the warm-up days.
PLANTED: tuple[PlantedAnomaly, ...] = (
    PlantedAnomaly("SYNA.BK", "2025-01-28 11:15", PRICE_SHOCK, 10.0),
    PlantedAnomaly("SYNA.BK", "2025-02-19 14:45", VOLUME_SPIKE, 4.0),
    PlantedAnomaly("SYNA.BK", "2025-03-18 10:30", RANGE_BLOWOUT, 15.0),
    PlantedAnomaly("SYNB.BK", "2025-01-30 15:15", VOLUME_SPIKE, -4.0),
    PlantedAnomaly("SYNB.BK", "2025-02-25 11:30", RANGE_BLOWOUT, 15.0),
    PlantedAnomaly("SYNB.BK", "2025-03-12 13:45", PRICE_SHOCK, -12.0),
    PlantedAnomaly("SYNC.BK", "2025-02-04 14:45", RANGE_BLOWOUT, 15.0),
    PlantedAnomaly("SYNC.BK", "2025-02-27 10:45", PRICE_SHOCK, 14.0),
    PlantedAnomaly("SYNC.BK", "2025-03-25 15:30", VOLUME_SPIKE, 4.0),
    PlantedAnomaly("SYNX-USD", "2025-01-20 14:30", PRICE_SHOCK, -9.0),
    PlantedAnomaly("SYNX-USD", "2025-02-14 03:15", VOLUME_SPIKE, 4.0),
    PlantedAnomaly("SYNX-USD", "2025-03-09 21:45", RANGE_BLOWOUT, 15.0),
    PlantedAnomaly("SYNY-USD", "2025-01-26 08:00", VOLUME_SPIKE, -4.0),
    PlantedAnomaly("SYNY-USD", "2025-02-18 16:30", RANGE_BLOWOUT, 15.0),
    PlantedAnomaly("SYNY-USD", "2025-03-21 00:45", PRICE_SHOCK, 13.0),
    PlantedAnomaly("SYNZ-USD", "2025-01-31 23:45", RANGE_BLOWOUT, 15.0),
    PlantedAnomaly("SYNZ-USD", "2025-02-08 12:15", PRICE_SHOCK, -11.0),
    PlantedAnomaly("SYNZ-USD", "2025-03-15 06:30", VOLUME_SPIKE, 4.0),
)


@dataclass(frozen=True)
class BarGrid:
    """Where a ticker has bars: their UTC starts and their place within the trading day."""

    starts: pd.DatetimeIndex
    # 0 at the first bar of a session, 1 at its last; 0.5 throughout for 24/7 markets.
    session_position: np.ndarray
    # True on the first bar of every session after the first (where an overnight gap opens).
    opens_session: np.ndarray
    session_dates: pd.DatetimeIndex


@functools.cache
def bar_grid(market: Market) -> BarGrid:
    """15m bar starts from FIRST_DAY to LAST_DAY inclusive, within sessions where there are any."""
    if market.calendar is None:
        day_starts = pd.date_range(FIRST_DAY, LAST_DAY, freq="D", tz=market.timezone)
        starts = pd.date_range(
            day_starts[0], day_starts[-1] + pd.Timedelta(days=1), freq=BAR, inclusive="left"
        ).tz_convert("UTC")
        return BarGrid(
            starts=starts,
            session_position=np.full(len(starts), 0.5),
            opens_session=np.zeros(len(starts), dtype=bool),
            session_dates=day_starts.tz_localize(None),
        )

    # Explicit bounds keep the sessions independent of today's date.
    calendar = xcals.get_calendar(
        market.calendar,
        start=FIRST_DAY - pd.Timedelta(days=31),
        end=LAST_DAY + pd.Timedelta(days=31),
    )
    schedule = calendar.schedule.loc[FIRST_DAY:LAST_DAY]
    starts: list[pd.Timestamp] = []
    positions: list[float] = []
    opens: list[bool] = []
    for number, (_, row) in enumerate(schedule.iterrows()):
        session = pd.date_range(row["open"], row["close"], freq=BAR, inclusive="left")
        # The real SET pauses 12:30-14:30, but XBKK in exchange_calendars 4.13 has no break
        # times, so the bars run straight through: the pipeline decides whether a window should
        # hold bars from this same calendar, and a gap it cannot see would read as missing data.
        if pd.notna(row["break_start"]) and pd.notna(row["break_end"]):
            in_break = (session + BAR > row["break_start"]) & (session < row["break_end"])
            session = session[~in_break]
        starts.extend(session)
        positions.extend(np.linspace(0.0, 1.0, len(session)))
        opens.extend([number > 0] + [False] * (len(session) - 1))
    return BarGrid(
        starts=pd.DatetimeIndex(starts).tz_convert("UTC"),
        session_position=np.asarray(positions),
        opens_session=np.asarray(opens),
        session_dates=pd.DatetimeIndex(schedule.index),
    )


def significant(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """Round to ``digits`` significant digits via correctly rounded decimal conversion.

    Rounding is monotone, so OHLC ordering survives it.
    """
    return np.array([float(f"{value:.{digits}g}") for value in values])


def ar1_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stationary AR(1) noise with sd VOLUME_NOISE_SD, clipped to keep volumes plausible."""
    innovations = rng.standard_normal(size) * np.sqrt(1.0 - VOLUME_NOISE_PHI**2)
    noise = np.empty(size)
    level = rng.standard_normal()
    for index in range(size):
        level = VOLUME_NOISE_PHI * level + innovations[index]
        noise[index] = level
    return np.clip(noise, -VOLUME_NOISE_CLIP_SDS, VOLUME_NOISE_CLIP_SDS) * VOLUME_NOISE_SD


def planted_for(ticker: str) -> list[PlantedAnomaly]:
    return [anomaly for anomaly in PLANTED if anomaly.ticker == ticker]


def planted_start_utc(anomaly: PlantedAnomaly, market: Market) -> pd.Timestamp:
    return pd.Timestamp(anomaly.local_start, tz=market.timezone).tz_convert("UTC")


def hour_start_utc(starts: pd.DatetimeIndex, timezone: str) -> pd.DatetimeIndex:
    """The start of the local clock hour holding each bar, in UTC."""
    return starts.tz_convert(timezone).floor("h").tz_convert("UTC")


def generate_15m(spec: TickerSpec, index: int) -> pd.DataFrame:
    """The 15m bars of one ticker, with its planted anomalies, indexed by UTC start."""
    market = spec.market
    grid = bar_grid(market)
    size = len(grid.starts)
    # One stream per ticker, so adding a ticker leaves the others unchanged.
    rng = np.random.default_rng([SEED, index])

    sigma = spec.annual_volatility / np.sqrt(market.bars_per_year)
    if market.calendar is None:
        volume_shape = np.ones(size)
    else:
        volume_shape = 1.0 + U_SHAPE_DEPTH * (2.0 * grid.session_position - 1.0) ** 2
    bar_sigma = sigma * np.sqrt(volume_shape)

    # All random draws happen before any anomaly is planted so that the ordinary path does not
    # depend on the list of anomalies.
    z = np.clip(rng.standard_normal(size), -RETURN_CLIP_SIGMAS, RETURN_CLIP_SIGMAS)
    gap_z = np.clip(rng.standard_normal(size), -RETURN_CLIP_SIGMAS, RETURN_CLIP_SIGMAS)
    wick_up = np.abs(rng.standard_normal(size)) * WICK_SIGMAS * bar_sigma
    wick_down = np.abs(rng.standard_normal(size)) * WICK_SIGMAS * bar_sigma
    expected_volume = spec.bar_volume * volume_shape
    volume = expected_volume * np.exp(ar1_noise(rng, size))

    body = z * bar_sigma
    gap = np.where(grid.opens_session, gap_z * OVERNIGHT_GAP_SIGMAS * sigma, 0.0)

    for anomaly in planted_for(spec.ticker):
        start = planted_start_utc(anomaly, market)
        position = grid.starts.get_loc(start)
        if anomaly.kind == PRICE_SHOCK:
            # Later bars build on this close, so the new level persists.
            body[position] = anomaly.size * bar_sigma[position]
        elif anomaly.kind == VOLUME_SPIKE:
            body[position] = anomaly.size * bar_sigma[position]
            volume[position] = SPIKE_VOLUME_FACTOR * expected_volume[position]
        elif anomaly.kind == RANGE_BLOWOUT:
            body[position] = BLOWOUT_BODY_SIGMAS * np.sign(z[position]) * bar_sigma[position]
            span = anomaly.size * TYPICAL_RANGE_SIGMAS * bar_sigma[position]
            wick_up[position] = wick_down[position] = (span - abs(body[position])) / 2.0
        else:
            raise ValueError(f"{spec.ticker}: unknown anomaly kind {anomaly.kind!r}")

    log_close = np.log(spec.start_price) + np.cumsum(gap + body)
    log_open = log_close - body
    log_high = np.maximum(log_open, log_close) + wick_up
    log_low = np.minimum(log_open, log_close) - wick_down

    lot = market.volume_lot
    bars = pd.DataFrame(
        {
            "open": significant(np.exp(log_open)),
            "high": significant(np.exp(log_high)),
            "low": significant(np.exp(log_low)),
            "close": significant(np.exp(log_close)),
            # Whole lots (or whole dollars) keep hourly sums exact in float64.
            "volume": np.maximum(np.round(volume / lot), 1.0) * lot,
        },
        index=grid.starts.rename("timestamp"),
    )
    check_bars(spec.ticker, "15m", bars)
    return bars


def aggregate_hourly(bars: pd.DataFrame, timezone: str) -> pd.DataFrame:
    """Clock-hour bars in ``timezone`` from 15m bars, stamped at the hour's start (UTC)."""
    hours = hour_start_utc(pd.DatetimeIndex(bars.index), timezone).rename("timestamp")
    grouped = bars.groupby(hours, sort=True)
    return pd.DataFrame(
        {
            "open": grouped["open"].first(),
            "high": grouped["high"].max(),
            "low": grouped["low"].min(),
            "close": grouped["close"].last(),
            "volume": grouped["volume"].sum(),
        }
    )


def check_bars(ticker: str, interval: str, bars: pd.DataFrame) -> None:
    """Fail loudly rather than ship bars that break the canonical OHLC rules."""
    problems = []
    if not (bars.index.is_monotonic_increasing and bars.index.is_unique):
        problems.append("timestamps not strictly increasing")
    if (bars[["open", "high", "low", "close"]] <= 0).any().any():
        problems.append("non-positive price")
    if (bars["high"] < bars[["open", "close"]].max(axis=1)).any():
        problems.append("high below open or close")
    if (bars["low"] > bars[["open", "close"]].min(axis=1)).any():
        problems.append("low above open or close")
    if (bars["volume"] < 0).any():
        problems.append("negative volume")
    if problems:
        raise AssertionError(f"{ticker} {interval}: {', '.join(problems)}")


def validate_planted() -> None:
    """Planted bars must exist, sit after the warm-up days and not share an hour bar."""
    for spec in TICKERS:
        grid = bar_grid(spec.market)
        warm_up_end = grid.session_dates[WARM_UP_TRADING_DAYS]
        anomalies = planted_for(spec.ticker)
        if sorted(anomaly.kind for anomaly in anomalies) != sorted(
            (PRICE_SHOCK, RANGE_BLOWOUT, VOLUME_SPIKE)
        ):
            raise ValueError(f"{spec.ticker}: expected one planted anomaly of each kind")
        starts = [planted_start_utc(anomaly, spec.market) for anomaly in anomalies]
        for anomaly, start in zip(anomalies, starts, strict=True):
            if start not in grid.starts:
                raise ValueError(f"{spec.ticker}: {anomaly.local_start} is not a bar start")
            local_date = start.tz_convert(spec.market.timezone).tz_localize(None).normalize()
            if local_date < warm_up_end:
                raise ValueError(f"{spec.ticker}: {anomaly.local_start} is in the warm-up days")
        hours = hour_start_utc(pd.DatetimeIndex(starts), spec.market.timezone)
        if not hours.is_unique:
            raise ValueError(f"{spec.ticker}: two planted anomalies share an hour bar")


def format_price(value: float) -> str:
    """Shortest digits that parse back to ``value``, never in scientific notation."""
    # Prices carry SIGNIFICANT_DIGITS digits, so %g prints them exactly, minus trailing zeros.
    text = f"{value:.{SIGNIFICANT_DIGITS}g}"
    # %g switches to exponents below 1e-4; some readers and people trip over those.
    return np.format_float_positional(value, unique=True, trim="-") if "e" in text else text


def write_bars(bars: pd.DataFrame, path: Path) -> None:
    stamps = pd.DatetimeIndex(bars.index).strftime(STAMP_FORMAT)
    lines = [",".join(COLUMNS)]
    for stamp, row in zip(stamps, bars.itertuples(index=False), strict=True):
        prices = (format_price(price) for price in (row.open, row.high, row.low, row.close))
        lines.append(f"{stamp},{','.join(prices)},{int(row.volume)}")
    # newline="\n" keeps the bytes identical on every platform.
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("\n".join(lines) + "\n")


def planted_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for anomaly in PLANTED:
        market = next(spec.market for spec in TICKERS if spec.ticker == anomaly.ticker)
        start = planted_start_utc(anomaly, market)
        hour = hour_start_utc(pd.DatetimeIndex([start]), market.timezone)[0]
        rows.append((anomaly.ticker, "15m", start.strftime(STAMP_FORMAT), anomaly.kind))
        rows.append((anomaly.ticker, "1h", hour.strftime(STAMP_FORMAT), anomaly.kind))
    return sorted(rows)


def generate(output_dir: Path) -> list[Path]:
    """Write every generated file into ``output_dir``; returns the paths written."""
    validate_planted()
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, spec in enumerate(TICKERS):
        bars_15m = generate_15m(spec, index)
        bars_1h = aggregate_hourly(bars_15m, spec.market.timezone)
        check_bars(spec.ticker, "1h", bars_1h)
        for interval, bars in (("15m", bars_15m), ("1h", bars_1h)):
            path = output_dir / f"{spec.ticker}_{interval}.csv"
            write_bars(bars, path)
            written.append(path)
    planted_path = output_dir / "planted_anomalies.csv"
    with planted_path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("ticker,interval,timestamp,kind\n")
        handle.writelines(",".join(row) + "\n" for row in planted_rows())
    written.append(planted_path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory to write the CSV files into (default: next to this script)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.output_dir):
        print(path)


if __name__ == "__main__":
    main()
