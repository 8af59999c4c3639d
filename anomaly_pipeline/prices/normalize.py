"""Turn any bar frame yfinance returns, or a user exports, into the canonical bar frame.

``normalize_bars`` accepts the shapes yfinance 1.7 produces (two-level ``(Price, Ticker)``
columns in either level order, wide multi-ticker frames, ``Date``/``Datetime`` indexes in any
zone or none) and flat frames with a ``timestamp``/``date`` column, and repairs or rejects the
faults Yahoo data is known for. The rules, in the order they are applied:

* Price basis: the pipeline stores adjusted prices (yfinance's ``auto_adjust=True``). A frame
  with an ``Adj Close`` column is raw; it is put on the adjusted basis the way yfinance does it:
  open, high and low are scaled by ``Adj Close / Close``, close becomes ``Adj Close`` and volume
  is left as it is. A frame without ``Adj Close`` is taken to be adjusted already.
* Timestamps: tz-aware stamps are converted to UTC; naive stamps are read in ``naive_timezone``
  (default: the market's zone). Across the autumn DST change the repeated local hour is told
  apart by order (the wall clock stepping back marks the second pass); a naive stamp that never
  existed (inside the spring-forward gap) is an error, since any placement would be a guess.
  Daily bars are stamped at local midnight of their session date in the market's zone. A stamp
  at midnight in its own zone names its date directly; any other stamp is an instant whose
  date is taken in the market's zone.
* Invalid values: a negative or infinite price, a zero close next to real prices, or a negative
  volume raises ``PriceDataError``. Rows whose open, high, low and close are all missing or zero
  carry no bar and are dropped.
* Several rows for one timestamp (a session reported twice, a live row next to the official
  one, an all-NaN copy): one row is kept whole, never stitched from several: a complete row
  (all four prices positive) beats a row whose open/high/low are reported as 0, which beats a
  row with missing prices; among equals the highest volume wins (volume only grows while a bar
  forms, so it marks the latest snapshot), then the later row.
* After de-duplication, rows with a missing price are dropped, and so are rows whose open,
  high or low is 0 next to a real close (a bar the source has not filled in yet).
* A missing volume value becomes 0 (indices and FX report none); a missing volume column is an
  error. High and low that do not cover open
  and close are widened to the max and min of the four prices.

Every drop or repair is counted in ``NormalizedBars.notes``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_pipeline.prices.frames import PRICE_COLUMNS, PriceDataError, empty_bars
from anomaly_pipeline.universe import Market

_OHLC: tuple[str, ...] = ("open", "high", "low", "close")
# Header spellings (lower-cased, letters only) of the fields a bar frame may carry.
_FIELDS: dict[str, str] = {
    "open": "open",
    "high": "high",
    "low": "low",
    "close": "close",
    "adjclose": "adj_close",
    "adjustedclose": "adj_close",
    "volume": "volume",
}
# Timestamp column names, most specific first.
_TIME_FIELDS: tuple[str, ...] = ("timestamp", "datetime", "date", "time")
_TICKER_FIELDS: tuple[str, ...] = ("ticker", "symbol")
# High/low off by less than this fraction of the price is float noise from the adjustment
# factor; it is still snapped to the envelope, but not reported as a repair.
_NOISE = 1e-9
_OFFSET_SUFFIX = re.compile(r"(Z|[+-]\d{2}:?\d{2})$")

Fail = Callable[[str], PriceDataError]


@dataclass(frozen=True)
class NormalizedBars:
    """Canonical bars and a human-readable account of what was dropped or repaired."""

    bars: pd.DataFrame
    notes: tuple[str, ...] = ()


def _key(label: object) -> str:
    return re.sub(r"[^a-z]", "", str(label).lower())


# ---------------------------------------------------------------------------------------------
# Reading files


def read_bar_file(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet bar file into a raw frame that ``normalize_bars`` accepts.

    CSV files may carry the extra header rows pandas writes for yfinance frames: a ``Price`` row,
    a ``Ticker`` row and an optional row naming the index (``Date``/``Datetime``). Timestamps
    are returned unparsed as the index, so that ``normalize_bars`` sees each stamp's own offset.
    """
    path = Path(path)
    if path.suffix.lower() in {".parquet", ".pq"}:
        return pd.read_parquet(path)
    table = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    if table.empty:
        return pd.DataFrame()

    header_count = 0
    while header_count < len(table) and not _looks_like_data(table.iat[header_count, 0]):
        header_count += 1
    if header_count == 0:
        raise ValueError(f"{path}: no header row (the first row already holds data)")
    headers = [list(table.iloc[row]) for row in range(header_count)]
    # pandas writes the index name on a row of its own below multi-level headers.
    index_name: str | None = None
    levels = [headers[0]]
    for row in headers[1:]:
        if row[0].strip() and not any(cell.strip() for cell in row[1:]):
            index_name = row[0].strip()
        else:
            levels.append(row)

    labels: list[object] = list(levels[0]) if len(levels) == 1 else list(zip(*levels, strict=True))
    time_position = 0
    if index_name is None:
        for position, label in enumerate(labels):
            cells = label if isinstance(label, tuple) else (label,)
            if any(_key(cell) in _TIME_FIELDS for cell in cells):
                time_position = position
                index_name = next(c for c in cells if _key(c) in _TIME_FIELDS)
                break

    body = table.iloc[header_count:].reset_index(drop=True)
    columns: dict[object, pd.Series] = {}
    for position, label in enumerate(labels):
        if position == time_position:
            continue
        cells = label if isinstance(label, tuple) else (label,)
        values = body.iloc[:, position]
        if any(_key(cell) in _FIELDS for cell in cells):
            values = _numbers(values, path, label, header_count)
        columns[label] = values
    frame = pd.DataFrame(columns)
    if len(levels) > 1:
        frame.columns = pd.MultiIndex.from_tuples(list(columns))
    frame.index = pd.Index(body.iloc[:, time_position], name=index_name or "timestamp")
    return frame


