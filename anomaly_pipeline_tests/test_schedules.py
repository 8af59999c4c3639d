"""Ingestion and retraining schedules evaluated against a real Dagster instance.

Holidays are the exchanges' own, from exchange_calendars: SET was closed on 2025-02-12 (Makha
Bucha Day), NYSE on 2025-02-17 (Washington's Birthday) and on 2025-01-09 (a national day of
mourning), and NYSE closed early, at 13:00, on 2025-11-28.
"""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from anomaly_pipeline.automation import build_automation_definitions
from anomaly_pipeline.automation.schedules import ingestion_run_requests
from anomaly_pipeline.universe import Market, load_universe
from anomaly_pipeline_tests.automation_runs import automation_definitions

BKK = "Asia/Bangkok"
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


@pytest.fixture
def definitions(sample_universe, resources):
    return automation_definitions(sample_universe, resources)


@pytest.fixture
def us_intraday_universe(tmp_path):
    path = tmp_path / "universe.yaml"
    path.write_text(
        "history_start:\n  15m: '2025-01-01'\n  1h: '2025-01-01'\n"
        "markets:\n  US:\n    timezone: America/New_York\n    calendar: XNYS\n"
        "    intervals: [15m, 1h]\n    tickers: [AAPL, MSFT]\n"
    )
    return load_universe(path)


def tick(definitions, name: str, instance, local_time: str, timezone: str):
    """Evaluate one schedule tick at ``local_time`` in ``timezone``."""
    moment = pd.Timestamp(local_time, tz=timezone).to_pydatetime()
    context = dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=moment,
        repository_def=definitions.get_repository_def(),
    )
    return definitions.resolve_schedule_def(name).evaluate_tick(context)


def ranges(data) -> list[tuple[str, str] | str]:
    return [
        request.partition_key or (request.tags[RANGE_START], request.tags[RANGE_END])
        for request in data.run_requests
    ]


def test_crons_follow_each_markets_sessions_in_its_own_timezone(
    definitions, us_intraday_universe, resources
):
    expected = {
        "ingest_us_1d_schedule": ("30 16 * * 1,2,3,4,5", "America/New_York"),
        "ingest_set_15m_schedule": ("3,18,33,48 10-16 * * 1,2,3,4,5", "Asia/Bangkok"),
        "ingest_set_1h_schedule": ("3 11-17 * * 1,2,3,4,5", "Asia/Bangkok"),
        "ingest_crypto_15m_schedule": ("3,18,33,48 * * * *", "UTC"),
        "ingest_crypto_1h_schedule": ("3 * * * *", "UTC"),
        "retrain_us_models_weekly": ("0 3 * * 0", "America/New_York"),
        "retrain_set_models_weekly": ("0 3 * * 0", "Asia/Bangkok"),
        "retrain_crypto_models_weekly": ("0 3 * * 0", "UTC"),
    }
    schedules = definitions.get_repository_def().schedule_defs
    assert {s.name: (s.cron_schedule, s.execution_timezone) for s in schedules} == expected

    # New York opens at 09:30, so its hourly bars close at :30 and are fetched at :33.
    us = automation_definitions(us_intraday_universe, resources)
    assert us.resolve_schedule_def("ingest_us_1h_schedule").cron_schedule == (
        "33 10-16 * * 1,2,3,4,5"
    )
    assert us.resolve_schedule_def("ingest_us_15m_schedule").cron_schedule == (
        "3,18,33,48 9-16 * * 1,2,3,4,5"
    )


def test_set_intraday_runs_in_session_and_skips_night_weekend_and_holiday(definitions, instance):
    name = "ingest_set_15m_schedule"
    in_session = tick(definitions, name, instance, "2025-02-10 11:03", "Asia/Bangkok")
    assert ranges(in_session) == [("SYNA.BK|2025-02", "SYNC.BK|2025-02")]
    assert in_session.run_requests[0].tags["anomaly_pipeline/window"] == "2025-02"

    night = tick(definitions, name, instance, "2025-02-10 03:03", "Asia/Bangkok")
    assert night.run_requests == []
    assert night.skip_message == (
        "SET: no trading between 02:45 and 03:00 on Mon 2025-02-10 (Asia/Bangkok)"
    )
    holiday = tick(definitions, name, instance, "2025-02-12 11:03", "Asia/Bangkok")
    assert holiday.run_requests == []
    assert "Wed 2025-02-12" in holiday.skip_message
    saturday = tick(definitions, name, instance, "2025-02-15 11:03", "Asia/Bangkok")
    assert saturday.run_requests == []

    # The 1h tick after the 16:30 close still collects the bar that holds the close.
    after_close = tick(definitions, "ingest_set_1h_schedule", instance, "2025-02-10 17:03", BKK)
    assert ranges(after_close) == [("SYNA.BK|2025-02", "SYNC.BK|2025-02")]
    evening = tick(definitions, "ingest_set_1h_schedule", instance, "2025-02-10 18:03", BKK)
    assert evening.run_requests == []


