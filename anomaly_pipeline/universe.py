"""The universe file: which markets, tickers and intervals the pipeline watches.

Every Dagster asset, partition, schedule and sensor is built from this file, so adding a ticker
is an edit here and a code-location reload, never a code change. Each market entry is validated
on its own: a bad entry is reported with the file and key at fault, and the other markets load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
import yaml

from anomaly_pipeline.intervals import INTERVALS

PACKAGED_UNIVERSE = Path(__file__).parent / "config" / "sample_universe.yaml"
UNIVERSE_ENV_VAR = "ANOMALY_PIPELINE_UNIVERSE"

_MARKET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Yahoo symbols: letters, digits and the punctuation Yahoo uses for indexes (^GSPC), suffixes
# (PTT.BK, BRK-B) and pairs (EURUSD=X).
_TICKER = re.compile(r"^[A-Z0-9^][A-Z0-9.\-^=]*$")
_MARKET_KEYS = {"timezone", "calendar", "intervals", "tickers", "ticker_suffix"}
_FILE_KEYS = ("history_start", "markets")


class UniverseError(ValueError):
    """The universe file cannot be read at all (missing, not YAML, no markets mapping)."""


@dataclass(frozen=True)
class Market:
    """One market: its exchange timezone, trading calendar, intervals and tickers."""

    name: str
    timezone: str
    # exchange_calendars code (XNYS, XBKK, ...); None for markets that trade around the clock.
    calendar: str | None
    intervals: tuple[str, ...]
    tickers: tuple[str, ...]

    @property
    def key_prefix(self) -> str:
        """Lower-case form used in asset keys and group names."""
        return self.name.lower()


@dataclass(frozen=True)
class Universe:
    path: Path
    markets: dict[str, Market]
    history_start: dict[str, pd.Timestamp]
    # Market name (or file-level key) -> why that entry was not loaded.
    errors: dict[str, str] = field(default_factory=dict)

    def market_of(self, ticker: str) -> Market:
        for market in self.markets.values():
            if ticker in market.tickers:
                return market
        raise KeyError(f"ticker {ticker!r} is not in any market of {self.path}")

    def pairs(self) -> list[tuple[Market, str]]:
        """Every (market, interval) pair the universe declares, in file order."""
        return [
            (market, interval) for market in self.markets.values() for interval in market.intervals
        ]


def universe_path() -> Path:
    """The universe file in force: ``$ANOMALY_PIPELINE_UNIVERSE`` or the packaged sample."""
    configured = os.environ.get(UNIVERSE_ENV_VAR)
    return Path(configured).expanduser().resolve() if configured else PACKAGED_UNIVERSE


def load_universe(path: Path | str | None = None) -> Universe:
    """Read and validate a universe file; see the module docstring for the error policy."""
    path = Path(path) if path is not None else universe_path()
    return _load_universe_cached(path.resolve(), path.stat().st_mtime_ns if path.exists() else 0)


@lru_cache(maxsize=8)
def _load_universe_cached(path: Path, _mtime_ns: int) -> Universe:
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
        duplicates = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    except FileNotFoundError:
        raise UniverseError(f"{path}: universe file not found") from None
    except yaml.YAMLError as exc:
        raise UniverseError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("markets"), dict):
        raise UniverseError(f"{path}: expected a top-level 'markets' mapping")

    errors: dict[str, str] = {}
    # YAML keeps the last of two equal keys without a word; which entry was meant is unknown,
    # so the entry that holds the repeated key is not loaded.
    for key_path, lines in duplicates.items():
        parts = key_path.split(".")
        if parts == ["markets"]:
            raise UniverseError(
                f"{path}: markets is given {len(lines)} times (lines "
                f"{', '.join(map(str, lines))}); keep one"
            )
        owner = parts[1] if parts[0] == "markets" else parts[0]
        errors[owner] = (
            f"{path}: {key_path} is given {len(lines)} times (lines "
            f"{', '.join(map(str, lines))}); keep one"
        )
    for key in raw:
        if key not in _FILE_KEYS:
            errors[str(key)] = f"{path}: {key}: unknown key; expected {' and '.join(_FILE_KEYS)}"
    history_start = _parse_history_start(path, raw.get("history_start") or {}, errors)

    markets: dict[str, Market] = {}
    owner_of_ticker: dict[str, str] = {}
    owner_of_prefix: dict[str, str] = {}
    for name, entry in raw["markets"].items():
        if str(name) in errors:
            continue
        try:
            market = _parse_market(path, str(name), entry)
            # Asset keys and group names use the lower-case name: US and us would collide.
            if market.key_prefix in owner_of_prefix:
                raise UniverseError(
                    f"{path}: markets.{name}: same name as markets."
                    f"{owner_of_prefix[market.key_prefix]} apart from case"
                )
            for ticker in market.tickers:
                if ticker in owner_of_ticker:
                    raise UniverseError(
                        f"{path}: markets.{name}.tickers: {ticker} is already listed under "
                        f"markets.{owner_of_ticker[ticker]}"
                    )
        except UniverseError as exc:
            errors[str(name)] = str(exc)
            continue
        markets[market.name] = market
        owner_of_ticker.update({ticker: market.name for ticker in market.tickers})
        owner_of_prefix[market.key_prefix] = market.name

    return Universe(path=path, markets=markets, history_start=history_start, errors=errors)


def _parse_history_start(
    path: Path, raw: object, errors: dict[str, str]
) -> dict[str, pd.Timestamp]:
    starts = {name: pd.Timestamp(spec.default_history_start) for name, spec in INTERVALS.items()}
    if not isinstance(raw, dict):
        errors["history_start"] = f"{path}: history_start: expected a mapping of interval to date"
        return starts
    problems = []
    for interval, value in raw.items():
        if interval not in INTERVALS:
            problems.append(
                f"{path}: history_start.{interval}: unknown interval; expected one of "
                f"{', '.join(INTERVALS)}"
            )
            continue
        try:
            start = pd.Timestamp(str(value))
        except ValueError:
            start = pd.NaT
        if start is pd.NaT:
            problems.append(f"{path}: history_start.{interval}: {value!r} is not a date")
            continue
        starts[interval] = start
    if problems:
        errors["history_start"] = "; ".join(filter(None, [errors.get("history_start"), *problems]))
    return starts


def _parse_market(path: Path, name: str, entry: object) -> Market:
    where = f"{path}: markets.{name}"
    if not _MARKET_NAME.match(name):
        raise UniverseError(f"{where}: market names must be letters, digits and underscores")
    if not isinstance(entry, dict):
        raise UniverseError(f"{where}: expected a mapping with timezone, intervals and tickers")
    unknown = set(entry) - _MARKET_KEYS
    if unknown:
        raise UniverseError(f"{where}.{sorted(unknown)[0]}: unknown key")

    timezone = entry.get("timezone")
    if not isinstance(timezone, str):
        raise UniverseError(f"{where}.timezone: required, e.g. America/New_York")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise UniverseError(f"{where}.timezone: unknown timezone {timezone!r}") from None

    calendar = entry.get("calendar")
    if calendar is not None:
        import exchange_calendars

        if calendar not in exchange_calendars.get_calendar_names():
            raise UniverseError(f"{where}.calendar: unknown exchange calendar {calendar!r}")

    intervals = entry.get("intervals")
    if not isinstance(intervals, list) or not intervals:
        raise UniverseError(f"{where}.intervals: expected a non-empty list such as [15m, 1h, 1d]")
    for interval in intervals:
        if not isinstance(interval, str) or interval not in INTERVALS:
            raise UniverseError(
                f"{where}.intervals: unknown interval {interval!r}; expected {', '.join(INTERVALS)}"
            )

    tickers = entry.get("tickers")
    if not isinstance(tickers, list) or not tickers:
        raise UniverseError(f"{where}.tickers: expected a non-empty list of symbols")
    suffix = entry.get("ticker_suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise UniverseError(f"{where}.ticker_suffix: expected text such as '.BK'")
    seen: set[str] = set()
    for ticker in tickers:
        if not isinstance(ticker, str) or not _TICKER.match(ticker):
            raise UniverseError(
                f"{where}.tickers: {ticker!r} is not a Yahoo symbol (upper-case letters, digits, "
                "'.', '-', '^', '=')"
            )
        if "..." in ticker:
            # Dagster reads '...' in a partition key as a range: A...B would break every asset.
            raise UniverseError(f"{where}.tickers: {ticker!r} holds '...', which Yahoo never uses")
        if suffix and not ticker.endswith(suffix):
            raise UniverseError(f"{where}.tickers: {ticker} lacks the market suffix {suffix!r}")
        if ticker in seen:
            raise UniverseError(f"{where}.tickers: {ticker} is listed twice")
        seen.add(ticker)

    return Market(
        name=name,
        timezone=timezone,
        calendar=calendar,
        intervals=tuple(dict.fromkeys(intervals)),
        tickers=tuple(tickers),
    )


def _duplicate_keys(node: yaml.Node | None, prefix: str = "") -> dict[str, list[int]]:
    """Dotted paths of mapping keys given more than once, with the 1-based line of each."""
    found: dict[str, list[int]] = {}
    if isinstance(node, yaml.MappingNode):
        lines_by_key: dict[str, list[int]] = {}
        for key_node, value_node in node.value:
            key_path = f"{prefix}{key_node.value}"
            lines_by_key.setdefault(key_path, []).append(key_node.start_mark.line + 1)
            found.update(_duplicate_keys(value_node, f"{key_path}."))
        found.update({key: lines for key, lines in lines_by_key.items() if len(lines) > 1})
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found.update(_duplicate_keys(item, prefix))
    return found