def _looks_like_data(cell: str) -> bool:
    cell = cell.strip()
    # Dates and numbers always hold a digit; header words never do (and the date parser would
    # read some, such as "now", as dates).
    if not any(character.isdigit() for character in cell):
        return False
    try:
        float(cell)
        return True
    except ValueError:
        pass
    try:
        return pd.Timestamp(cell) is not pd.NaT
    except (ValueError, TypeError, OverflowError):
        return False


def _numbers(values: pd.Series, path: Path, label: object, header_count: int) -> pd.Series:
    numbers = pd.to_numeric(values.where(values != ""), errors="coerce")
    bad = numbers.isna() & (values != "")
    if bad.any():
        # Padded cells are numbers too; strip only when needed, it is slow on long files.
        text = values.str.strip()
        numbers = pd.to_numeric(text.where(text != ""), errors="coerce")
        bad = numbers.isna() & (text != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: line {header_count + row + 1}, column {label}: "
            f"{values.iloc[row]!r} is not a number"
        )
    return numbers.astype("float64")


# ---------------------------------------------------------------------------------------------
# Normalising


def select_ticker(raw: pd.DataFrame, ticker: str) -> pd.DataFrame:
    """The columns of ``raw`` that belong to ``ticker``, with single-level labels.

    Two-level frames are accepted with the price level on either side; flat long-format frames
    with a ticker/symbol column are filtered to this ticker's rows. Raises ``ValueError`` when
    the frame holds only other tickers or has an unusable layout.
    """
    if isinstance(raw.columns, pd.MultiIndex):
        if raw.columns.nlevels != 2:
            raise ValueError(
                f"expected one or two column levels (Price, Ticker), got {raw.columns.nlevels}"
            )
        scores = [
            sum(_key(value) in _FIELDS for value in set(raw.columns.get_level_values(level)))
            for level in (0, 1)
        ]
        if max(scores) == 0:
            raise ValueError("neither column level names prices (open, high, low, close)")
        price_level = int(np.argmax(scores))
        names = raw.columns.get_level_values(1 - price_level).astype(str).str.strip()
        # Blank ticker cells label frame-wide columns such as a Date column from reset_index().
        blank = np.asarray((names == "") | names.str.startswith("Unnamed:"), dtype=bool)
        mine = np.asarray(names.str.upper() == ticker.upper(), dtype=bool)
        if not mine.any() and len(raw) > 0:
            others = sorted(set(names[~blank]))
            raise ValueError(f"the frame holds no columns for {ticker}, only for {others}")
        selected = raw.loc[:, mine | blank]
        selected.columns = selected.columns.get_level_values(price_level)
        return selected

    ticker_columns = [column for column in raw.columns if _key(column) in _TICKER_FIELDS]
    if ticker_columns:
        names = raw[ticker_columns[0]].astype(str).str.strip().str.upper()
        mine = names == ticker.upper()
        if not mine.any() and len(raw) > 0:
            raise ValueError(f"the frame holds no rows for {ticker}, only for {sorted(set(names))}")
        return raw.loc[mine.to_numpy()].drop(columns=ticker_columns)
    return raw


