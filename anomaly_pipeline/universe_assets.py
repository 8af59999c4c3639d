"""The universe file as an asset: what the pipeline watches, and which entries were left out.

A bad market entry in the universe file is skipped so that the other markets still load; this
asset is where a person sees that in the Dagster UI, and why. Its description lists every
rejected entry with the file and key at fault, materializing it fails while any entry is
rejected, and its check fails with the same list. Once the file is fixed and the code location
reloaded, the missing market's assets appear and both pass.
"""

import hashlib

import dagster as dg
import pandas as pd

from anomaly_pipeline.universe import Universe

UNIVERSE_ASSET_KEY = dg.AssetKey("universe")
UNIVERSE_CHECK_NAME = "every_entry_loaded"


def build_universe_definitions(universe: Universe) -> dg.Definitions:
    """The ``universe`` asset and its check, describing ``universe`` as it was loaded."""
    problems = universe_problems(universe)
    problems_markdown = _problems_markdown(problems)

    @dg.asset(
        key=UNIVERSE_ASSET_KEY,
        group_name="universe",
        kinds={"yaml"},
        description=_description(universe, problems),
        metadata={
            "universe_file": dg.MetadataValue.path(str(universe.path)),
            "markets_loaded": dg.MetadataValue.int(len(universe.markets)),
            "rejected_entries": dg.MetadataValue.int(len(problems)),
            "problems": dg.MetadataValue.md(problems_markdown),
        },
    )
    def universe_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        if problems:
            for entry, message in problems.items():
                context.log.error(f"universe entry {entry} not loaded: {message}")
            raise dg.Failure(
                description=(
                    f"{len(problems)} entr{'y' if len(problems) == 1 else 'ies'} of "
                    f"{universe.path} could not be loaded; their assets are missing until the "
                    "file is fixed and the code location reloaded:\n"
                    + "\n".join(f"- {message}" for message in problems.values())
                ),
                metadata={"problems": dg.MetadataValue.md(problems_markdown)},
            )
        context.log.info(
            f"{len(universe.markets)} market(s) and "
            f"{sum(len(m.tickers) for m in universe.markets.values())} ticker(s) loaded from "
            f"{universe.path}"
        )
        return dg.MaterializeResult(
            metadata={
                "universe_file": dg.MetadataValue.path(str(universe.path)),
                "markets": dg.MetadataValue.md(_markets_table(universe)),
                "tickers": dg.MetadataValue.int(
                    sum(len(m.tickers) for m in universe.markets.values())
                ),
            },
            data_version=dg.DataVersion(_file_digest(universe)),
        )

    @dg.asset_check(
        asset=UNIVERSE_ASSET_KEY,
        name=UNIVERSE_CHECK_NAME,
        description=(
            "Passes when every entry of the universe file was loaded; fails with the file, the "
            "key and the reason for each entry that was skipped."
        ),
    )
    def every_entry_loaded() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            passed=not problems,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                "every entry loaded"
                if not problems
                else f"{len(problems)} entr{'y' if len(problems) == 1 else 'ies'} not loaded"
            ),
            metadata={
                "rejected_entries": dg.MetadataValue.int(len(problems)),
                "problems": dg.MetadataValue.md(problems_markdown),
            },
        )

    return dg.Definitions(assets=[universe_asset], asset_checks=[every_entry_loaded])


def universe_problems(universe: Universe) -> dict[str, str]:
    """Every rejected entry (a market name or a file-level key) and why, in name order."""
    return dict(sorted(universe.errors.items()))


def _description(universe: Universe, problems: dict[str, str]) -> str:
    loaded = ", ".join(
        f"{market.name} ({len(market.tickers)} ticker{'s' if len(market.tickers) != 1 else ''}; "
        f"{', '.join(market.intervals)})"
        for market in universe.markets.values()
    )
    text = (
        f"The universe file `{universe.path}`: the markets, tickers and intervals every other "
        f"asset is built from. Loaded: {loaded or 'no markets'}."
    )
    if not problems:
        return text
    return (
        f"{text}\n\n**{len(problems)} entr{'y was' if len(problems) == 1 else 'ies were'} not "
        "loaded; their assets are missing until the file is fixed and the code location "
        f"reloaded.** Materializing or checking this asset fails until then.\n\n"
        f"{_problems_markdown(problems)}"
    )


def _problems_markdown(problems: dict[str, str]) -> str:
    if not problems:
        return "No problems: every entry was loaded."
    return "\n".join(f"- **{entry}**: {message}" for entry, message in problems.items())


def _markets_table(universe: Universe) -> str:
    rows = [
        {
            "market": market.name,
            "timezone": market.timezone,
            "calendar": market.calendar or "(trades around the clock)",
            "intervals": ", ".join(market.intervals),
            "tickers": ", ".join(market.tickers),
        }
        for market in universe.markets.values()
    ]
    if not rows:
        return "No markets loaded."
    return pd.DataFrame(rows).to_markdown(index=False)


def _file_digest(universe: Universe) -> str:
    try:
        return hashlib.sha256(universe.path.read_bytes()).hexdigest()
    except OSError:
        # The file may have moved since the code location loaded; the version then says so.
        return "unreadable"
