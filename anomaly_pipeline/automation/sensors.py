"""Detection sensors: one per market, starting detection for exactly what changed.

A sensor reads stored state only and never polls a price source. Each evaluation asks:

1. Did the current model of one of the market's intervals change since the last evaluation?
   (One query on the small ``models`` collection.) If so, every ticker whose latest window was
   scored by another model gets that window marked pending, with a token naming the new model.
2. Which windows are pending? (One lookup on the sparse ``needs_detection`` index; an idle
   market has no entry in it.)

Pending windows are requested as few ranged runs as cover them exactly: windows with the same
run of consecutive tickers become one rectangle of partitions (one window of all tickers, or
one ticker's consecutive windows, or both), cut to at most ``MAX_PARTITIONS_PER_RUN`` each.
Each request's run key is derived from the partitions and their change tokens, so a tick
evaluated twice launches once, and the cursor remembers what was requested so the next tick
asks only for what is new. A request whose run ended while its windows are still pending is
made again, up to ``MAX_ATTEMPTS`` times in all: the run failed, or its worker died and Dagster's
run monitoring (when enabled in the instance) failed it after ``DETECTION_MAX_RUNTIME_SECONDS``.
Windows still pending after that stay visible in ``anomaly-pipeline status``.

One sensor per market, not one per market and interval or one overall: a market is what an
operator turns off (its source is down, its exchange is closed for a week), its tick history
reads as one story in the UI, its cursor stays as small as one market's pending work, and one
evaluation covers all of the market's intervals with the same two lookups.

State documents of tickers no longer in the universe, or of intervals a market no longer
lists, are skipped: their stored history and anomalies stay readable, but nothing is launched
for them.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    MAX_RUNTIME_SECONDS_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
)

from anomaly_pipeline.automation.jobs import detection_job, detection_job_name
from anomaly_pipeline.automation.state import DetectionState
from anomaly_pipeline.partitions import (
    MAX_PARTITIONS_PER_RUN,
    bar_partitions,
    partition_key_for,
    window_dimension,
)
from anomaly_pipeline.storage.mongo import MODELS, MongoResource
from anomaly_pipeline.universe import Market, Universe

MAX_ATTEMPTS = 3
MINIMUM_INTERVAL_SECONDS = 60
DETECTION_MAX_RUNTIME_SECONDS = 3600
_FINISHED = (
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
)


def detection_sensor_name(market: Market) -> str:
    return f"detect_{market.key_prefix}_sensor"


@dataclass(frozen=True)
class PendingWindow:
    """One pending partition as the sensor sees it."""

    interval: str
    ticker: str
    window: str
    token: str

    @property
    def partition_key(self) -> str:
        return str(partition_key_for(self.ticker, self.window))

    @property
    def ident(self) -> tuple[str, str]:
        return (self.interval, self.partition_key)


@dataclass
class RequestedRun:
    """A run request made by an earlier tick, and the pending windows it covers."""

    run_key: str
    attempt: int
    # (interval, partition key) -> change token
    windows: dict[tuple[str, str], str]


@dataclass
class DetectionCursor:
    """What the sensor already handled: model versions seen and runs requested."""

    models: dict[str, str] = field(default_factory=dict)
    requested: list[RequestedRun] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> DetectionCursor:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(
            models=dict(raw.get("models", {})),
            requested=[
                RequestedRun(
                    run_key=entry["run_key"],
                    attempt=entry["attempt"],
                    windows={(i, key): token for i, key, token in entry["windows"]},
                )
                for entry in raw.get("requested", [])
            ],
        )

    def serialize(self) -> str:
        return json.dumps(
            {
                "models": dict(sorted(self.models.items())),
                "requested": [
                    {
                        "run_key": run.run_key,
                        "attempt": run.attempt,
                        "windows": [[i, key, token] for (i, key), token in run.windows.items()],
                    }
                    for run in self.requested
                ],
            },
            sort_keys=True,
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class PartitionRectangle:
    """Consecutive tickers × consecutive windows, as indexes into the partition dimensions."""

    first_ticker: int
    last_ticker: int
    first_window: int
    last_window: int

    @property
    def size(self) -> int:
        return (self.last_ticker - self.first_ticker + 1) * (
            self.last_window - self.first_window + 1
        )


def cover_with_rectangles(
    cells: Iterable[tuple[int, int]], max_partitions: int = MAX_PARTITIONS_PER_RUN
) -> list[PartitionRectangle]:
    """Rectangles that cover exactly ``cells`` (ticker index, window index), none too large.

    Windows sharing a run of consecutive tickers merge when they are consecutive too, so a
    whole window of all tickers, or one ticker's consecutive windows, is one rectangle.
    """
    tickers_by_window: dict[int, list[int]] = defaultdict(list)
    for ticker, window in set(cells):
        tickers_by_window[window].append(ticker)

    windows_by_ticker_run: dict[tuple[int, int], list[int]] = defaultdict(list)
    for window, tickers in tickers_by_window.items():
        for run in _consecutive_runs(sorted(tickers)):
            windows_by_ticker_run[run].append(window)

    rectangles = []
    for (first_ticker, last_ticker), windows in sorted(windows_by_ticker_run.items()):
        for first_window, last_window in _consecutive_runs(sorted(windows)):
            rectangles.extend(
                _split(
                    PartitionRectangle(first_ticker, last_ticker, first_window, last_window),
                    max_partitions,
                )
            )
    return sorted(rectangles, key=lambda r: (r.first_window, r.first_ticker))


def _consecutive_runs(values: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def _split(rectangle: PartitionRectangle, max_partitions: int) -> list[PartitionRectangle]:
    pieces = []
    for ticker_start in range(rectangle.first_ticker, rectangle.last_ticker + 1, max_partitions):
        ticker_end = min(ticker_start + max_partitions - 1, rectangle.last_ticker)
        windows_per_piece = max(1, max_partitions // (ticker_end - ticker_start + 1))
        for window_start in range(
            rectangle.first_window, rectangle.last_window + 1, windows_per_piece
        ):
            window_end = min(window_start + windows_per_piece - 1, rectangle.last_window)
            pieces.append(PartitionRectangle(ticker_start, ticker_end, window_start, window_end))
    return pieces


class _WindowIndex:
    """The market's partition windows per interval as they stand at one evaluation.

    Built per evaluation, never cached on the sensor: a new month or year adds a window.
    """

    def __init__(self, market: Market, universe: Universe):
        self.market = market
        self.universe = universe
        self._keys: dict[str, list[str]] = {}
        self._positions: dict[str, dict[str, int]] = {}

    def keys(self, interval: str) -> list[str]:
        if interval not in self._keys:
            partitions = bar_partitions(
                self.market, interval, self.universe.history_start[interval]
            )
            self._keys[interval] = list(window_dimension(partitions).get_partition_keys())
            self._positions[interval] = {key: i for i, key in enumerate(self._keys[interval])}
        return self._keys[interval]

    def positions(self, interval: str) -> dict[str, int]:
        self.keys(interval)
        return self._positions[interval]


class MarketDetectionPlanner:
    """Decides, from stored state and the cursor, which detection runs one market needs."""

    def __init__(self, market: Market, universe: Universe, sensor_name: str):
        self.market = market
        self.universe = universe
        self.sensor_name = sensor_name
        self._tickers = set(market.tickers)
        self._ticker_index = {ticker: i for i, ticker in enumerate(market.tickers)}

    def evaluate(
        self,
        state: DetectionState,
        cursor: DetectionCursor,
        instance: dg.DagsterInstance,
    ) -> tuple[list[dg.RunRequest], DetectionCursor, list[str]]:
        """Run requests, the next cursor and one line per noteworthy decision."""
        windows = _WindowIndex(self.market, self.universe)
        notes: list[str] = []
        models = self._current_models(state)
        next_models = dict(cursor.models)
        for interval, (version, model_hash) in models.items():
            if cursor.models.get(interval) != version:
                marked = self._mark_for_new_model(state, windows, interval, version, model_hash)
                if marked:
                    notes.append(
                        f"{interval}: model {version} is current; {marked} ticker(s) get their "
                        "latest window re-detected"
                    )
                next_models[interval] = version

        pending = self._pending_windows(state, windows)
        waiting = [window for window in pending if window.interval not in models]
        if waiting:
            notes.append(
                f"{len(waiting)} pending window(s) wait for a first model of "
                + ", ".join(sorted({w.interval for w in waiting}))
            )
        pending_by_id = {w.ident: w for w in pending if w.interval in models}

        kept: list[RequestedRun] = []
        retry: list[tuple[PendingWindow, int]] = []
        covered: set[tuple[str, str]] = set()
        for run in cursor.requested:
            still_pending = {
                ident: token
                for ident, token in run.windows.items()
                if ident in pending_by_id and pending_by_id[ident].token == token
            }
            if not still_pending:
                continue
            covered.update(still_pending)
            if run.attempt < MAX_ATTEMPTS and self._run_finished(instance, run.run_key):
                retry.extend((pending_by_id[ident], run.attempt + 1) for ident in still_pending)
                notes.append(
                    f"run {run.run_key} ended with {len(still_pending)} window(s) still "
                    f"pending; requesting them again (attempt {run.attempt + 1})"
                )
                continue
            kept.append(RequestedRun(run.run_key, run.attempt, still_pending))

        fresh = [(w, 1) for ident, w in pending_by_id.items() if ident not in covered]
        requests, requested = self._requests(fresh + retry, windows)
        return requests, DetectionCursor(models=next_models, requested=kept + requested), notes

    def _current_models(self, state: DetectionState) -> dict[str, tuple[str, str]]:
        """Interval -> (version, sha256) of the market's current models."""
        current: dict[str, tuple[int, str, str]] = {}
        records = state.collection.database[MODELS].find(
            {"market": self.market.name}, {"interval": 1, "sequence": 1, "sha256": 1}
        )
        for record in records:
            interval = record["interval"]
            if interval in self.market.intervals and (
                interval not in current or record["sequence"] > current[interval][0]
            ):
                current[interval] = (record["sequence"], record["_id"], record["sha256"])
        return {interval: (version, sha) for interval, (_, version, sha) in current.items()}

    def _mark_for_new_model(
        self,
        state: DetectionState,
        windows: _WindowIndex,
        interval: str,
        version: str,
        model_hash: str,
    ) -> int:
        known = windows.positions(interval)
        stale = [
            document
            for document in state.pair_documents(self.market.name, interval)
            if document["ticker"] in self._tickers
            and document.get("latest_scored_window") in known
            and document.get("model_hash") != model_hash
        ]
        return state.mark_for_model(stale, version=version, model_hash=model_hash)

    def _pending_windows(self, state: DetectionState, windows: _WindowIndex) -> list[PendingWindow]:
        pending = []
        for document in state.pending_documents(self.market.name):
            interval = document["interval"]
            if document["ticker"] not in self._tickers or interval not in self.market.intervals:
                continue
            known = windows.positions(interval)
            for window, entry in (document.get("pending") or {}).items():
                if window in known:
                    pending.append(
                        PendingWindow(interval, document["ticker"], window, entry["token"])
                    )
        return pending

    def _run_finished(self, instance: dg.DagsterInstance, run_key: str) -> bool:
        records = instance.get_run_records(
            dg.RunsFilter(tags={RUN_KEY_TAG: run_key, SENSOR_NAME_TAG: self.sensor_name}),
            limit=1,
        )
        return bool(records) and records[0].dagster_run.status in _FINISHED

    def _requests(
        self, work: Sequence[tuple[PendingWindow, int]], windows: _WindowIndex
    ) -> tuple[list[dg.RunRequest], list[RequestedRun]]:
        groups: dict[tuple[str, int], list[PendingWindow]] = defaultdict(list)
        for window, attempt in work:
            groups[(window.interval, attempt)].append(window)

        requests, requested = [], []
        for (interval, attempt), members in sorted(groups.items()):
            positions = windows.positions(interval)
            window_keys = windows.keys(interval)
            by_cell = {(self._ticker_index[w.ticker], positions[w.window]): w for w in members}
            for rectangle in cover_with_rectangles(by_cell):
                covered = [
                    by_cell[(t, w)]
                    for w in range(rectangle.first_window, rectangle.last_window + 1)
                    for t in range(rectangle.first_ticker, rectangle.last_ticker + 1)
                ]
                first = partition_key_for(
                    self.market.tickers[rectangle.first_ticker],
                    window_keys[rectangle.first_window],
                )
                last = partition_key_for(
                    self.market.tickers[rectangle.last_ticker],
                    window_keys[rectangle.last_window],
                )
                run_key = _run_key(interval, str(first), str(last), covered, attempt)
                requests.append(self._run_request(interval, str(first), str(last), run_key))
                requested.append(
                    RequestedRun(run_key, attempt, {w.ident: w.token for w in covered})
                )
        return requests, requested

    def _run_request(self, interval: str, first: str, last: str, run_key: str) -> dg.RunRequest:
        tags = {
            "anomaly_pipeline/trigger": "changed bars or model",
            # With run monitoring on, a run whose worker died is failed after this long, and
            # a failed run's windows are requested again on the next tick.
            MAX_RUNTIME_SECONDS_TAG: str(DETECTION_MAX_RUNTIME_SECONDS),
        }
        if first == last:
            return dg.RunRequest(
                run_key=run_key,
                job_name=detection_job_name(self.market, interval),
                partition_key=first,
                tags=tags,
            )
        return dg.RunRequest(
            run_key=run_key,
            job_name=detection_job_name(self.market, interval),
            tags={
                **tags,
                ASSET_PARTITION_RANGE_START_TAG: first,
                ASSET_PARTITION_RANGE_END_TAG: last,
            },
        )