def normalize_bars(
    raw: pd.DataFrame,
    *,
    ticker: str,
    interval: str,
    market: Market,
    window: str,
    naive_timezone: str | None = None,
) -> NormalizedBars:
    """Canonical bars for one ticker from ``raw``; see the module docstring for the rules.

    Raises ``PriceDataError`` (naming ticker, interval and window) when the frame cannot be
    turned into trustworthy bars. An empty frame gives empty bars; whether that is acceptable
    is the caller's decision.
    """

    def fail(reason: str) -> PriceDataError:
        return PriceDataError(ticker, interval, window, reason)

    if raw is None or len(raw) == 0:
        return NormalizedBars(empty_bars())
    try:
        frame = select_ticker(raw, ticker)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if len(frame) == 0:
        return NormalizedBars(empty_bars())

    stamp_values, frame = _split_timestamps(frame, fail)
    fields = _price_fields(frame, fail)
    notes: list[str] = []
    if "volume" not in fields:
        # A whole missing column is a different export, not a gap: filling it with zeros would
        # overwrite real stored volumes.
        raise fail("no volume column; export the bars with their volume")

    stamps = _parse_stamps(stamp_values, fail)
    local_zone = naive_timezone or market.timezone
    if interval == "1d":
        utc = _session_stamps(stamps, market.timezone, local_zone)
    else:
        utc = _instant_stamps(stamps, local_zone, fail)
    fields["timestamp"] = utc

    no_stamp = fields["timestamp"].isna()
    if no_stamp.any():
        notes.append(f"dropped {_rows(no_stamp.sum())} without a timestamp")
        fields = fields.loc[~no_stamp].reset_index(drop=True)

    _reject_invalid(fields, fail)
    notes.extend(_to_adjusted_basis(fields))
    fields, dedup_notes = _one_row_per_stamp(fields)
    notes.extend(dedup_notes)
    fields, drop_notes = _drop_unusable(fields)
    notes.extend(drop_notes)

    no_volume = fields["volume"].isna()
    if no_volume.any():
        notes.append(f"set missing volume to 0 on {_rows(no_volume.sum())}")
        fields.loc[no_volume, "volume"] = 0.0
    notes.extend(_widen_high_low(fields))

    index = pd.DatetimeIndex(fields["timestamp"], name="timestamp").tz_convert("UTC")
    bars = pd.DataFrame(
        {column: fields[column].to_numpy(dtype="float64") for column in PRICE_COLUMNS},
        index=index,
    ).sort_index()
    return NormalizedBars(bars, tuple(notes))


def _rows(count: int | np.integer) -> str:
    count = int(count)
    return f"{count} row" if count == 1 else f"{count} rows"


