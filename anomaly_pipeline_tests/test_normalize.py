"""normalize_bars and read_bar_file: every frame shape yfinance 1.7 returns and Yahoo's faults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from yfinance.utils import auto_adjust

from anomaly_pipeline.prices.frames import PRICE_COLUMNS, PriceDataError, is_canonical
from anomaly_pipeline.prices.normalize import NormalizedBars, normalize_bars, read_bar_file
from anomaly_pipeline.universe import Market

US = Market(
    name="US",
    timezone="America/New_York",
    calendar="XNYS",
    intervals=("1d", "1h", "15m"),
    tickers=("AAPL",),
)
SET = Market(
    name="SET",
    timezone="Asia/Bangkok",
    calendar="XBKK",
    intervals=("1d", "1h", "15m"),
    tickers=("PTT.BK",),
)
CRYPTO = Market(
    name="CRYPTO",
    timezone="UTC",
    calendar=None,
    intervals=("1d", "1h", "15m"),
    tickers=("BTC-USD",),
)
WINDOW = "partition 2024-03"
YF_COLUMNS = ["Close", "High", "Low", "Open", "Volume"]  # yfinance sorts the Price level


def normalize(
    raw: pd.DataFrame,
    interval: str = "1d",
    market: Market = US,
    ticker: str = "AAPL",
    naive_timezone: str | None = None,
) -> NormalizedBars:
    result = normalize_bars(
        raw,
        ticker=ticker,
        interval=interval,
        market=market,
        window=WINDOW,
        naive_timezone=naive_timezone,
    )
    assert is_canonical(result.bars)
    return result


def expected(rows: list[tuple[str, float, float, float, float, float]]) -> pd.DataFrame:
    index = pd.DatetimeIndex([pd.Timestamp(row[0], tz="UTC") for row in rows], name="timestamp")
    return pd.DataFrame([row[1:] for row in rows], index=index, columns=list(PRICE_COLUMNS))


def flat(stamps: list, rows: list[tuple], columns: list[str] | None = None, name="Date"):
    """A flat yfinance-style frame: rows are (open, high, low, close, volume) unless told."""
    columns = columns or ["Open", "High", "Low", "Close", "Volume"]
    index = stamps if isinstance(stamps, pd.DatetimeIndex) else pd.DatetimeIndex(stamps)
    return pd.DataFrame(rows, index=index.rename(name), columns=columns, dtype="float64")


def yf_download_frame(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The frame yf.download(group_by='column') returns: (Price, Ticker) columns, union index."""
    joined = pd.concat(frames, axis=1, sort=True, names=["Ticker", "Price"])
    joined.columns = joined.columns.swaplevel(0, 1)
    return joined.sort_index(level=0, axis=1)


def raise_message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message.startswith(f"AAPL 1d {WINDOW}: ") or message.startswith(f"AAPL 1h {WINDOW}: ")
    return message


# The bars of two New York sessions, as yfinance returns them by default (auto_adjust=True).
NY_DAYS = pd.DatetimeIndex(["2024-03-04", "2024-03-05"]).tz_localize("America/New_York")
NY_ROWS = [(100.0, 102.0, 99.0, 101.0, 1000.0), (101.0, 103.0, 100.0, 102.0, 2000.0)]
NY_EXPECTED = expected(
    [
        ("2024-03-04 05:00", 100.0, 102.0, 99.0, 101.0, 1000.0),
        ("2024-03-05 05:00", 101.0, 103.0, 100.0, 102.0, 2000.0),
    ]
)


# Case 1: column layouts ----------------------------------------------------------------------


def _price_ticker() -> pd.DataFrame:
    return yf_download_frame({"AAPL": flat(NY_DAYS, NY_ROWS)})


def _ticker_price() -> pd.DataFrame:
    frame = _price_ticker()
    frame.columns = frame.columns.swaplevel(0, 1)
    return frame