def _run_key(
    interval: str, first: str, last: str, windows: Sequence[PendingWindow], attempt: int
) -> str:
    tokens = "\n".join(sorted(f"{w.partition_key}@{w.token}" for w in windows))
    digest = hashlib.sha256(tokens.encode()).hexdigest()[:16]
    suffix = f":attempt-{attempt}" if attempt > 1 else ""
    return f"{interval}:{first}..{last}:{digest}{suffix}"


def build_detection_sensor(market: Market, universe: Universe) -> dg.SensorDefinition:
    name = detection_sensor_name(market)
    planner = MarketDetectionPlanner(market, universe, name)

    @dg.sensor(
        name=name,
        jobs=[detection_job(market, interval) for interval in market.intervals],
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        # Reads stored state only and launches nothing while nothing changed: safe to run always.
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Starts anomaly detection for {market.name} partitions whose stored bars changed, "
            "and re-detects each ticker's latest window when a new model becomes current. "
            "Reads only the pipeline's own state in MongoDB (collection `detection_metadata`), "
            "never a price source; with nothing new an evaluation is two index lookups."
        ),
    )
    def detection_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource):
        cursor = DetectionCursor.parse(context.cursor)
        state = DetectionState(mongo.get_database())
        requests, next_cursor, notes = planner.evaluate(state, cursor, context.instance)
        for note in notes:
            context.log.info(note)
        serialized = next_cursor.serialize()
        if not requests:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(notes[-1] if notes else f"nothing new for {market.name}"),
                cursor=serialized,
            )
        return dg.SensorResult(run_requests=requests, cursor=serialized)

    return detection_sensor


def detection_sensors(universe: Universe) -> list[dg.SensorDefinition]:
    return [build_detection_sensor(market, universe) for market in universe.markets.values()]