def _split_timestamps(frame: pd.DataFrame, fail: Fail) -> tuple[object, pd.DataFrame]:
    """The timestamp values (index or column) and the frame without a timestamp column."""
    if isinstance(frame.index, pd.DatetimeIndex):
        return frame.index, frame
    keys = {_key(column): column for column in reversed(list(frame.columns))}
    for name in _TIME_FIELDS:
        if name in keys:
            column = keys[name]
            return frame[column].reset_index(drop=True), frame.drop(columns=[column])
    if not isinstance(frame.index, pd.RangeIndex):
        return frame.index, frame
    raise fail(
        "no timestamps: expected a DatetimeIndex or a Date, Datetime or timestamp column; "
        f"found columns {list(frame.columns)}"
    )


def _price_fields(frame: pd.DataFrame, fail: Fail) -> pd.DataFrame:
    found: dict[str, object] = {}
    for column in frame.columns:
        field = _FIELDS.get(_key(column))
        if field is None:
            continue
        if field in found:
            raise fail(f"columns {found[field]!r} and {column!r} both hold {field}")
        found[field] = column
    missing = [field for field in _OHLC if field not in found]
    if missing:
        raise fail(f"missing column(s) {', '.join(missing)}; found {list(frame.columns)}")
    fields = pd.DataFrame(index=pd.RangeIndex(len(frame)))
    for field, column in found.items():
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values.dtype):
            fields[field] = values.to_numpy(dtype="float64")
            continue
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna() & values.notna() & (values.astype(str).str.strip() != "")
        if bad.any():
            example = values[bad].iloc[0]
            raise fail(f"column {column!r} holds {example!r}, which is not a number")
        fields[field] = numbers.to_numpy(dtype="float64")
    return fields


# ---------------------------------------------------------------------------------------------
# Timestamps


@dataclass(frozen=True)
class _Stamps:
    """Parsed stamps: each one's wall clock in its own zone, and its UTC instant if tz-aware."""

    wall: pd.DatetimeIndex
    aware: np.ndarray
    utc: pd.DatetimeIndex

    @classmethod
    def from_index(cls, index: pd.DatetimeIndex) -> _Stamps:
        index = index.as_unit("ns")
        if index.tz is None:
            empty = pd.DatetimeIndex(np.full(len(index), np.datetime64("NaT", "ns")), tz="UTC")
            return cls(index, np.zeros(len(index), dtype=bool), empty)
        return cls(index.tz_localize(None), np.asarray(index.notna()), index.tz_convert("UTC"))


def _parse_stamps(values: object, fail: Fail) -> _Stamps:
    if isinstance(values, pd.DatetimeIndex):
        return _Stamps.from_index(values)
    series = pd.Series(np.asarray(values, dtype=object) if not hasattr(values, "dtype") else values)
    series = series.reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        return _Stamps.from_index(pd.DatetimeIndex(series))
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series):
        # Epoch numbers; millisecond epochs are three orders of magnitude larger. Small
        # integers are a row number, not a time.
        numbers = series.astype("float64")
        if not numbers.abs().max() > 1e8:
            raise fail("no timestamps: the index holds small numbers, not epoch times")
        unit = "ms" if numbers.abs().max() > 1e11 else "s"
        return _Stamps.from_index(pd.DatetimeIndex(pd.to_datetime(numbers, unit=unit, utc=True)))

    present = series.dropna()
    if present.map(lambda value: isinstance(value, str)).all():
        return _parse_text_stamps(series.fillna("").astype(str).str.strip(), fail)
    parsed = [_one_stamp(value, fail) for value in series]
    return _from_timestamps(parsed)


