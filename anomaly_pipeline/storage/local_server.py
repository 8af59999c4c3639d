"""The local MongoDB-wire server used when no ``MONGODB_URI`` is configured.

The server is SecantusDB, run as one long-lived process per pipeline home: its WiredTiger files
can be opened by one process only, while Dagster runs steps in several processes, so every
process connects to the same server by URI. The first process that needs the server starts it
under an exclusive file lock (so two processes never start two servers) and records its pid
and port in a state file that every later process reads. It runs until ``db stop``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pymongo
from pymongo.errors import PyMongoError

_START_TIMEOUT_SECONDS = 30.0


class LocalServerError(RuntimeError):
    """The local database server could not be started or reached."""


@dataclass(frozen=True)
class ServerState:
    pid: int
    port: int
    storage_path: str

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"


class LocalMongoServer:
    """Start, find and stop the SecantusDB server whose data lives under ``home``."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.storage_path = self.home / "mongodb"
        self.state_path = self.home / "mongodb-server.json"
        self.lock_path = self.home / "mongodb-server.lock"
        self.log_path = self.home / "mongodb-server.log"

    def ensure_running(self) -> str:
        """The URI of a running server, starting one if none answers."""
        state = self._read_state()
        if state and _answers(state):
            return state.uri
        with self._locked():
            # Another process may have started it while this one waited for the lock.
            state = self._read_state()
            if state and _answers(state):
                return state.uri
            return self._start().uri

    def running_state(self) -> ServerState | None:
        state = self._read_state()
        return state if state and _answers(state) else None

    def stop(self) -> bool:
        """Stop the server; False when none was running."""
        with self._locked():
            state = self._read_state()
            if state is None or not _pid_alive(state.pid):
                self.state_path.unlink(missing_ok=True)
                return False
            os.killpg(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _pid_alive(state.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(state.pid):
                os.killpg(state.pid, signal.SIGKILL)
            self.state_path.unlink(missing_ok=True)
            return True

    def data_size_bytes(self) -> int:
        if not self.storage_path.exists():
            return 0
        return sum(path.stat().st_size for path in self.storage_path.rglob("*") if path.is_file())

    def _start(self) -> ServerState:
        executable = _server_executable()
        self.storage_path.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        command = [
            executable,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--storage-path", str(self.storage_path),
            # Advertise a standalone server, as a plain mongod would: no replica set, so the
            # pipeline is exercised without multi-document transactions.
            "--standalone",
            "--log-level", "WARNING",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: the server outlives the command that started it and is not
                # hit by a Ctrl-C meant for that command.
                start_new_session=True,
                cwd=self.home,
            )
        state = ServerState(pid=process.pid, port=port, storage_path=str(self.storage_path))
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LocalServerError(
                    f"the local database server exited with code {process.returncode}; "
                    f"see {self.log_path}"
                )
            if _answers(state):
                self.state_path.write_text(json.dumps(state.__dict__))
                return state
            time.sleep(0.2)
        process.kill()
        raise LocalServerError(
            f"the local database server did not answer within {_START_TIMEOUT_SECONDS:.0f} s; "
            f"see {self.log_path}"
        )

    def _read_state(self) -> ServerState | None:
        try:
            return ServerState(**json.loads(self.state_path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    @contextmanager
    def _locked(self):
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _server_executable() -> str:
    beside_python = Path(sys.executable).parent / "secantusd-py"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("secantusd-py")
    if found is None:
        raise LocalServerError(
            "secantusd-py was not found; install the project (pip install -e .) or set MONGODB_URI"
        )
    return found


def _answers(state: ServerState) -> bool:
    if not _pid_alive(state.pid):
        return False
    client = pymongo.MongoClient(state.uri, serverSelectionTimeoutMS=1500)
    try:
        client.admin.command("ping")
        return True
    except PyMongoError:
        return False
    finally:
        client.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still accepts signal 0.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
