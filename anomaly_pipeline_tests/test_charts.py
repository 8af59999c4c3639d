"""The closes chart: what is plotted and marked (read back from the figure), and its size."""

from __future__ import annotations

import base64

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
import pytest

from anomaly_pipeline import charts
from anomaly_pipeline.charts import (
    ANOMALIES_GID,
    CLOSES_GID,
    MAX_CHART_BYTES,
    anomaly_chart_metadata,
    chart_markdown,
    closes_chart,
    partitions_to_chart,
)
from anomaly_pipeline.modeling.detection import WindowDetection
from anomaly_pipeline.prices.source import BarWindow
from anomaly_pipeline.settings import SAMPLE_DATA_DIR

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _bars(count: int, freq: str = "1h") -> pd.DataFrame:
    index = pd.date_range("2025-01-06T02:00Z", periods=count, freq=freq, name="timestamp")
    closes = 100 + np.sin(np.arange(count) / 5.0) * 3 + np.arange(count) * 0.01
    return pd.DataFrame({"close": closes}, index=index)


def _artist(figure, gid: str):
    (axes,) = figure.axes
    matches = [artist for artist in (*axes.lines, *axes.collections) if artist.get_gid() == gid]
    assert len(matches) == 1
    return matches[0]


def _png_of(markdown: str) -> bytes:
    prefix = "data:image/png;base64,"
    return base64.b64decode(markdown[markdown.index(prefix) + len(prefix) : -1])


def test_chart_plots_every_close_and_marks_exactly_the_anomalies():
    bars = _bars(60)
    anomaly_times = [bars.index[7], bars.index[31], bars.index[59]]

    figure = closes_chart(bars, anomaly_times, timezone="Asia/Bangkok")

    line = _artist(figure, CLOSES_GID).get_xydata()
    np.testing.assert_allclose(line[:, 0], mdates.date2num(bars.index.to_pydatetime()))
    np.testing.assert_array_equal(line[:, 1], bars["close"].to_numpy())

    marks = _artist(figure, ANOMALIES_GID).get_offsets()
    expected_x = mdates.date2num([stamp.to_pydatetime() for stamp in anomaly_times])
    np.testing.assert_allclose(marks[:, 0], expected_x)
    np.testing.assert_array_equal(marks[:, 1], bars["close"].iloc[[7, 31, 59]].to_numpy())


def test_a_mark_must_sit_on_a_plotted_close():
    bars = _bars(10)
    with pytest.raises(KeyError):
        closes_chart(bars, [bars.index[3] + pd.Timedelta(minutes=1)], timezone="UTC")


def test_a_dense_month_stays_under_the_size_limit():
    frame = pd.read_csv(SAMPLE_DATA_DIR / "SYNZ-USD_15m.csv")
    frame.index = pd.DatetimeIndex(pd.to_datetime(frame.pop("timestamp"), utc=True))
    bars = frame.loc["2025-03"]
    assert len(bars) == 31 * 96

    figure = closes_chart(bars, list(bars.index[::100]), timezone="UTC")
    markdown = chart_markdown(figure, caption="SYNZ-USD|2025-03")

    assert len(markdown) <= MAX_CHART_BYTES
    assert markdown.startswith("**SYNZ-USD|2025-03**\n\n![SYNZ-USD|2025-03](data:image/png;base64,")
    assert _png_of(markdown).startswith(PNG_SIGNATURE)


def test_a_chart_over_the_limit_is_drawn_smaller_or_refused(monkeypatch):
    figure = closes_chart(_bars(200), [], timezone="UTC")
    full_size = len(chart_markdown(figure, caption="t"))

    monkeypatch.setattr(charts, "MAX_CHART_BYTES", full_size - 1)
    smaller = chart_markdown(figure, caption="t")
    assert len(smaller) <= full_size - 1
    assert _png_of(smaller).startswith(PNG_SIGNATURE)

    monkeypatch.setattr(charts, "MAX_CHART_BYTES", 100)
    with pytest.raises(ValueError, match="above 100 bytes"):
        chart_markdown(figure, caption="t")


def test_the_caption_counts_the_marks():
    bars = _bars(30)
    one = anomaly_chart_metadata(bars, [bars.index[4]], title="A|2025-01 (1h)", timezone="UTC")
    assert one.value.startswith("**A|2025-01 (1h) (1 anomaly, in red)**\n\n![")
    two = anomaly_chart_metadata(bars, list(bars.index[4:6]), title="A (1h)", timezone="UTC")
    assert two.value.startswith("**A (1h) (2 anomalies, in red)**\n\n![")


def test_charts_go_to_the_partitions_with_the_strongest_anomalies(sample_universe):
    market = sample_universe.markets["CRYPTO"]

    def detection(key: str, scores: list[float]) -> WindowDetection:
        start = pd.Timestamp("2025-01-01", tz="UTC")
        window = BarWindow("SYNX-USD", "1h", market, start, start, key)
        return WindowDetection(window, 100, [{"anomaly_score": score} for score in scores])

    detections = [
        detection("SYNX-USD|2025-01", [0.61, 0.62]),
        detection("SYNX-USD|2025-02", []),
        detection("SYNX-USD|2025-03", [0.70]),
        detection("SYNX-USD|2025-04", [0.60, 0.65]),
    ]
    assert partitions_to_chart(detections, limit=10) == {
        "SYNX-USD|2025-01",
        "SYNX-USD|2025-03",
        "SYNX-USD|2025-04",
    }
    assert partitions_to_chart(detections, limit=2) == {"SYNX-USD|2025-03", "SYNX-USD|2025-04"}