def _parse_text_stamps(text: pd.Series, fail: Fail) -> _Stamps:
    # Strings with different UTC offsets (a file spanning a DST change) cannot be parsed in one
    # vectorised call without pandas forcing one offset on all, so parse each offset separately.
    suffixes = text.str.extract(_OFFSET_SUFFIX, expand=False).fillna("").to_numpy()
    count = len(text)
    wall = np.full(count, np.iinfo(np.int64).min, dtype=np.int64)  # NaT
    utc = wall.copy()
    aware = np.zeros(count, dtype=bool)
    for suffix in pd.unique(suffixes):
        rows = np.flatnonzero(suffixes == suffix)
        subset = text.iloc[rows]
        try:
            parsed = _Stamps.from_index(
                pd.DatetimeIndex(pd.to_datetime(subset.where(subset != ""), format="ISO8601"))
            )
        except (ValueError, TypeError):
            parsed = _from_timestamps([_one_stamp(value, fail) for value in subset])
        wall[rows] = parsed.wall.asi8
        utc[rows] = parsed.utc.asi8
        aware[rows] = parsed.aware
    return _Stamps(
        pd.DatetimeIndex(pd.to_datetime(wall, unit="ns")),
        aware,
        pd.DatetimeIndex(pd.to_datetime(utc, unit="ns", utc=True)),
    )


def _one_stamp(value: object, fail: Fail) -> pd.Timestamp:
    if value is None or (isinstance(value, str) and not value.strip()):
        return pd.NaT
    if isinstance(value, float) and np.isnan(value):
        return pd.NaT
    try:
        return pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError):
        raise fail(f"cannot read {value!r} as a timestamp") from None


def _from_timestamps(stamps: list[pd.Timestamp]) -> _Stamps:
    wall, utc, aware = [], [], []
    for stamp in stamps:
        if stamp is pd.NaT or pd.isna(stamp):
            wall.append(pd.NaT)
            utc.append(pd.NaT)
            aware.append(False)
        elif stamp.tzinfo is None:
            wall.append(stamp)
            utc.append(pd.NaT)
            aware.append(False)
        else:
            wall.append(stamp.tz_localize(None))
            utc.append(stamp.tz_convert("UTC"))
            aware.append(True)
    return _Stamps(
        pd.DatetimeIndex(wall).as_unit("ns"),
        np.array(aware, dtype=bool),
        pd.DatetimeIndex(utc, tz="UTC").as_unit("ns"),
    )


def _with_replaced(base: pd.DatetimeIndex, mask: np.ndarray, values: pd.DatetimeIndex):
    """``base`` (UTC) with the positions in ``mask`` replaced by ``values`` (UTC)."""
    out = base.as_unit("ns").asi8.copy()
    out[mask] = values.tz_convert("UTC").as_unit("ns").asi8
    return pd.DatetimeIndex(pd.to_datetime(out, unit="ns", utc=True))


def _instant_stamps(stamps: _Stamps, naive_zone: str, fail: Fail) -> pd.DatetimeIndex:
    naive = ~stamps.aware & np.asarray(stamps.wall.notna())
    if not naive.any():
        return stamps.utc
    return _with_replaced(stamps.utc, naive, _localize(stamps.wall[naive], naive_zone, fail))


def _localize(wall: pd.DatetimeIndex, zone: str, fail: Fail) -> pd.DatetimeIndex:
    """Naive wall-clock stamps read in ``zone``, as UTC, resolving DST by order."""
    count = len(wall)
    first = wall.tz_localize(zone, ambiguous=np.ones(count, dtype=bool), nonexistent="NaT")
    second = wall.tz_localize(zone, ambiguous=np.zeros(count, dtype=bool), nonexistent="NaT")
    gap = np.asarray(first.isna())
    if gap.any():
        stamp = wall[gap][0]
        raise fail(
            f"local time {stamp} does not exist in {zone} (the clocks sprang forward over it); "
            "placing it on a neighbouring hour would be a guess"
        )
    ambiguous = first.asi8 != second.asi8
    if not ambiguous.any():
        return first.tz_convert("UTC")
    second_pass = _second_pass(wall, ambiguous, zone, fail)
    chosen = np.where(second_pass, second.asi8, first.asi8)
    return pd.DatetimeIndex(pd.to_datetime(chosen, unit="ns", utc=True))


