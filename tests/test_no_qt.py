"""The pipeline side works on a worker with no GUI stack: Qt and napari cannot be imported.

A fresh interpreter gets an import blocker (installed before anything else through a
``sitecustomize`` on its path) that makes every Qt binding, napari and its GUI helpers
unimportable; the transport modules import there, and a publish reaches a receiver.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKED = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt",
           "vispy", "pytestqt")

SITECUSTOMIZE = f"""
import sys
BLOCKED = {BLOCKED!r}

class NoGui:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is blocked: the pipeline side must not need it")
        return None

sys.meta_path.insert(0, NoGui())
"""

SCRIPT = """
import sys, threading
import numpy as np

try:
    import qtpy  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker is not active")

import napari_hcs_stream
import napari_hcs_stream.publisher
from napari_hcs_stream import auth, control, endpoints, protocol, receiver, ring  # noqa: F401
from napari_hcs_stream import assembler, labels, overview, platemap  # noqa: F401
from napari_hcs_stream.publisher import Publisher
from napari_hcs_stream.receiver import Receiver

got = []
rec = Receiver("noqt", on_frame=lambda h, a: got.append(a.copy()))
stop, bound = threading.Event(), threading.Event()

def listen():
    rec.bind()
    bound.set()
    while not stop.is_set():
        rec.poll(20)
    rec.close()

thread = threading.Thread(target=listen)
thread.start()
bound.wait(20)
with Publisher("noqt", strict=True, strict_timeout=20) as pub:
    ok = pub.publish(np.arange(12, dtype=np.uint16).reshape(3, 4), well="A01")
for _ in range(2000):
    if got:
        break
    thread.join(0.01)
stop.set()
thread.join(20)
assert ok and got and (got[0] == np.arange(12).reshape(3, 4)).all(), (ok, got)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("OK")
"""


def test_pipeline_side_needs_no_qt_and_no_napari(tmp_path: Path, runtime_dir: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "NAPARI_HCS_STREAM_RUNTIME_DIR": str(runtime_dir)}
    result = subprocess.run([sys.executable, "-c", f"BLOCKED = {BLOCKED!r}\n" + SCRIPT],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