def _wide() -> pd.DataFrame:
    other = flat(NY_DAYS, [(1.0, 2.0, 0.5, 1.5, 9.0), (1.5, 2.5, 1.0, 2.0, 9.0)])
    return yf_download_frame({"MSFT": other, "AAPL": flat(NY_DAYS, NY_ROWS), "IBM": other})


def _lower_case_timestamp_column() -> pd.DataFrame:
    frame = flat(NY_DAYS, NY_ROWS, columns=["open", "high", "low", "close", "volume"])
    return frame.rename_axis("timestamp").reset_index()


def _datetime_column_upper() -> pd.DataFrame:
    frame = flat(NY_DAYS, NY_ROWS, columns=["OPEN", "HIGH", "LOW", "CLOSE", "VOLUME"])
    return frame.rename_axis("Datetime").reset_index()


def _epoch_seconds_column() -> pd.DataFrame:
    frame = flat(NY_DAYS, NY_ROWS).reset_index(drop=True)
    return frame.assign(timestamp=NY_DAYS.asi8 // 10**9)


def _long_format() -> pd.DataFrame:
    mine = flat(NY_DAYS, NY_ROWS).reset_index().assign(Ticker="AAPL")
    other = flat(NY_DAYS, [(1.0, 1.0, 1.0, 1.0, 1.0)] * 2).reset_index().assign(Ticker="MSFT")
    return pd.concat([other, mine], ignore_index=True)


@pytest.mark.parametrize(
    "build",
    [
        _price_ticker,
        _ticker_price,
        _wide,
        _lower_case_timestamp_column,
        _datetime_column_upper,
        _epoch_seconds_column,
        _long_format,
    ],
)
def test_every_column_layout_gives_the_same_bars(build) -> None:
    result = normalize(build())
    pd.testing.assert_frame_equal(result.bars, NY_EXPECTED)
    assert result.notes == ()


def test_frame_of_another_ticker_is_an_error_naming_what_it_holds() -> None:
    with pytest.raises(PriceDataError) as excinfo:
        normalize(_wide(), ticker="TSLA")
    assert str(excinfo.value).startswith(f"TSLA 1d {WINDOW}: ")
    assert "['AAPL', 'IBM', 'MSFT']" in str(excinfo.value)


def test_missing_price_column_is_an_error() -> None:
    with pytest.raises(PriceDataError) as excinfo:
        normalize(
            flat(NY_DAYS, [row[:4] for row in NY_ROWS], columns=["Open", "High", "Close", "Volume"])
        )
    assert "missing column(s) low" in raise_message(excinfo)


@pytest.mark.parametrize(
    "raw",
    [
        pd.DataFrame(),
        pd.DataFrame(columns=["Open", "High", "Low", "Close", "Volume"]),
        pd.DataFrame(
            columns=pd.MultiIndex.from_product([[*YF_COLUMNS, "Adj Close"], ["AAPL", "MSFT"]]),
            index=pd.DatetimeIndex([], name="Date"),
        ),
    ],
    ids=["no-columns", "flat", "two-level"],
)
def test_empty_frames_give_empty_canonical_bars(raw: pd.DataFrame) -> None:
    result = normalize(raw)
    assert result.bars.empty and result.notes == ()


# Case 2: price basis ---------------------------------------------------------------------------


def test_raw_frame_with_adj_close_equals_the_adjusted_frame_of_the_same_days() -> None:
    raw = pd.DataFrame(
        {
            "Open": [100.0, 101.0],
            "High": [102.0, 103.0],
            "Low": [99.0, 100.0],
            "Close": [101.0, 102.0],
            "Adj Close": [50.5, 102.0],  # a 2:1 adjustment before the second day
            "Volume": [1000.0, 2000.0],
        },
        index=NY_DAYS.rename("Date"),
    )
    adjusted_by_yfinance = auto_adjust(raw)  # what yf.download(auto_adjust=True) would return

    from_raw = normalize(yf_download_frame({"AAPL": raw}))
    from_adjusted = normalize(yf_download_frame({"AAPL": adjusted_by_yfinance}))

    pd.testing.assert_frame_equal(from_raw.bars, from_adjusted.bars)
    pd.testing.assert_frame_equal(
        from_raw.bars,
        expected(
            [
                # factor 0.5: prices halve, volume is left as it is (as yfinance does)
                ("2024-03-04 05:00", 50.0, 51.0, 49.5, 50.5, 1000.0),
                ("2024-03-05 05:00", 101.0, 103.0, 100.0, 102.0, 2000.0),
            ]
        ),
    )
    assert from_raw.notes == (
        "converted 2 rows from raw to adjusted prices (factor Adj Close/Close)",
    )
    assert from_adjusted.notes == ()


def test_row_without_adjusted_close_is_dropped_not_mixed_into_the_adjusted_series() -> None:
    raw = flat(
        NY_DAYS,
        [(100.0, 102.0, 99.0, 101.0, 50.5, 1000.0), (101.0, 103.0, 100.0, 102.0, np.nan, 2000.0)],
        columns=["Open", "High", "Low", "Close", "Adj Close", "Volume"],
    )
    result = normalize(raw)
    pd.testing.assert_frame_equal(
        result.bars, expected([("2024-03-04 05:00", 50.0, 51.0, 49.5, 50.5, 1000.0)])
    )
    assert "dropped 1 row with a close but no Adj Close" in result.notes


# Case 6: timestamps ----------------------------------------------------------------------------


def _one_bar(stamp) -> pd.DataFrame:
    return pd.DataFrame(
        {"Open": [10.0], "High": [11.0], "Low": [9.0], "Close": [10.5], "Volume": [5.0]},
        index=pd.Index([stamp], name="Datetime"),
    )


@pytest.mark.parametrize(
    "stamp",
    [
        pd.Timestamp("2024-03-04 09:30", tz="America/New_York"),
        pd.Timestamp("2024-03-04 14:30", tz="UTC"),
        pd.Timestamp("2024-03-04 09:30"),
        "2024-03-04 09:30:00-05:00",
        "2024-03-04T14:30:00Z",
        "2024-03-04 09:30",
    ],
)
def test_new_york_hourly_bar_gets_one_utc_stamp_whatever_its_zone(stamp) -> None:
    result = normalize(_one_bar(stamp), interval="1h")
    assert list(result.bars.index) == [pd.Timestamp("2024-03-04 14:30", tz="UTC")]


@pytest.mark.parametrize(
    "stamp",
    [
        pd.Timestamp("2024-03-04 10:00", tz="Asia/Bangkok"),
        pd.Timestamp("2024-03-04 03:00", tz="UTC"),
        pd.Timestamp("2024-03-03 22:00", tz="America/New_York"),
        pd.Timestamp("2024-03-04 10:00"),
        "2024-03-04 10:00:00+07:00",
    ],
)
def test_bangkok_hourly_bar_gets_one_utc_stamp_whatever_its_zone(stamp) -> None:
    result = normalize(_one_bar(stamp), interval="1h", market=SET, ticker="PTT.BK")
    assert list(result.bars.index) == [pd.Timestamp("2024-03-04 03:00", tz="UTC")]


def test_naive_stamps_follow_naive_timezone_when_given() -> None:
    result = normalize(
        _one_bar(pd.Timestamp("2024-03-04 14:30")), interval="1h", naive_timezone="UTC"
    )
    assert list(result.bars.index) == [pd.Timestamp("2024-03-04 14:30", tz="UTC")]


@pytest.mark.parametrize(
    "stamp",
    [
        pd.Timestamp("2024-03-04"),  # yfinance ignore_tz=True
        pd.Timestamp("2024-03-04", tz="America/New_York"),  # yfinance default
        pd.Timestamp("2024-03-04", tz="UTC"),  # exporters writing dates as UTC midnight
        pd.Timestamp("2024-03-04 09:30", tz="America/New_York"),  # stamped at the open
        pd.Timestamp("2024-03-04 21:00", tz="UTC"),  # stamped at the close, in UTC
        pd.Timestamp("2024-03-04 05:00", tz="UTC"),  # already canonical
        pd.Timestamp("2024-03-04 12:00", tz="Asia/Bangkok"),  # converted to another zone
        "2024-03-04",
        "2024-03-04 00:00:00-05:00",
    ],
)
def test_daily_bar_is_stamped_at_new_york_midnight_of_its_session(stamp) -> None:
    result = normalize(_one_bar(stamp), interval="1d")
    assert list(result.bars.index) == [pd.Timestamp("2024-03-04 05:00", tz="UTC")]


@pytest.mark.parametrize(
    "stamp",
    [
        pd.Timestamp("2024-07-01"),
        pd.Timestamp("2024-07-01", tz="America/New_York"),
        "2024-07-01 00:00:00-04:00",
        pd.Timestamp("2024-07-01 16:00", tz="America/New_York"),
    ],
)
def test_daily_bar_in_summer_time_is_stamped_at_edt_midnight(stamp) -> None:
    result = normalize(_one_bar(stamp), interval="1d")
    assert list(result.bars.index) == [pd.Timestamp("2024-07-01 04:00", tz="UTC")]


@pytest.mark.parametrize(
    "stamp",
    [
        pd.Timestamp("2024-03-04"),
        pd.Timestamp("2024-03-04", tz="Asia/Bangkok"),
        pd.Timestamp("2024-03-04", tz="UTC"),
        pd.Timestamp("2024-03-04 10:00", tz="Asia/Bangkok"),
        pd.Timestamp("2024-03-03 17:00", tz="UTC"),  # canonical: Bangkok midnight in UTC
        pd.Timestamp("2024-03-03 12:00", tz="America/New_York"),
    ],
)
def test_bangkok_daily_bar_is_stamped_at_bangkok_midnight(stamp) -> None:
    result = normalize(_one_bar(stamp), interval="1d", market=SET, ticker="PTT.BK")
    assert list(result.bars.index) == [pd.Timestamp("2024-03-03 17:00", tz="UTC")]


def test_text_stamps_with_offsets_either_side_of_a_dst_change_keep_their_own_offsets() -> None:
    raw = pd.DataFrame(
        {
            "Datetime": ["2024-03-08 15:30:00-05:00", "2024-03-11 15:30:00-04:00"],
            "Open": [1.0, 2.0],
            "High": [1.0, 2.0],
            "Low": [1.0, 2.0],
            "Close": [1.0, 2.0],
            "Volume": [1.0, 2.0],
        }
    )
    result = normalize(raw, interval="1h")
    assert list(result.bars.index) == [
        pd.Timestamp("2024-03-08 20:30", tz="UTC"),
        pd.Timestamp("2024-03-11 19:30", tz="UTC"),
    ]


# Case 8: DST -----------------------------------------------------------------------------------

FALL_BACK_WALL = [
    "2024-11-03 00:30",
    "2024-11-03 00:45",
    "2024-11-03 01:00",
    "2024-11-03 01:15",
    "2024-11-03 01:30",
    "2024-11-03 01:45",
    "2024-11-03 01:00",  # clocks went back: the hour again, now EST
    "2024-11-03 01:15",
    "2024-11-03 01:30",
    "2024-11-03 01:45",
    "2024-11-03 02:00",
]
FALL_BACK_UTC = [
    "04:30",
    "04:45",
    "05:00",
    "05:15",
    "05:30",
    "05:45",
    "06:00",
    "06:15",
    "06:30",
    "06:45",
    "07:00",
]


def _fifteen_minute_bars(wall: list[str]) -> pd.DataFrame:
    prices = np.arange(1.0, len(wall) + 1.0)
    return pd.DataFrame(
        {"Open": prices, "High": prices, "Low": prices, "Close": prices, "Volume": prices * 10},
        index=pd.DatetimeIndex(wall, name="Datetime"),
    )


def test_repeated_hour_at_fall_back_maps_to_distinct_utc_stamps() -> None:
    result = normalize(
        _fifteen_minute_bars(FALL_BACK_WALL),
        interval="15m",
        market=CRYPTO,
        naive_timezone="America/New_York",
    )
    assert list(result.bars.index) == [
        pd.Timestamp(f"2024-11-03 {t}", tz="UTC") for t in FALL_BACK_UTC
    ]
    # No bar merged or lost: the closes keep their input order.
    assert list(result.bars["close"]) == list(np.arange(1.0, 12.0))
    assert result.notes == ()


def test_repeated_hour_is_resolved_in_files_listed_newest_first() -> None:
    raw = _fifteen_minute_bars(FALL_BACK_WALL).iloc[::-1]
    result = normalize(raw, interval="15m", market=CRYPTO, naive_timezone="America/New_York")
    assert list(result.bars.index) == [
        pd.Timestamp(f"2024-11-03 {t}", tz="UTC") for t in FALL_BACK_UTC
    ]
    assert list(result.bars["close"]) == list(np.arange(1.0, 12.0))


def test_repeated_hour_of_hourly_bars_maps_to_distinct_utc_stamps() -> None:
    raw = _fifteen_minute_bars(
        ["2024-11-03 00:00", "2024-11-03 01:00", "2024-11-03 01:00", "2024-11-03 02:00"]
    )
    result = normalize(raw, interval="1h", market=US)
    assert [t.strftime("%H:%M") for t in result.bars.index] == ["04:00", "05:00", "06:00", "07:00"]


def test_ambiguous_local_time_that_occurs_once_is_an_error() -> None:
    raw = _fifteen_minute_bars(["2024-11-03 00:00", "2024-11-03 01:00", "2024-11-03 02:00"])
    with pytest.raises(PriceDataError) as excinfo:
        normalize(raw, interval="1h")
    message = raise_message(excinfo)
    assert "2024-11-03 01:00:00 occurs twice in America/New_York" in message


def test_naive_stamp_inside_the_spring_forward_gap_is_an_error_naming_it() -> None:
    raw = _fifteen_minute_bars(["2024-03-10 01:30", "2024-03-10 02:30", "2024-03-10 03:30"])
    with pytest.raises(PriceDataError) as excinfo:
        normalize(raw, interval="1h")
    message = raise_message(excinfo)
    assert "local time 2024-03-10 02:30:00 does not exist in America/New_York" in message


def test_spring_forward_gap_is_no_problem_for_tz_aware_stamps() -> None:
    stamps = pd.DatetimeIndex(["2024-03-10 06:30", "2024-03-10 07:30"], tz="UTC")
    result = normalize(
        _fifteen_minute_bars(["2024-03-10 01:30", "2024-03-10 03:30"]).set_axis(stamps),
        interval="1h",
    )
    assert list(result.bars.index) == list(stamps.rename("timestamp"))


# Case 7: the partial live bar ------------------------------------------------------------------

LIVE_DAYS = pd.DatetimeIndex(["2024-03-04", "2024-03-05", "2024-03-05"], name="Date")


def test_live_row_with_higher_volume_replaces_the_official_row_of_the_same_day() -> None:
    raw = flat(
        LIVE_DAYS,
        [
            (100.0, 102.0, 99.0, 101.0, 1000.0),
            (101.0, 103.0, 100.0, 102.0, 2000.0),  # official row
            (101.0, 104.0, 100.0, 103.5, 2600.0),  # later live snapshot of the same session
        ],
    )
    result = normalize(raw)
    pd.testing.assert_frame_equal(
        result.bars,
        expected(
            [
                ("2024-03-04 05:00", 100.0, 102.0, 99.0, 101.0, 1000.0),
                ("2024-03-05 05:00", 101.0, 104.0, 100.0, 103.5, 2600.0),
            ]
        ),
    )
    assert result.notes == (
        "dropped 1 row repeating 1 timestamp(s); kept per timestamp the complete row with the "
        "highest volume",
    )


def test_live_row_with_zero_open_high_low_loses_to_the_complete_official_row() -> None:
    raw = flat(
        LIVE_DAYS,
        [
            (100.0, 102.0, 99.0, 101.0, 1000.0),
            (101.0, 103.0, 100.0, 102.0, 2000.0),
            (0.0, 0.0, 0.0, 103.5, 2600.0),  # live row: only close and volume filled in
        ],
    )
    result = normalize(raw)
    pd.testing.assert_frame_equal(
        result.bars,
        expected(
            [
                ("2024-03-04 05:00", 100.0, 102.0, 99.0, 101.0, 1000.0),
                ("2024-03-05 05:00", 101.0, 103.0, 100.0, 102.0, 2000.0),
            ]
        ),
    )
    assert len(result.notes) == 1 and result.notes[0].startswith(
        "dropped 1 row repeating 1 timestamp"
    )


def test_lone_row_with_zero_open_high_low_is_dropped_and_counted() -> None:
    raw = flat(NY_DAYS, [NY_ROWS[0], (0.0, 0.0, 0.0, 103.5, 2600.0)])
    result = normalize(raw)
    pd.testing.assert_frame_equal(result.bars, NY_EXPECTED.iloc[:1])
    assert result.notes == (
        "dropped 1 row whose open/high/low were 0 beside a real close (a bar the source had "
        "not filled in)",
    )


# Case 9: NaN copies and padding rows -----------------------------------------------------------


def test_duplicate_timestamp_with_an_all_nan_copy_keeps_the_real_row() -> None:
    raw = flat(
        LIVE_DAYS,
        [NY_ROWS[0], (np.nan, np.nan, np.nan, np.nan, np.nan), NY_ROWS[1]],
    )
    result = normalize(raw)
    pd.testing.assert_frame_equal(result.bars, NY_EXPECTED)
    assert result.notes == (
        "dropped 1 row repeating 1 timestamp(s); kept per timestamp the complete row with the "
        "highest volume",
    )


def test_wide_frame_drops_stock_weekend_padding_and_keeps_crypto_weekend_bars() -> None:
    days = pd.DatetimeIndex(["2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"], tz="UTC")
    crypto = flat(days, [(float(p), p + 1.0, p - 1.0, float(p), 10.0) for p in (60, 61, 62, 63)])
    stock = flat(days[[0, 3]], [(10.0, 11.0, 9.0, 10.5, 100.0), (11.0, 12.0, 10.0, 11.5, 200.0)])
    # yf.download aligns all tickers on the union index: the stock gets NaN weekend rows.
    wide = yf_download_frame({"BTC-USD": crypto, "AAPL": stock})
    assert wide.loc[:, ("Close", "AAPL")].isna().sum() == 2

    stock_result = normalize(wide, market=US)
    crypto_result = normalize(wide, market=CRYPTO, ticker="BTC-USD")

    pd.testing.assert_frame_equal(
        stock_result.bars,
        expected(
            [
                ("2024-03-01 05:00", 10.0, 11.0, 9.0, 10.5, 100.0),
                ("2024-03-04 05:00", 11.0, 12.0, 10.0, 11.5, 200.0),
            ]
        ),
    )
    assert stock_result.notes == ("dropped 2 rows with no prices (open/high/low/close missing)",)
    assert list(crypto_result.bars.index.day) == [1, 2, 3, 4]
    assert list(crypto_result.bars["close"]) == [60.0, 61.0, 62.0, 63.0]
    assert crypto_result.notes == ()


# Values: missing, invalid, inconsistent --------------------------------------------------------


def test_rows_with_missing_prices_are_dropped_and_counted_by_kind() -> None:
    days = pd.DatetimeIndex(["2024-03-04", "2024-03-05", "2024-03-06", "2024-03-07"])
    raw = flat(
        days,
        [
            NY_ROWS[0],
            (np.nan, np.nan, np.nan, np.nan, 500.0),  # volume but no prices
            (np.nan, 103.0, 100.0, 102.0, 2000.0),  # open missing
            (0.0, 0.0, 0.0, 0.0, 0.0),  # all zero: no bar
        ],
    )
    result = normalize(raw)
    pd.testing.assert_frame_equal(result.bars, NY_EXPECTED.iloc[:1])
    assert result.notes == (
        "dropped 2 rows with no prices (open/high/low/close missing)",
        "dropped 1 row with some of open/high/low/close missing",
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ((100.0, 102.0, -99.0, 101.0, 10.0), "low is -99.0 at 2024-03-05T05:00:00+00:00"),
        (
            (100.0, 102.0, 99.0, 0.0, 10.0),
            "close is 0 next to non-zero prices at 2024-03-05T05:00:00+00:00",
        ),
        ((100.0, np.inf, 99.0, 101.0, 10.0), "high is inf at 2024-03-05T05:00:00+00:00"),
        ((100.0, 102.0, 99.0, 101.0, -5.0), "volume is -5.0 at 2024-03-05T05:00:00+00:00"),
    ],
)
def test_non_positive_prices_and_negative_volume_are_errors(row: tuple, reason: str) -> None:
    with pytest.raises(PriceDataError) as excinfo:
        normalize(flat(NY_DAYS, [NY_ROWS[0], row]))
    assert raise_message(excinfo) == f"AAPL 1d {WINDOW}: {reason}"
    assert excinfo.value.ticker == "AAPL" and excinfo.value.interval == "1d"
    assert excinfo.value.window == WINDOW