def _second_pass(
    wall: pd.DatetimeIndex, ambiguous: np.ndarray, zone: str, fail: Fail
) -> np.ndarray:
    """Which ambiguous stamps fall in the repeated hour's second pass (after clocks went back).

    Walking the stamps in time order, the wall clock stepping back (or repeating) inside the
    repeated hour marks the second pass. Files listed newest first are walked in reverse.
    """
    ticks = wall.asi8
    steps = np.diff(ticks)
    newest_first = (steps < 0).sum() > (steps > 0).sum()
    positions = np.flatnonzero(ambiguous)
    if newest_first:
        positions = positions[::-1]
    second = np.zeros(len(wall), dtype=bool)
    # One autumn change per day at most, so the calendar day identifies the transition.
    state: dict[object, tuple[int, bool]] = {}
    for position in positions:
        day = wall[position].date()
        previous, switched = state.get(day, (None, False))
        if previous is not None and ticks[position] <= previous:
            switched = True
        second[position] = switched
        state[day] = (ticks[position], switched)
    for day, (_, switched) in state.items():
        if not switched:
            stamp = wall[ambiguous & (wall.date == day)][0]
            raise fail(
                f"local time {stamp} occurs twice in {zone} (the clocks went back) and the "
                "bars do not repeat the hour, so it cannot be told which occurrence is meant"
            )
    return second


def _session_stamps(stamps: _Stamps, market_zone: str, naive_zone: str) -> pd.DatetimeIndex:
    """Daily bars: local midnight of each bar's session date in the market zone, as UTC."""
    wall = stamps.wall
    valid = np.asarray(wall.notna())
    at_midnight = valid & np.asarray(wall == wall.normalize())
    dates = np.full(len(wall), np.datetime64("NaT", "ns"))
    dates[at_midnight] = wall[at_midnight].normalize().asi8.astype("datetime64[ns]")

    other = valid & ~at_midnight
    if other.any():
        instants = stamps.utc
        naive_other = other & ~stamps.aware
        if naive_other.any():
            # Only the date matters here, so DST ambiguity an hour either side is harmless.
            localized = wall[naive_other].tz_localize(
                naive_zone, ambiguous=True, nonexistent="shift_forward"
            )
            instants = _with_replaced(instants, naive_other, localized)
        local = instants[other].tz_convert(market_zone).tz_localize(None).normalize()
        dates[other] = local.asi8.astype("datetime64[ns]")

    sessions = pd.DatetimeIndex(dates)
    # Midnight can be skipped or repeated by DST in a few zones; yfinance takes the later
    # skipped moment and the first repeated one, and so do we.
    return sessions.tz_localize(
        market_zone, ambiguous=np.ones(len(sessions), dtype=bool), nonexistent="shift_forward"
    ).tz_convert("UTC")


# ---------------------------------------------------------------------------------------------
# Values


def _reject_invalid(fields: pd.DataFrame, fail: Fail) -> None:
    price_columns = [c for c in (*_OHLC, "adj_close") if c in fields]
    prices = fields[price_columns]
    bad = (prices < 0) | np.isinf(prices)
    if bad.to_numpy().any():
        row, column = _first(bad)
        raise fail(f"{column} is {prices.at[row, column]} at {_when(fields, row)}")
    ohlc = fields[list(_OHLC)]
    no_prices = (ohlc.isna() | (ohlc == 0)).all(axis=1)
    zero_close = (fields["close"] == 0) & ~no_prices
    if "adj_close" in fields:
        zero_close |= (fields["adj_close"] == 0) & (fields["close"] > 0)
    if zero_close.any():
        row = int(np.flatnonzero(zero_close.to_numpy())[0])
        raise fail(f"close is 0 next to non-zero prices at {_when(fields, row)}")
    volume = fields["volume"]
    bad_volume = (volume < 0) | np.isinf(volume)
    if bad_volume.any():
        row = int(np.flatnonzero(bad_volume.to_numpy())[0])
        raise fail(f"volume is {volume.iat[row]} at {_when(fields, row)}")


def _first(mask: pd.DataFrame) -> tuple[int, str]:
    rows, columns = np.nonzero(mask.to_numpy())
    return int(mask.index[rows[0]]), str(mask.columns[columns[0]])


