"""Stack memory that grows along its first axis without moving.

A plate stack grows geometrically as wells arrive, and the well is its first axis. With
``np.zeros`` each growth allocates a new array and copies every frame received so far into
it: for a 1536-well plate the last growth copies 1024 wells (2 GiB per layer of 512x512
frames, four sites), in the listener thread, and briefly holds both copies in memory. On the
development VM, where touching fresh memory costs the host up to 10 ms per 2 MiB, the growths
at wells 17, 33 and 65 of the benchmark plate stalled the listener for 0.4-0.9 s each.

In C order, a stack whose first axis grows keeps every existing element at the same byte
offset. So a stack is made over an anonymous mapping with address space reserved up to the
assembler's memory cap (``MAP_NORESERVE``: nothing is committed until written, and unwritten
pages stay out of the process's memory), and growing it along the first axis is a new array
over the same mapping: no copy, no second copy in memory, no stall. Growth along any other
axis, or of the item shape, changes the layout and still copies (:func:`grow_in_place` returns
None). Where the reservation is refused (a strict overcommit policy, an address-space limit,
another system) the stack is a plain ``np.zeros`` and everything works as before.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import sys

import numpy as np

log = logging.getLogger(__name__)

#: ``MAP_NORESERVE`` (Linux); Python's mmap module does not name it before 3.13.
MAP_NORESERVE = 0x4000
#: stacks smaller than this start as plain arrays: copying them when they grow is cheap.
MIN_STACK = 256 << 10


def _reserve(nbytes: int) -> mmap.mmap | None:
    """An anonymous, zero-filled, lazily committed mapping of ``nbytes``, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        log.debug("no address space reserved for a stack of %d bytes: %s", nbytes, exc)
        return None
    if hasattr(mmap, "MADV_HUGEPAGE"):  # as numpy asks for its own large arrays
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_HUGEPAGE)
    return mm


def zeros(shape: tuple[int, ...], dtype: np.dtype | str, reserve: int) -> np.ndarray:
    """A zero-filled C-ordered stack of ``shape`` that can later grow in place along its first
    axis up to ``reserve`` bytes (at least its own size), or a plain ``np.zeros``."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    mm = _reserve(max(nbytes, reserve)) if nbytes >= MIN_STACK else None
    if mm is None:
        return np.zeros(shape, dtype=dtype)
    return np.ndarray(shape, dtype=dtype, buffer=mm)


def grow_in_place(old: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``old`` with a larger first axis, over the same memory, if its layout allows it."""
    mm = old.base
    if (not isinstance(mm, mmap.mmap) or len(shape) != old.ndim or shape[1:] != old.shape[1:]
            or shape[0] < old.shape[0] or not old.flags.c_contiguous):
        return None
    if math.prod(shape) * old.dtype.itemsize > len(mm):
        return None  # beyond the reservation (the memory cap was raised since)
    return np.ndarray(shape, dtype=old.dtype, buffer=mm)


def reserved(stack: np.ndarray) -> int:
    """Bytes of address space behind ``stack`` if it can grow in place, else 0."""
    mm = stack.base
    return len(mm) if isinstance(mm, mmap.mmap) else 0