def test_missing_volume_becomes_zero_with_a_note() -> None:
    index_rows = [
        (5000.0, 5010.0, 4990.0, 5005.0, np.nan),
        (5005.0, 5020.0, 5000.0, 5015.0, np.nan),
    ]
    result = normalize(flat(NY_DAYS, index_rows))
    assert list(result.bars["volume"]) == [0.0, 0.0]
    assert result.notes == ("set missing volume to 0 on 2 rows",)


def test_missing_volume_column_is_an_error() -> None:
    rows = [(5000.0, 5010.0, 4990.0, 5005.0), (5005.0, 5020.0, 5000.0, 5015.0)]
    with pytest.raises(PriceDataError, match="no volume column"):
        normalize(flat(NY_DAYS, rows, columns=["Open", "High", "Low", "Close"]))


def test_high_and_low_are_widened_to_cover_open_and_close() -> None:
    raw = flat(
        NY_DAYS,
        [
            (100.0, 99.5, 99.0, 101.0, 10.0),  # high below close
            (101.0, 103.0, 101.5, 102.0, 20.0),  # low above open
        ],
    )
    result = normalize(raw)
    pd.testing.assert_frame_equal(
        result.bars,
        expected(
            [
                ("2024-03-04 05:00", 100.0, 101.0, 99.0, 101.0, 10.0),
                ("2024-03-05 05:00", 101.0, 103.0, 101.0, 102.0, 20.0),
            ]
        ),
    )
    assert result.notes == ("widened high/low to cover open and close on 2 rows",)


