"""Fixtures shared by every test.

Every test checks that it left no shared-memory segment of ours behind in ``/dev/shm``: a
segment that outlives its owner's intent is a bug, whichever test made it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from napari_hcs_stream.endpoints import pid_alive

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "hcs_"


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name.split("_")[1])
    except (IndexError, ValueError):
        return False
    return pid != os.getpid() and pid_alive(pid)  # our own segments always count


def our_segments() -> set[str]:
    """Segments this test run is answerable for: ours, or left by a process that is gone.

    A segment whose owner is another live process (say, a second test run on the same
    machine) is that process's business, not a leak of ours.
    """
    if not SHM_DIR.is_dir():
        return set()
    return {
        p.name for p in SHM_DIR.iterdir()
        if p.name.startswith(SEGMENT_PREFIX) and not _owner_alive(p.name)
    }


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, message: str = ""):
    """Wait for a condition with a deadline (tests never sleep a fixed time to wait)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {message or predicate}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def shm_clean() -> Iterator[None]:
    """Fail a test that leaves a segment of ours in /dev/shm (waiting briefly for exits)."""
    before = our_segments()
    yield
    try:
        wait_until(lambda: not (our_segments() - before), timeout=10.0)
    except AssertionError:
        leaked = sorted(our_segments() - before)
        for name in leaked:  # do not let one leak fail every later test too
            (SHM_DIR / name).unlink(missing_ok=True)
        pytest.fail(f"shared-memory segments leaked: {leaked}")


@pytest.fixture
def runtime_dir(tmp_path_factory, monkeypatch) -> Path:
    """A private discovery/runtime folder so tests never see each other's (or a user's) viewers."""
    path = tmp_path_factory.mktemp("run", numbered=True)
    path.chmod(0o700)
    monkeypatch.setenv("NAPARI_HCS_STREAM_RUNTIME_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def keys_dir(tmp_path_factory, monkeypatch) -> Path:
    """A private CURVE key folder per test: tests never read or make a user's keys."""
    path = tmp_path_factory.mktemp("keys", numbered=True)
    monkeypatch.setenv("NAPARI_HCS_STREAM_KEYS_DIR", str(path))
    monkeypatch.delenv("NAPARI_HCS_STREAM_SERVER_KEY", raising=False)
    return path


@pytest.fixture(params=["libzmq", "pyzmq"])
def recv_mode(request, monkeypatch) -> str:
    """Headers received through libzmq with the GIL held (what a receiver bound off the main
    thread does where libzmq is reachable) or through pyzmq (in the main thread, and the
    fallback everywhere else): every receiver test that takes this runs both ways."""
    from napari_hcs_stream._gilrecv import _lib
    from napari_hcs_stream.receiver import Receiver

    if request.param == "libzmq" and _lib() is None:
        pytest.skip("libzmq is not reachable through ctypes here")
    monkeypatch.setattr(Receiver, "keep_gil", request.param == "libzmq")
    return request.param
