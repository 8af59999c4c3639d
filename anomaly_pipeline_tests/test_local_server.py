"""The local database server: one server per home however many processes ask at once."""

from __future__ import annotations

import subprocess
import sys

import pymongo

from anomaly_pipeline.storage.local_server import LocalMongoServer

START_SCRIPT = (
    "import sys; from pathlib import Path;"
    "from anomaly_pipeline.storage.local_server import LocalMongoServer;"
    "print(LocalMongoServer(Path(sys.argv[1])).ensure_running())"
)


def test_concurrent_starts_share_one_server_until_stopped(tmp_path):
    home = tmp_path / "home"
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", START_SCRIPT, str(home)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    uris = {starter.communicate(timeout=120)[0].strip() for starter in starters}
    server = LocalMongoServer(home)
    try:
        assert len(uris) == 1
        state = server.running_state()
        assert state is not None and state.uri in uris
        client = pymongo.MongoClient(state.uri, serverSelectionTimeoutMS=5000)
        client.demo.things.insert_one({"_id": 1})
        assert client.demo.things.count_documents({}) == 1
        client.close()
        # A later process finds the running server instead of starting another.
        assert server.ensure_running() == state.uri
    finally:
        assert server.stop() is True
    assert server.running_state() is None
    assert server.stop() is False
    # Data survives a restart: the storage directory is reopened intact.
    uri = server.ensure_running()
    try:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        assert client.demo.things.count_documents({}) == 1
        client.close()
    finally:
        server.stop()
