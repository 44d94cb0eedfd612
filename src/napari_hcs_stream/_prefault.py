"""Commit the memory of plate stacks ahead of the frames that will land there, off-thread.

A stack is allocated lazily (``np.zeros``: no memory is committed until written), so the
first frame written into each fresh page pays the kernel's page fault: zeroing the page, and
on a virtual machine the host backing it. With transparent huge pages that is one fault per
2 MiB, measured at 2-8 ms on the development VM, paid by the listener thread in the middle of
a plate while it should be copying frames.

:class:`Prefaulter` moves that work to a background thread, a little ahead of the writes:
after each commit the assembler reports how far into the stack frames have reached, and the
thread asks the kernel to populate the next few MiB (``madvise(MADV_POPULATE_WRITE)``, Linux
5.14+). Populating never changes memory contents, so it is safe while the listener writes
into the same pages, and it runs through ``ctypes`` without the GIL. Only a bounded window
beyond the furthest write is committed (``ahead`` bytes per stack), so memory held grows with
the data, not with a stack's spare capacity. Elsewhere (other systems, older kernels, a
sandbox that forbids it) it switches itself off after the first refusal and nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading
import weakref
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # linux/mman-common.h, since 5.14
PAGE = 4096
#: populate this much per system call (one huge page): short calls, so closing is prompt.
CHUNK = 2 << 20
#: committed ahead of the furthest write, per stack.
AHEAD = 16 << 20
#: stacks followed at once; older ones are forgotten. With AHEAD, at most 256 MiB is
#: committed ahead of the data (in practice one window per layer being streamed).
MAX_STACKS = 16
#: the thread ends after this long without work (and starts again when work comes).
IDLE_EXIT_S = 5.0


@functools.cache
def _madvise() -> Any:
    """libc's ``madvise`` through ctypes (the call releases the GIL), or None; looked up once
    (the process's own symbols hold libc: no library search, no subprocess)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class _Track:
    __slots__ = ("base", "done", "nbytes", "ref", "want")

    def __init__(self, stack: np.ndarray, start: int) -> None:
        self.ref = weakref.ref(stack)
        self.base = stack.ctypes.data
        self.nbytes = stack.nbytes
        self.done = start  # bytes from the stack's start known committed (or not our job)
        self.want = start


class Prefaulter:
    """One background thread committing stack memory ahead of the listener's writes.

    :meth:`advance` is cheap (a dict lookup and, now and then, a notify) and may be called
    from any thread; the work happens in the thread, started on demand and ended after
    :data:`IDLE_EXIT_S` without work, so an idle viewer keeps no extra thread.
    """

    def __init__(self, ahead: int = AHEAD, chunk: int = CHUNK) -> None:
        self.ahead = ahead
        self.chunk = chunk
        self.populated = 0  # bytes committed by the thread so far (for tests and logs)
        self._madvise = _madvise()
        self.enabled = self._madvise is not None
        self._tracks: dict[int, _Track] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def advance(self, stack: np.ndarray, end: int) -> None:
        """Frames of ``stack`` (a C-contiguous array) now reach ``end`` bytes from its start."""
        if not self.enabled:
            return
        key = id(stack)
        track = self._tracks.get(key)
        if track is None or track.ref() is not stack:  # new (or an id reused after a free)
            if not stack.flags.c_contiguous or stack.nbytes < 2 * self.chunk:
                return  # small stacks fault in quickly enough
            track = _Track(stack, end)
            with self._cond:
                self._tracks[key] = track
                while len(self._tracks) > MAX_STACKS:
                    del self._tracks[next(iter(self._tracks))]
        want = min(track.nbytes, end + self.ahead)
        if want >= track.want + self.chunk or (want == track.nbytes > track.want):
            with self._cond:
                track.want = want
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._run, name="hcs-prefault",
                                                    daemon=True)
                    self._thread.start()
                self._cond.notify()

    def close(self) -> None:
        """Stop the thread (it finishes at most one chunk); idempotent."""
        with self._cond:
            self._closed = True
            self._tracks.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    # -- the thread ------------------------------------------------------------------------------
    def _next(self) -> tuple[_Track, np.ndarray] | None:
        """The stack furthest behind its target, with a strong reference (held while the
        kernel works on its memory, so it cannot be freed meanwhile)."""
        best: tuple[int, _Track, np.ndarray] | None = None
        for key, track in list(self._tracks.items()):
            stack = track.ref()
            if stack is None:
                del self._tracks[key]
                continue
            behind = track.want - track.done
            if behind > 0 and (best is None or behind > best[0]):
                best = (behind, track, stack)
        return None if best is None else (best[1], best[2])

    def _run(self) -> None:
        madvise = self._madvise
        while True:
            with self._cond:
                while not self._closed and (work := self._next()) is None:
                    if not self._cond.wait(IDLE_EXIT_S) and self._next() is None:
                        self._thread = None  # idle: the next advance() starts a new one
                        return
                if self._closed or work is None:
                    return
                track, stack = work
                start, stop = track.done, min(track.want, track.done + self.chunk)
                track.done = stop
            first = -(-(track.base + start) // PAGE) * PAGE  # whole pages inside the stack
            last = (track.base + stop) // PAGE * PAGE
            if last > first and madvise(first, last - first, MADV_POPULATE_WRITE) != 0:
                errno = ctypes.get_errno()
                log.debug("prefaulting switched off: madvise failed with errno %d", errno)
                self.enabled = False
                with self._cond:
                    self._tracks.clear()
                return
            self.populated += max(0, last - first)
            del stack, work