def test_float_noise_from_the_adjustment_factor_is_snapped_but_not_reported() -> None:
    # Scaling by Adj Close / Close can leave high a few ulps below the adjusted close.
    raw = flat(NY_DAYS[:1], [(100.0, 101.0 - 1e-12, 99.0, 101.0, 10.0)])
    result = normalize(raw)
    assert result.bars.iloc[0]["high"] == 101.0
    assert result.notes == ()


# Files -----------------------------------------------------------------------------------------


def _yfinance_shaped(interval: str) -> pd.DataFrame:
    """What yf.download returns for AAPL and MSFT: daily dates or intraday stamps with offset."""
    if interval == "1d":
        index = pd.DatetimeIndex(["2024-03-04", "2024-03-05"], name="Date")
    else:
        index = pd.DatetimeIndex(
            ["2024-03-08 15:30", "2024-03-11 09:30"], name="Datetime"
        ).tz_localize("America/New_York")
    aapl = flat(index, NY_ROWS, name=index.name)
    msft_rows = [(400.0, 401.0, 399.0, 400.5, 7.0), (401.0, 402.0, 400.0, 401.5, 8.0)]
    msft = flat(index, msft_rows, name=index.name)
    return yf_download_frame({"AAPL": aapl, "MSFT": msft})


@pytest.mark.parametrize("interval", ["1d", "1h"])
@pytest.mark.parametrize("tickers", [["AAPL"], ["AAPL", "MSFT"]])
def test_csv_with_yfinance_header_rows_round_trips(
    tmp_path: Path, interval: str, tickers: list[str]
) -> None:
    frame = _yfinance_shaped(interval).loc[:, (slice(None), tickers)]
    path = tmp_path / "bars.csv"
    frame.to_csv(path)
    header = path.read_text().splitlines()[:3]
    assert header[0].startswith("Price,") and header[1].startswith("Ticker,")
    assert header[2].startswith("Date," if interval == "1d" else "Datetime,")

    from_file = normalize(read_bar_file(path), interval=interval)
    direct = normalize(frame, interval=interval)

    pd.testing.assert_frame_equal(from_file.bars, direct.bars)
    first = "2024-03-04 05:00" if interval == "1d" else "2024-03-08 20:30"
    second = "2024-03-05 05:00" if interval == "1d" else "2024-03-11 13:30"
    pd.testing.assert_frame_equal(
        from_file.bars,
        expected([(first, *NY_ROWS[0]), (second, *NY_ROWS[1])]),
    )


