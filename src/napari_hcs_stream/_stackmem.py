"""Stack memory that grows along its outermost axis without moving.

A plate stack grows geometrically as wells arrive, and the well is its first axis. With
``np.zeros`` each growth allocates a new array and copies every frame received so far into
it: for a 1536-well plate the last growth copies 1024 wells (2 GiB per layer of 512x512
frames, four sites), in the listener thread, and briefly holds both copies in memory. On the
development VM, where touching fresh memory costs the host up to 10 ms per 2 MiB, the growths
at wells 17, 33 and 65 of the benchmark plate stalled the listener for 0.4-0.9 s each.

A stack whose memory-outermost axis grows keeps every existing element at the same byte
offset. So a stack is made over an anonymous mapping with address space reserved up to the
assembler's memory cap (``MAP_NORESERVE``: nothing is committed until written, and unwritten
pages stay out of the process's memory), and growing it along that axis is a new array over
the same mapping: no copy, no second copy in memory, no stall. The well axis starts
outermost. Growth along another axis (time in a time-lapse, once every well has its first
frame) copies once into a new stack laid out with *that* axis outermost (numpy strides; the
item axes stay innermost and contiguous), so its later growths are in place too. Growth of the
item shape always copies (:func:`grow_in_place` returns None). Where the reservation is
refused (a strict overcommit policy, an address-space limit, another system) the stack is a
plain ``np.zeros`` and every growth copies, as before.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import sys
from collections.abc import Iterable

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


def _order(ndim: int, outer: int) -> tuple[int, ...]:
    """Memory order of a stack's axes: ``outer`` first, the rest as they come."""
    return (outer, *(a for a in range(ndim) if a != outer))


def _over(mm: mmap.mmap, shape: tuple[int, ...], dtype: np.dtype, outer: int) -> np.ndarray:
    """An array of ``shape`` over ``mm`` whose axis ``outer`` is outermost in memory."""
    order = _order(len(shape), outer)
    memory = np.ndarray(tuple(shape[a] for a in order), dtype=dtype, buffer=mm)
    return memory if outer == 0 else memory.transpose(np.argsort(order))


def zeros(shape: tuple[int, ...], dtype: np.dtype | str, reserve: int,
          outer: int = 0) -> np.ndarray:
    """A zero-filled stack of ``shape`` that can later grow in place along axis ``outer`` (laid
    out outermost in memory) up to ``reserve`` bytes (at least its own size), or a plain
    C-ordered ``np.zeros`` where no address space can be reserved."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    mm = _reserve(max(nbytes, reserve)) if nbytes >= MIN_STACK else None
    if mm is None:
        return np.zeros(shape, dtype=dtype)
    return _over(mm, shape, dtype, outer)


def memory(stack: np.ndarray) -> np.ndarray:
    """The array that views of ``stack`` name as their ``base``: the C-ordered array over the
    stack's memory (the stack itself unless its axes are laid out in another order)."""
    base = stack.base
    return base if isinstance(base, np.ndarray) else stack


def grow_in_place(old: np.ndarray, shape: tuple[int, ...], outer: int) -> np.ndarray | None:
    """``old`` grown along axis ``outer`` only (the axis outermost in its memory), over the
    same memory; None if anything else changed, the layout differs, or it would not fit."""
    base = memory(old)
    mm = base.base
    order = _order(old.ndim, outer)
    if (not isinstance(mm, mmap.mmap) or len(shape) != old.ndim or shape[outer] < old.shape[outer]
            or any(shape[a] != old.shape[a] for a in range(old.ndim) if a != outer)
            or base.shape != tuple(old.shape[a] for a in order)
            or not base.flags.c_contiguous):
        return None
    if math.prod(shape) * old.dtype.itemsize > len(mm):
        return None  # beyond the reservation (the memory cap was raised since)
    return _over(mm, shape, old.dtype, outer)


def reserved(stack: np.ndarray) -> int:
    """Bytes of address space behind ``stack`` if it can grow in place, else 0."""
    mm = memory(stack).base
    return len(mm) if isinstance(mm, mmap.mmap) else 0


def shrink_in_place(old: np.ndarray, shape: tuple[int, ...], outer: int,
                    keep: tuple[slice, ...], slots: Iterable[tuple[int, ...]]) -> np.ndarray | None:
    """``old`` with each item cut to ``item[keep]``, over the same memory; None unless ``old``
    is over a mapping in its own layout (then the caller copies into new memory).

    ``shape``: the new stack's (the same leading axes, the item axes as ``keep`` leaves them;
    ``keep`` indexes one item). ``slots``: the leading indices of the items written so far;
    every other item of the result is blank. Fresh memory costs the development VM several ms
    per 2 MiB to touch, and a copy of a whole plate into it stalled the listener for seconds
    (a 1 GiB stack: 0.77 s, the copy itself 0.1 s). Here items move toward the start of the
    memory, in memory order: item ``i`` lands below where item ``i`` started (its old place
    only for the first item, which is copied out first), so nothing is overwritten before it
    is read. The memory past the new end is given back to the system (``MADV_DONTNEED``),
    which also leaves it blank for later growth in place.

    Views of ``old`` see the moved bytes, not ``old``'s items, from the first write on:
    readers must switch to the result (napari redraws a frame later)."""
    base = memory(old)
    mm = base.base
    order = _order(old.ndim, outer)
    lead = old.ndim - len(keep)
    if (not isinstance(mm, mmap.mmap) or len(shape) != old.ndim or outer >= lead
            or base.shape != tuple(old.shape[a] for a in order)
            or not base.flags.c_contiguous or tuple(shape[:lead]) != old.shape[:lead]):
        return None
    new = _over(mm, shape, old.dtype, outer)
    src = base.reshape((-1, *base.shape[lead:]))
    dst = memory(new).reshape((-1, *memory(new).shape[lead:]))
    src_bytes, dst_bytes = src[0].nbytes, dst[0].nbytes
    capacity = tuple(old.shape[a] for a in order[:lead])
    written = {int(np.ravel_multi_index(tuple(s[a] for a in order[:lead]), capacity))
               for s in slots}
    for i in range(len(dst)):
        if i in written:
            dst[i] = src[i][keep].copy() if i == 0 else src[i][keep]
        elif any(j in written for j in {i * dst_bytes // src_bytes,
                                        ((i + 1) * dst_bytes - 1) // src_bytes}):
            dst[i] = 0  # an item never written, over bytes of one that was
    high = (max(written) + 1) * src_bytes if written else 0
    start = -(-new.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = min(len(mm), -(-high // mmap.PAGESIZE) * mmap.PAGESIZE)
    if stop > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError, AttributeError):
            np.frombuffer(mm, np.uint8, stop - start, start)[:] = 0
    end = min(start, len(mm))  # the rest of the last page
    if end > new.nbytes:
        np.frombuffer(mm, np.uint8, end - new.nbytes, new.nbytes)[:] = 0
    return new
