"""Small charts for materialization metadata: a partition's closes with its anomalies marked.

The chart is a PNG embedded in markdown as a base64 data URI, which the Dagster UI renders in
the materialization's metadata. It is drawn on matplotlib's Agg canvas through the object API
(no pyplot): no display is needed and no global figure state is shared between threads.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from zoneinfo import ZoneInfo

import dagster as dg
import matplotlib.dates as mdates
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anomaly_pipeline.modeling.detection import WindowDetection

# Metadata values live in Dagster's event log, once per partition: keep each chart small.
MAX_CHART_BYTES = 100_000
CLOSES_GID = "closes"
ANOMALIES_GID = "anomalies"
MAX_CHARTS_PER_STEP = 50
_SIZE_INCHES = (6.4, 2.2)
_DPI_STEPS = (80, 64, 48)


def closes_chart(
    bars: pd.DataFrame, anomaly_times: Sequence[pd.Timestamp], *, timezone: str
) -> Figure:
    """The closes of ``bars`` as a line, with the bars at ``anomaly_times`` marked in red.

    Times on the axis read in ``timezone`` (the market's own). Raises KeyError when an anomaly
    time is not one of the bars: a mark must sit on a plotted close. The caption goes in the
    markdown around the image: a title and a legend inside it would triple the drawing time.
    """
    closes = bars["close"]
    marked = closes.loc[pd.DatetimeIndex(anomaly_times)]

    figure = Figure(figsize=_SIZE_INCHES)
    FigureCanvasAgg(figure)
    # Fixed margins: a layout engine would draw the figure twice to measure it.
    figure.subplots_adjust(left=0.09, right=0.99, top=0.96, bottom=0.14)
    axes = figure.add_subplot()
    axes.plot(closes.index, closes.to_numpy(), linewidth=0.8, color="#3b6ea8", gid=CLOSES_GID)
    axes.scatter(
        marked.index, marked.to_numpy(), s=18, color="#d62728", zorder=3, gid=ANOMALIES_GID
    )
    zone = ZoneInfo(timezone)
    locator = mdates.AutoDateLocator(tz=zone, maxticks=6)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=zone))
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3, linewidth=0.5)
    return figure


def figure_png(figure: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def chart_markdown(figure: Figure, caption: str) -> str:
    """A bold caption over ``figure`` as a PNG data URI, at most MAX_CHART_BYTES long."""
    for dpi in _DPI_STEPS:
        encoded = base64.b64encode(figure_png(figure, dpi)).decode("ascii")
        markdown = f"**{caption}**\n\n![{caption}](data:image/png;base64,{encoded})"
        if len(markdown) <= MAX_CHART_BYTES:
            return markdown
    raise ValueError(f"chart {caption!r} stays above {MAX_CHART_BYTES} bytes at every size")


def anomaly_chart_metadata(
    bars: pd.DataFrame, anomaly_times: Sequence[pd.Timestamp], *, title: str, timezone: str
) -> dg.MetadataValue:
    """The chart of one partition as a markdown metadata value the Dagster UI renders."""
    figure = closes_chart(bars, anomaly_times, timezone=timezone)
    count = len(anomaly_times)
    caption = f"{title} ({count} anomal{'y' if count == 1 else 'ies'}, in red)"
    return dg.MetadataValue.md(chart_markdown(figure, caption=caption))


def partitions_to_chart(detections: Sequence[WindowDetection], limit: int) -> set[str]:
    """The partitions of a step that get a chart: those with anomalies, at most ``limit``.

    Past the limit, the partitions whose strongest anomaly scores highest are kept. Each chart
    costs a few tenths of a second and tens of kilobytes of event log, and a ranged run can
    cover hundreds of partitions.
    """
    with_anomalies = [detection for detection in detections if detection.documents]
    with_anomalies.sort(
        key=lambda detection: max(document["anomaly_score"] for document in detection.documents),
        reverse=True,
    )
    return {str(detection.window.partition_key) for detection in with_anomalies[:limit]}
