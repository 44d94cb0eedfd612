"""The prefaulter commits stack memory ahead of the writes, never changes it, and gets out of
the way where the kernel cannot do it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from _frames import put
from conftest import wait_until
from napari_hcs_stream import _prefault
from napari_hcs_stream._prefault import Prefaulter
from napari_hcs_stream.assembler import PlateAssembler

MIB = 1 << 20

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _supported() -> bool:
    probe = Prefaulter(ahead=4 * MIB)
    stack = np.zeros(8 * MIB, np.uint8)
    probe.advance(stack, 0)
    wait_until(lambda: probe.populated or not probe.enabled, timeout=10)
    probe.close()
    return probe.enabled


@pytest.fixture
def prefaulter() -> Prefaulter:
    if not sys.platform.startswith("linux") or not _supported():
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")
    p = Prefaulter(ahead=32 * MIB)
    yield p
    p.close()


@linux_only
def test_memory_ahead_of_the_writes_is_committed_and_no_further(prefaulter: Prefaulter) -> None:
    stack = np.zeros(256 * MIB, np.uint8)  # lazily allocated: nothing resident yet
    before = _rss()
    prefaulter.advance(stack, 8 * MIB)
    wait_until(lambda: prefaulter.populated >= 30 * MIB, timeout=30)
    grown = _rss() - before
    assert 28 * MIB <= grown <= 48 * MIB, grown  # the window, not the 256 MiB capacity
    assert prefaulter.populated <= 32 * MIB


@linux_only
def test_populating_never_changes_what_the_listener_writes(prefaulter: Prefaulter) -> None:
    stack = np.zeros((64, 1 << 19), np.uint16)  # 64 planes of 1 MiB
    for i in range(64):  # every write is followed by an advance, as in the assembler
        stack[i] = i + 1
        prefaulter.advance(stack, (i + 1) * stack.strides[0])
    wait_until(lambda: prefaulter.populated >= 56 * MIB, timeout=30)
    assert all((stack[i] == i + 1).all() for i in range(64))


@linux_only
def test_a_refusal_switches_it_off_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def refuse(addr: int, length: int, advice: int) -> int:
        calls.append(advice)
        return -1

    monkeypatch.setattr(_prefault, "_madvise", lambda: refuse)
    p = Prefaulter(ahead=8 * MIB)
    stack = np.zeros(64 * MIB, np.uint8)
    p.advance(stack, 0)
    wait_until(lambda: not p.enabled, timeout=10)
    assert calls == [_prefault.MADV_POPULATE_WRITE]
    p.advance(stack, 32 * MIB)  # ignored from now on
    assert p.populated == 0
    p.close()


def test_no_madvise_means_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_prefault, "_madvise", lambda: None)
    p = Prefaulter()
    assert not p.enabled
    p.advance(np.zeros(64 * MIB, np.uint8), 0)
    assert p._thread is None


@linux_only
def test_the_thread_ends_when_idle_and_comes_back(prefaulter: Prefaulter,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_prefault, "IDLE_EXIT_S", 0.05)
    stack = np.zeros(64 * MIB, np.uint8)
    prefaulter.advance(stack, 0)
    thread = prefaulter._thread
    assert thread is not None
    wait_until(lambda: prefaulter.populated >= 30 * MIB, timeout=30)
    wait_until(lambda: prefaulter._thread is None, timeout=10)
    thread.join(5)  # it has ended (other tests' assemblers may run threads of their own)
    assert not thread.is_alive()
    prefaulter.advance(stack, 40 * MIB)
    wait_until(lambda: prefaulter.populated >= 60 * MIB, timeout=30)


@linux_only
def test_a_freed_stack_is_forgotten(prefaulter: Prefaulter) -> None:
    stack = np.zeros(64 * MIB, np.uint8)
    prefaulter.advance(stack, 0)
    wait_until(lambda: prefaulter.populated >= 30 * MIB, timeout=30)
    del stack
    fresh = np.zeros(64 * MIB, np.uint8)  # may even reuse the old id()
    prefaulter.advance(fresh, 16 * MIB)
    wait_until(lambda: prefaulter.populated >= 60 * MIB, timeout=30)
    assert len(prefaulter._tracks) == 1


@linux_only
def test_the_assembler_reports_its_writes(prefaulter: Prefaulter) -> None:
    asm = PlateAssembler(max_bytes=1 << 30)
    assert asm.prefaulter is not None
    asm.prefaulter.close()
    asm.prefaulter = prefaulter
    frame = np.ones((512, 512), np.uint16)
    for w in range(20):  # 20 wells x 4 sites of 512 KiB: the stack grows past 8 MiB
        for s in range(4):
            put(asm, frame, well=f"A{w + 1:02d}", site=s)
    wait_until(lambda: prefaulter.populated > 0, timeout=30)
    assert PlateAssembler(prefault=False).prefaulter is None