def _when(fields: pd.DataFrame, row: int) -> str:
    return pd.Timestamp(fields.at[row, "timestamp"]).isoformat()


def _to_adjusted_basis(fields: pd.DataFrame) -> list[str]:
    """Scale raw prices onto the adjusted basis in place, as yfinance's auto_adjust does."""
    if "adj_close" not in fields:
        return []
    close, adjusted = fields["close"], fields.pop("adj_close")
    usable = (close > 0) & adjusted.notna()
    ratio = (adjusted / close).where(usable)
    for column in ("open", "high", "low"):
        fields[column] = fields[column] * ratio
    fields["close"] = adjusted.where(usable)
    # Rows with a raw close but no adjusted close cannot be put on the adjusted basis.
    fields["no_adjusted_close"] = (close > 0) & adjusted.isna()
    return [f"converted {_rows(usable.sum())} from raw to adjusted prices (factor Adj Close/Close)"]


def _quality(fields: pd.DataFrame) -> pd.Series:
    """2: all four prices positive; 1: open/high/low reported as 0 beside a close; 0: missing."""
    ohlc = fields[list(_OHLC)]
    complete = (ohlc > 0).all(axis=1)
    unfilled = (fields["close"] > 0) & ohlc.notna().all(axis=1) & ~complete
    return pd.Series(np.where(complete, 2, np.where(unfilled, 1, 0)), index=fields.index)


def _one_row_per_stamp(fields: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    duplicated = fields["timestamp"].duplicated(keep=False)
    if not duplicated.any():
        return fields, []
    ranked = fields.assign(
        _quality=_quality(fields),
        _volume=fields["volume"].fillna(-1.0),
        _position=np.arange(len(fields)),
    )
    ranked = ranked.sort_values(["timestamp", "_quality", "_volume", "_position"])
    kept = ranked.drop_duplicates("timestamp", keep="last").sort_values("_position")
    stamps = fields.loc[duplicated, "timestamp"].nunique()
    dropped = len(fields) - len(kept)
    note = (
        f"dropped {_rows(dropped)} repeating {stamps} timestamp(s); kept per timestamp the "
        "complete row with the highest volume"
    )
    kept = kept.drop(columns=["_quality", "_volume", "_position"]).reset_index(drop=True)
    return kept, [note]


def _drop_unusable(fields: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    notes: list[str] = []
    quality = _quality(fields)
    no_adjusted = fields.pop("no_adjusted_close") if "no_adjusted_close" in fields else None
    ohlc = fields[list(_OHLC)]
    missing = quality == 0
    if no_adjusted is not None:
        lost_basis = missing & no_adjusted
        if lost_basis.any():
            notes.append(f"dropped {_rows(lost_basis.sum())} with a close but no Adj Close")
        missing &= ~no_adjusted
    empty = missing & (ohlc.isna() | (ohlc == 0)).all(axis=1)
    if empty.any():
        notes.append(f"dropped {_rows(empty.sum())} with no prices (open/high/low/close missing)")
    partial = missing & ~empty
    if partial.any():
        notes.append(f"dropped {_rows(partial.sum())} with some of open/high/low/close missing")
    unfilled = quality == 1
    if unfilled.any():
        notes.append(
            f"dropped {_rows(unfilled.sum())} whose open/high/low were 0 beside a real close "
            "(a bar the source had not filled in)"
        )
    return fields.loc[quality == 2].reset_index(drop=True), notes


def _widen_high_low(fields: pd.DataFrame) -> list[str]:
    if fields.empty:
        return []
    prices = fields[list(_OHLC)]
    top, bottom = prices.max(axis=1), prices.min(axis=1)
    tolerance = top * _NOISE
    repaired = ((top - fields["high"]) > tolerance) | ((fields["low"] - bottom) > tolerance)
    fields["high"], fields["low"] = top, bottom
    if not repaired.any():
        return []
    return [f"widened high/low to cover open and close on {_rows(repaired.sum())}"]