def test_csv_with_only_price_and_ticker_header_rows_is_read(tmp_path: Path) -> None:
    path = tmp_path / "two_rows.csv"
    path.write_text(
        "Price,Close,High,Low,Open,Volume\n"
        "Ticker,AAPL,AAPL,AAPL,AAPL,AAPL\n"
        "2024-03-04,101.0,102.0,99.0,100.0,1000\n"
        "2024-03-05,102.0,103.0,100.0,101.0,2000\n"
    )
    pd.testing.assert_frame_equal(normalize(read_bar_file(path)).bars, NY_EXPECTED)


def test_flat_csv_and_parquet_files_are_read(tmp_path: Path) -> None:
    csv_path = tmp_path / "flat.csv"
    csv_path.write_text(
        "timestamp,open,high,low,close,adj_close,volume\n"
        "2024-03-04 00:00:00-05:00,100,102,99,101,101,1000\n"
        "2024-03-05 00:00:00-05:00,101,103,100,102,102,2000\n"
    )
    pd.testing.assert_frame_equal(normalize(read_bar_file(csv_path)).bars, NY_EXPECTED)

    parquet_path = tmp_path / "bars.parquet"
    _yfinance_shaped("1d").to_parquet(parquet_path)
    pd.testing.assert_frame_equal(normalize(read_bar_file(parquet_path)).bars, NY_EXPECTED)


def test_csv_with_text_in_a_price_column_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("Date,Open,High,Low,Close,Volume\n2024-03-04,100,102,n/a,101,1000\n")
    with pytest.raises(ValueError, match=r"line 2, column Low: 'n/a' is not a number"):
        read_bar_file(path)
