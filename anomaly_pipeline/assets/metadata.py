"""Small helpers that turn run facts into typed Dagster metadata."""

from __future__ import annotations

import dagster as dg

from anomaly_pipeline.prices.source import BarWindow


def window_metadata(window: BarWindow) -> dict[str, dg.MetadataValue]:
    return {
        "ticker": dg.MetadataValue.text(window.ticker),
        "window_start": dg.MetadataValue.timestamp(window.start.to_pydatetime()),
        "window_end": dg.MetadataValue.timestamp(window.end.to_pydatetime()),
    }


def trigger_of(tags: dict[str, str]) -> str:
    """What started a run, read from Dagster's own run tags."""
    if "dagster/backfill" in tags:
        return "backfill"
    if "dagster/schedule_name" in tags:
        return "schedule"
    if "dagster/sensor_name" in tags:
        return "sensor"
    return "manual"
