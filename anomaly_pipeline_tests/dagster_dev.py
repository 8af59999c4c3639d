"""A real ``dagster dev`` (webserver and daemon) in a process group of its own.

Used by the backfill tests and the backfill benchmark. ``dagster dev`` does not reliably exit on
SIGTERM, so it is stopped by signalling its whole group: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

# Runs share one SQLite instance on a small machine: two at a time keep SQLite from locking up
# and leave a core for the webserver and daemon; a short dequeue interval starts queued runs fast.
INSTANCE_SETTINGS = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: {max_concurrent_runs}
    dequeue_interval_seconds: 1
"""


@dataclass
class DagsterDev:
    url: str
    dagster_home: Path
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_instance_settings(dagster_home: Path, max_concurrent_runs: int = 2) -> None:
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(
        INSTANCE_SETTINGS.format(max_concurrent_runs=max_concurrent_runs)
    )


@contextmanager
def dagster_dev(
    workdir: Path,
    env: Mapping[str, str],
    *,
    max_concurrent_runs: int = 2,
    startup_timeout_seconds: float = 300.0,
    grace_seconds: float = 10.0,
) -> Iterator[DagsterDev]:
    """Start ``dagster dev`` on the pipeline's definitions with ``env`` and yield once the
    webserver answers ``/server_info``; the process group is ended on exit."""
    dagster_home = workdir / "dagster_home"
    write_instance_settings(dagster_home, max_concurrent_runs)
    port = free_port()
    log_path = workdir / "dagster_dev.log"
    command = [
        str(Path(sys.executable).parent / "dagster"),
        "dev",
        "-m",
        "anomaly_pipeline.definitions",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env={**env, "DAGSTER_HOME": str(dagster_home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = DagsterDev(f"http://127.0.0.1:{port}", dagster_home, log_path, process)
    try:
        _wait_for_server_info(server, startup_timeout_seconds)
        yield server
    finally:
        stop_process_group(process, grace_seconds)


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and _group_alive(process.pid):
        process.poll()
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_server_info(server: DagsterDev, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"dagster dev exited early:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/server_info", timeout=5) as response:
                if "dagster_webserver_version" in json.loads(response.read()):
                    return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"dagster dev did not answer within {timeout_seconds:.0f} s:\n{server.log_tail()}"
            )
        time.sleep(1.0)
