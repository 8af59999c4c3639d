"""Named points where a test can kill the process, to prove that writes survive a crash.

Setting ``ANOMALY_PIPELINE_KILL_AT=<name>`` makes the process SIGKILL itself when it reaches the
point of that name, exactly like a machine losing power there. Unset (always, outside tests),
a failpoint is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV_VAR = "ANOMALY_PIPELINE_KILL_AT"


def failpoint(name: str) -> None:
    if os.environ.get(KILL_AT_ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
