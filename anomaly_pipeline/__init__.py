"""Anomalous price bars found with Dagster, with an audit trail of how each one was found."""

import warnings

from dagster import BetaWarning

# Two beta Dagster APIs are used on purpose: ranged backfills (backfill_policy) and the
# per-dimension mapping that lets features read the previous window's prices. Their beta notice
# would otherwise print once per asset on every load.
warnings.filterwarnings(
    "ignore",
    message=r"(Parameter `backfill_policy`|Class `MultiPartitionMapping`)",
    category=BetaWarning,
)
