"""Partition backfills of one market and interval: which partitions to ask Dagster for, and
launching and following the backfill through a running webserver's GraphQL API."""
