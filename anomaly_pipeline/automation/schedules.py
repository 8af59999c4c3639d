"""Ingestion and retraining schedules, in each market's own timezone and trading sessions.

Ingestion. Each market and interval has a schedule that fetches the current window of every
ticker (prices, then features) as one run ranged along the ticker dimension (split at
``MAX_PARTITIONS_PER_RUN`` tickers). It fires a few minutes after each bar closes:

* 15m and 1h bars: every bar length, aligned to the market's session open (New York opens at
  09:30, so its hourly bars close at :30) plus ``INTRADAY_DELAY`` for the source to publish,
  within the exchange's trading hours and weekdays, in the market's timezone;
* 1d bars: ``DAILY_DELAY`` after the regular session close (16:30 in New York, 17:00 in
  Bangkok), or after UTC midnight for markets without a calendar, which trade every day.

A cron expression cannot know holidays, half-days or lunch breaks, so every tick also asks the
exchange calendar (exchange_calendars) whether the market traded during the bar that just
closed, and skips with the reason when it did not: no 15m run for SET at 03:00 Bangkok time, no
run on weekends or exchange holidays, a crypto market runs every day.

Retraining. Each market retrains the models of all its intervals weekly, on Sunday at 03:00 in
its timezone, when stock markets are closed. Retraining on unchanged features keeps the model
version, so a quiet week creates no work; a new version makes the detection sensor re-score
each ticker's latest window.

Which start on by default. Detection sensors start running: they read only stored state, cost
two index lookups a minute when nothing is new, and turn any ingestion (scheduled, backfilled or
manual) into detection without further action. Ingestion and retraining schedules start
running only when a live price source is configured (``ANOMALY_PIPELINE_PRICE_SOURCE`` other
than ``files``): they call the source on a clock, and the shipped files end in 2025, so on the
offline default every tick would fetch a window the files cannot fill and fail. Anything can
still be started or stopped in the Dagster UI (Automation) or with ``dagster schedule start``;
that choice is stored in the Dagster instance and outlives code reloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import dagster as dg
import pandas as pd
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from anomaly_pipeline.automation.jobs import (
    ingestion_job,
    retraining_job,
)
from anomaly_pipeline.calendars import exchange_calendar, trading_sessions
from anomaly_pipeline.intervals import interval_spec
from anomaly_pipeline.partitions import (
    MAX_PARTITIONS_PER_RUN,
    bar_partitions,
    partition_key_for,
    window_dimension,
)
from anomaly_pipeline.settings import PRICE_SOURCE_ENV_VAR
from anomaly_pipeline.universe import Market, Universe

# Time for a source to publish a bar after it closes.
INTRADAY_DELAY = pd.Timedelta(minutes=3)
DAILY_DELAY = pd.Timedelta(minutes=30)
RETRAINING_CRON = "0 3 * * 0"
_CRON_WEEKDAYS = ("1", "2", "3", "4", "5", "6", "0")  # Monday first, as exchange weekmasks


@dataclass(frozen=True)
class IngestionTick:
    """What one ingestion tick does: the window it fetches, or why it skips."""

    window: str | None
    skip_reason: str | None = None


def ingestion_schedule_name(market: Market, interval: str) -> str:
    return f"ingest_{market.key_prefix}_{interval}_schedule"


def retraining_schedule_name(market: Market) -> str:
    return f"retrain_{market.key_prefix}_models_weekly"


def live_source_configured() -> bool:
    return os.environ.get(PRICE_SOURCE_ENV_VAR, "files") != "files"


def ingestion_cron(market: Market, interval: str) -> str:
    """Cron expression, in the market's timezone, of the interval's ingestion ticks."""
    spec = interval_spec(interval)
    if spec.bar_length >= pd.Timedelta(days=1):
        if market.calendar is None:
            return f"{int(DAILY_DELAY.total_seconds() // 60)} 0 * * *"
        close = _regular_time(market, "close") + DAILY_DELAY
        return f"{close.minute} {close.hour} * * {_cron_weekdays(market)}"

    bar_minutes = int(spec.bar_length.total_seconds() // 60)
    delay_minutes = int(INTRADAY_DELAY.total_seconds() // 60)
    alignment = _regular_time(market, "open").minute % bar_minutes if market.calendar else 0
    first = (alignment + delay_minutes) % bar_minutes
    grid = list(range(first, 60, bar_minutes))
    minutes = ",".join(str(minute) for minute in grid)
    if market.calendar is None:
        return f"{minutes} * * * *"
    # From the tick that collects the first bar to the one that collects the bar holding the
    # close, so the schedule does not tick all night.
    first_hour = _hour_of_next_tick(
        grid, _regular_time(market, "open") + spec.bar_length + INTRADAY_DELAY
    )
    last_hour = _hour_of_next_tick(grid, _regular_time(market, "close") + INTRADAY_DELAY)
    hours = f"{first_hour}-{last_hour}" if last_hour > first_hour else "*"
    return f"{minutes} {hours} * * {_cron_weekdays(market)}"


def ingestion_tick(
    market: Market, interval: str, universe: Universe, scheduled: pd.Timestamp
) -> IngestionTick:
    """The window an ingestion tick at ``scheduled`` fetches, or why it fetches nothing."""
    scheduled = pd.Timestamp(scheduled).tz_convert("UTC")
    spec = interval_spec(interval)
    local = scheduled.tz_convert(market.timezone)

    if spec.bar_length >= pd.Timedelta(days=1):
        session_date = _last_closed_session(market, scheduled - DAILY_DELAY)
        if session_date is None:
            return IngestionTick(
                None,
                f"{market.name}: no session closed in the day before "
                f"{local:%Y-%m-%d %H:%M %Z} (weekend or exchange holiday)",
            )
        bar_start = pd.Timestamp(session_date).tz_localize(market.timezone)
    else:
        bar_end = scheduled - INTRADAY_DELAY
        bar_start = bar_end - spec.bar_length
        if not _traded_between(market, bar_start, bar_end):
            return IngestionTick(
                None,
                f"{market.name}: no trading between {bar_start.tz_convert(market.timezone):%H:%M}"
                f" and {bar_end.tz_convert(market.timezone):%H:%M} on "
                f"{bar_end.tz_convert(market.timezone):%a %Y-%m-%d} ({market.timezone})",
            )

    window = bar_start.tz_convert(market.timezone).strftime(spec.window_format)
    partitions = bar_partitions(market, interval, universe.history_start[interval])
    if not window_dimension(partitions).has_partition_key(window):
        return IngestionTick(None, f"{market.name} {interval}: window {window} is not a partition")
    return IngestionTick(window)


def ingestion_run_requests(market: Market, interval: str, window: str) -> list[dg.RunRequest]:
    """One ranged run per ``MAX_PARTITIONS_PER_RUN`` tickers of the market, for one window."""
    requests = []
    for start in range(0, len(market.tickers), MAX_PARTITIONS_PER_RUN):
        tickers = market.tickers[start : start + MAX_PARTITIONS_PER_RUN]
        tags = {"anomaly_pipeline/window": window}
        first = str(partition_key_for(tickers[0], window))
        last = str(partition_key_for(tickers[-1], window))
        # Run keys are per tick for schedules: they keep one tick's runs apart, nothing more.
        run_key = f"{first}..{last}"
        if first == last:
            requests.append(dg.RunRequest(run_key=run_key, partition_key=first, tags=tags))
        else:
            tags[ASSET_PARTITION_RANGE_START_TAG] = first
            tags[ASSET_PARTITION_RANGE_END_TAG] = last
            requests.append(dg.RunRequest(run_key=run_key, tags=tags))
    return requests


def build_ingestion_schedule(
    market: Market, interval: str, universe: Universe
) -> dg.ScheduleDefinition:
    cron = ingestion_cron(market, interval)

    def evaluate(context: dg.ScheduleEvaluationContext):
        tick = ingestion_tick(market, interval, universe, context.scheduled_execution_time)
        if tick.window is None:
            yield dg.SkipReason(tick.skip_reason)
            return
        yield from ingestion_run_requests(market, interval, tick.window)

    return dg.ScheduleDefinition(
        name=ingestion_schedule_name(market, interval),
        cron_schedule=cron,
        execution_timezone=market.timezone,
        job=ingestion_job(market, interval),
        execution_fn=evaluate,
        default_status=_default_status(),
        description=(
            f"Fetches the current {interval} window of all {len(market.tickers)} {market.name} "
            f"ticker(s) and computes their features (cron `{cron}`, {market.timezone}). Ticks "
            "outside the exchange's sessions, holidays and weekends included, skip with the "
            "reason. Changed bars are then detected by the market's detection sensor."
        ),
    )


def build_retraining_schedule(market: Market) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=retraining_schedule_name(market),
        cron_schedule=RETRAINING_CRON,
        execution_timezone=market.timezone,
        job=retraining_job(market),
        default_status=_default_status(),
        description=(
            f"Retrains the {market.name} models ({', '.join(market.intervals)}) every Sunday at "
            f"03:00 {market.timezone} on all stored features. Unchanged data keeps the current "
            "version; a new version is re-detected on each ticker's latest window."
        ),
    )


def build_schedules(universe: Universe) -> list[dg.ScheduleDefinition]:
    schedules = [
        build_ingestion_schedule(market, interval, universe)
        for market, interval in universe.pairs()
    ]
    schedules += [build_retraining_schedule(market) for market in universe.markets.values()]
    return schedules


def _default_status() -> dg.DefaultScheduleStatus:
    return (
        dg.DefaultScheduleStatus.RUNNING
        if live_source_configured()
        else dg.DefaultScheduleStatus.STOPPED
    )


def _traded_between(market: Market, start: pd.Timestamp, end: pd.Timestamp) -> bool:
    """Whether the market traded at any moment of ``[start, end)``, lunch breaks excluded."""
    sessions = trading_sessions(market, start, end)
    if sessions.empty or market.calendar is None:
        return not sessions.empty
    schedule = exchange_calendar(market.calendar).schedule
    for label in sessions.index:
        break_start, break_end = schedule.at[label, "break_start"], schedule.at[label, "break_end"]
        if pd.notna(break_start) and start >= break_start and end <= break_end:
            continue
        return True
    return False


def _last_closed_session(market: Market, moment: pd.Timestamp) -> pd.Timestamp | None:
    """The date of the session that closed in the 24 hours up to ``moment``, if any."""
    sessions = trading_sessions(market, moment - pd.Timedelta(days=1), moment)
    closed = sessions[
        (sessions["close"] <= moment) & (sessions["close"] > moment - pd.Timedelta(days=1))
    ]
    if closed.empty:
        return None
    # Calendars label sessions by date; around-the-clock markets by the UTC midnight they open.
    return pd.Timestamp(closed.index[-1].date())


def _regular_time(market: Market, which: str) -> pd.Timestamp:
    """The market's current regular open or close time, on an arbitrary day."""
    calendar = exchange_calendar(market.calendar)
    times = calendar.open_times if which == "open" else calendar.close_times
    clock = times[-1][1]
    return pd.Timestamp(2000, 1, 3, clock.hour, clock.minute)


def _hour_of_next_tick(grid: list[int], moment: pd.Timestamp) -> int:
    """The hour of the first tick at or after ``moment``, ticks being at ``grid`` minutes."""
    for minute in grid:
        if minute >= moment.minute:
            return moment.hour
    return moment.hour + 1


def _cron_weekdays(market: Market) -> str:
    weekmask = exchange_calendar(market.calendar).weekmask
    return ",".join(
        day for day, open_ in zip(_CRON_WEEKDAYS, weekmask, strict=True) if open_ == "1"
    )