def test_crypto_runs_every_day_and_a_tick_after_midnight_fetches_the_closing_month(
    definitions, instance
):
    fifteen, hourly = "ingest_crypto_15m_schedule", "ingest_crypto_1h_schedule"
    february = [("SYNX-USD|2025-02", "SYNZ-USD|2025-02")]
    assert ranges(tick(definitions, fifteen, instance, "2025-02-15 03:03", "UTC")) == february
    assert ranges(tick(definitions, hourly, instance, "2025-02-16 23:03", "UTC")) == february
    # At 00:03 on 1 March the bar that just closed is February's last.
    assert ranges(tick(definitions, fifteen, instance, "2025-03-01 00:03", "UTC")) == february
    assert ranges(tick(definitions, fifteen, instance, "2025-03-01 00:18", "UTC")) == [
        ("SYNX-USD|2025-03", "SYNZ-USD|2025-03")
    ]


def test_us_daily_runs_after_the_close_on_sessions_only(definitions, instance):
    name = "ingest_us_1d_schedule"
    ny = "America/New_York"
    assert ranges(tick(definitions, name, instance, "2025-02-18 16:30", ny)) == ["MSFT|2025"]
    # Summer time: the same local time, another UTC offset.
    assert ranges(tick(definitions, name, instance, "2025-07-01 16:30", ny)) == ["MSFT|2025"]
    # Early close at 13:00 the day after Thanksgiving: the 16:30 tick collects it.
    assert ranges(tick(definitions, name, instance, "2025-11-28 16:30", ny)) == ["MSFT|2025"]
    # New Year's Eve's bar belongs to the window of its session date, not of the tick.
    assert ranges(tick(definitions, name, instance, "2024-12-31 16:30", ny)) == ["MSFT|2024"]

    for closed in ("2025-02-17 16:30", "2025-01-09 16:30", "2025-02-15 16:30"):
        skipped = tick(definitions, name, instance, closed, ny)
        assert skipped.run_requests == []
        assert skipped.skip_message.startswith("US: no session closed in the day before")


def test_us_intraday_follows_the_half_hour_open(us_intraday_universe, resources, instance):
    definitions = automation_definitions(us_intraday_universe, resources)
    name = "ingest_us_1h_schedule"
    ny = "America/New_York"
    assert ranges(tick(definitions, name, instance, "2025-02-18 10:33", ny)) == [
        ("AAPL|2025-02", "MSFT|2025-02")
    ]
    # The bar from 15:30 holds the 16:00 close.
    assert len(tick(definitions, name, instance, "2025-02-18 16:33", ny).run_requests) == 1
    assert tick(definitions, name, instance, "2025-02-18 17:33", ny).run_requests == []
    assert tick(definitions, name, instance, "2025-02-17 10:33", ny).run_requests == []


def test_retraining_runs_every_models_of_the_market(definitions, instance):
    data = tick(definitions, "retrain_set_models_weekly", instance, "2025-02-16 03:00", BKK)
    assert len(data.run_requests) == 1
    job = definitions.resolve_job_def("retrain_set_models")
    assert {key.to_user_string() for key in job.asset_layer.selected_asset_keys} == {
        "set/15m/model",
        "set/1h/model",
    }


def test_large_markets_are_ingested_in_ranged_runs_of_at_most_500_tickers():
    market = Market(
        name="BIG",
        timezone="UTC",
        calendar=None,
        intervals=("1d",),
        tickers=tuple(f"T{i:04d}" for i in range(1200)),
    )
    requests = ingestion_run_requests(market, "1d", "2025")
    assert [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in requests] == [
        ("T0000|2025", "T0499|2025"),
        ("T0500|2025", "T0999|2025"),
        ("T1000|2025", "T1199|2025"),
    ]


def test_default_status_depends_on_the_price_source(sample_universe, monkeypatch):
    offline = build_automation_definitions(sample_universe)
    assert {s.default_status for s in offline.schedules} == {dg.DefaultScheduleStatus.STOPPED}
    assert {s.default_status for s in offline.sensors} == {dg.DefaultSensorStatus.RUNNING}

    monkeypatch.setenv("ANOMALY_PIPELINE_PRICE_SOURCE", "yfinance")
    live = build_automation_definitions(sample_universe)
    assert {s.default_status for s in live.schedules} == {dg.DefaultScheduleStatus.RUNNING}
    assert {s.default_status for s in live.sensors} == {dg.DefaultSensorStatus.RUNNING}
