""""Stream a demo plate" from inside napari: ``napari-hcs-stream demo`` in a background process.

The demo's pipeline streams into the widget's own endpoint. The widget listens before the
process starts, so the demo finds this viewer and never launches another napari. A viewer that
admits only authorized producers (beyond loopback) hands its key to the process; this
machine's own producer key is always authorized. The process's output goes to a log file in
the runtime folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ..auth import ENV_SERVER_KEY
from ..endpoints import runtime_dir

#: a plate that streams in a few seconds: 96 wells, 2 sites, 4 channels of 256x256.
DEMO_ARGS = ("--wells", "96", "--sites", "2", "--size", "256")


def spawn_demo(endpoint: str, args: Sequence[str] = DEMO_ARGS,
               server_key: str = "") -> tuple[subprocess.Popen[bytes], Path]:
    """Start the demo pipeline streaming into ``endpoint``; returns the process and its log."""
    env = dict(os.environ)
    if server_key:
        env[ENV_SERVER_KEY] = server_key
    log_path = runtime_dir() / f"demo-{os.getpid()}.log"
    cmd = [sys.executable, "-m", "napari_hcs_stream", "demo", "--endpoint", endpoint, *args]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    return proc, log_path
