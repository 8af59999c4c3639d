"""Traceability definitions: the asset checks on stored data and the failed-run audit sensor.

Successful detections are audited by the anomalies asset itself (see ``anomaly_pipeline.audit``);
this area adds what runs outside the assets.
"""

from __future__ import annotations

import dagster as dg

from anomaly_pipeline.audit_sensor import build_failed_run_audit_sensor
from anomaly_pipeline.checks import build_asset_checks
from anomaly_pipeline.universe import Universe


def build_traceability_definitions(universe: Universe) -> dg.Definitions:
    return dg.Definitions(
        asset_checks=build_asset_checks(universe),
        sensors=[build_failed_run_audit_sensor(universe)],
    )
