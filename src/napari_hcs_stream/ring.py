"""The producer-owned shared-memory ring and the receiver's reader.

Why a ring: creating and unlinking one segment per image costs milliseconds (page faults,
``shm_open``/``unlink``, tracker traffic); a ring is created once per publisher and its slots
are reused, so a local frame costs one copy in (producer) and one copy out (receiver).

Flow control never blocks the producer for long: a slot is reused only once the receiver has
written ``consumed == generation`` for it, or it was released unsent, or it has been in flight
longer than ``reclaim_age`` (then a late reader sees a generation mismatch: a *torn* read that
is counted and never shown). The byte layout is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import struct
import sys
import time
from collections import OrderedDict
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from .endpoints import pid_alive
from .protocol import SEGMENT_RE, ProtocolError, ShmRef

MAGIC = b"HCSRING1"
LAYOUT_VERSION = 1
HEADER_BYTES = 64
LINE_BYTES = 64
PAGE = 4096
SEGMENT_PREFIX = "hcs_"
_HEADER = struct.Struct("<8sIIQQQ")  # magic, layout version, nslots, slot_bytes, pid, data_offset
#: u64 word of the header (after the fields above) where the producer adds up the nanoseconds
#: it spent waiting for a free slot: how much the receiver holds it back (0: never).
_WAITED_WORD = _HEADER.size // 8
_WORDS = LINE_BYTES // 8  # u64 words per slot control line
_FREE, _RESERVED, _IN_FLIGHT = 0, 1, 2
SHM_DIR = Path("/dev/shm")


class TornRead(Exception):
    """The slot was rewritten before or while it was copied: the copy is garbage."""


class SegmentError(ProtocolError):
    """A shared-memory reference that cannot be honoured (vanished, not a ring, out of bounds)."""


def align(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def copy_pixels(dest: np.ndarray, src: np.ndarray) -> None:
    """``np.copyto(dest, src)``, but without giving up the GIL for plain C-ordered buffers.

    numpy releases the GIL around a large copy. In napari's process the main thread runs
    Python most of the time (slicing, drawing), and a thread that gave the GIL up waits up to
    the interpreter's switch interval (5 ms) to get it back: the listener's 50 us copy of a
    512x512 frame then cost milliseconds, and ingest ran at a sixth of its speed
    (``benchmarks/viewer.py``). A memoryview assignment is the same ``memcpy``, done holding
    the GIL. Anything else (strides, byte swapping, casting) goes to numpy.
    """
    if (dest.dtype == src.dtype and dest.shape == src.shape and dest.flags.c_contiguous
            and src.flags.c_contiguous and dest.flags.writeable):
        try:
            dest.data.cast("B")[:] = src.data.cast("B")
            return
        except (TypeError, ValueError, NotImplementedError):  # a format memoryview lacks
            pass
    np.copyto(dest, src, casting="equiv")


def copy_bytes(dest: memoryview, src: memoryview) -> None:
    """``memcpy`` between C-contiguous buffers of the same size, holding the GIL."""
    dest.cast("B")[:] = src.cast("B")


#: byte orders whose bytes are already the wire's (little-endian)
_WIRE_ORDER = ("<", "|", "=") if sys.byteorder == "little" else ("<", "|")
#: views kept per mapped ring; a producer changing sizes or shapes all the time starts over
_MAX_VIEWS = 64
_NOTHING = np.empty(0, np.uint8)


class _SlotViews:
    """Cached views of a mapped ring's slots, made once rather than per frame: raw bytes for
    the plain copy, typed arrays for what numpy has to do (strides, byte swapping)."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self._raw: dict[tuple[int, int], memoryview] = {}
        self._typed: dict[tuple[int, np.dtype, tuple[int, ...]], np.ndarray] = {}

    def raw(self, offset: int, nbytes: int) -> memoryview:
        view = self._raw.get((offset, nbytes))
        if view is None:
            if len(self._raw) >= _MAX_VIEWS:
                self._release_raw()
            view = self._raw[offset, nbytes] = self._data[offset:offset + nbytes].data
        return view

    def typed(self, offset: int, wire: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        view = self._typed.get((offset, wire, shape))
        if view is None:
            if len(self._typed) >= _MAX_VIEWS:
                self._typed.clear()
            nbytes = wire.itemsize * int(np.prod(shape))
            view = self._typed[offset, wire, shape] = self._data[
                offset:offset + nbytes].view(wire).reshape(shape)
        return view

    def _release_raw(self) -> None:
        for view in self._raw.values():
            view.release()
        self._raw.clear()

    def close(self) -> None:
        """Before unmapping: no view, and not this object, may keep the mapping exported."""
        self._release_raw()
        self._typed.clear()
        self._data = _NOTHING


def new_segment_name(pid: int | None = None) -> str:
    """``hcs_<pid>_<8 hex>``: the pid lets a sweeper tell a dead owner's leftovers apart."""
    return f"{SEGMENT_PREFIX}{os.getpid() if pid is None else pid}_{secrets.token_hex(4)}"


class ShmRing:
    """A fixed set of equal slots in one segment, written by the one process that owns it."""

    def __init__(self, slot_bytes: int, nslots: int = 16, *, reclaim_age: float = 2.0) -> None:
        if nslots < 1 or slot_bytes < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        self.nslots = nslots
        self.slot_bytes = align(slot_bytes)
        self.data_offset = align(HEADER_BYTES + nslots * LINE_BYTES)
        self.reclaim_age = reclaim_age
        self.reclaimed = 0  # slots taken back from a receiver that never acknowledged them
        size = self.data_offset + nslots * self.slot_bytes
        self._owner = os.getpid()
        self._shm = shared_memory.SharedMemory(new_segment_name(), create=True, size=size)
        self.name: str = self._shm.name.lstrip("/")
        self.name_bytes = self.name.encode()
        self.size = size
        buf = self._shm.buf
        assert buf is not None
        _HEADER.pack_into(buf, 0, MAGIC, LAYOUT_VERSION, nslots, self.slot_bytes, self._owner,
                          self.data_offset)
        self._ctrl: memoryview | None = buf[HEADER_BYTES:HEADER_BYTES + nslots * LINE_BYTES].cast(
            "Q")
        self._header: memoryview | None = buf[:HEADER_BYTES].cast("Q")
        self._data: np.ndarray | None = np.frombuffer(buf, np.uint8)
        self._state = [_FREE] * nslots
        self._since = [0.0] * nslots
        self._slots = _SlotViews(self._data)
        self._cursor = 0

    def slot_offset(self, slot: int) -> int:
        return self.data_offset + slot * self.slot_bytes

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self._state if s != _FREE)

    def pending(self) -> int:
        """Slots sent but not yet copied out by the receiver."""
        ctrl = self._ctrl
        if ctrl is None:
            return 0
        return sum(1 for i, s in enumerate(self._state)
                   if s == _IN_FLIGHT and ctrl[i * _WORDS + 1] != ctrl[i * _WORDS])

    def _usable(self, i: int, ctrl: memoryview) -> bool:
        state = self._state[i]
        if state == _FREE:
            return True
        if state != _IN_FLIGHT:
            return False
        if ctrl[i * _WORDS + 1] == ctrl[i * _WORDS]:  # the receiver finished copying it
            return True
        if time.monotonic() - self._since[i] > self.reclaim_age:
            self.reclaimed += 1
            return True
        return False

    def _scan(self) -> int | None:
        ctrl = self._ctrl
        assert ctrl is not None, "the ring is closed"
        n, state, i = self.nslots, self._state, self._cursor
        for _ in range(n):
            s = state[i]
            # the common cases inline (free, or copied out by the receiver); the rest decided
            # by _usable (which also reclaims a slot held too long)
            if s == _FREE or (s == _IN_FLIGHT and ctrl[i * _WORDS + 1] == ctrl[i * _WORDS]) \
                    or self._usable(i, ctrl):
                state[i] = _RESERVED
                self._cursor = i + 1 if i + 1 < n else 0
                return i
            i = i + 1 if i + 1 < n else 0
        return None

    def acquire(self, timeout: float = 0.0) -> int | None:
        """A slot to write, waiting at most ``timeout`` s; None when the receiver is behind."""
        slot = self._scan()
        if slot is not None or timeout <= 0:
            return slot
        header = self._header
        assert header is not None, "the ring is closed"
        last = time.monotonic_ns()
        deadline = last + int(timeout * 1e9)
        spins = 0
        while True:
            # yield twice, then nap: spinning would steal the CPU the receiver needs
            spins += 1
            time.sleep(0 if spins < 3 else 0.0001)
            slot = self._scan()
            now = time.monotonic_ns()
            header[_WAITED_WORD] += now - last  # tells the receiver it holds us back
            last = now
            if slot is not None or now >= deadline:
                return slot

    @property
    def waited_ns(self) -> int:
        """Nanoseconds spent so far waiting for the receiver to free a slot."""
        return 0 if self._header is None else int(self._header[_WAITED_WORD])

    def write(self, slot: int, array: np.ndarray) -> tuple[int, int]:
        """Copy ``array`` (any strides, any byte order) into ``slot`` as little-endian C order.

        Returns ``(offset, generation)`` for the header. The generation is odd while copying,
        so a reader can always tell a stable slot from one being rewritten.
        """
        ctrl, data = self._ctrl, self._data
        assert ctrl is not None and data is not None, "the ring is closed"
        if array.nbytes > self.slot_bytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.slot_bytes}-byte slot")
        off = self.data_offset + slot * self.slot_bytes
        src = array.data
        gi = slot * _WORDS
        gen = ctrl[gi] + 1
        ctrl[gi] = gen  # odd: being written
        if src.c_contiguous and array.dtype.byteorder in _WIRE_ORDER:
            copy_bytes(self._slots.raw(off, array.nbytes), src)  # the common case
        else:  # strides, or a byte order to swap: numpy does it
            copy_pixels(self._slots.typed(off, array.dtype.newbyteorder("<"), array.shape),
                        array)
        gen += 1
        ctrl[gi] = gen  # even: stable
        self._state[slot] = _IN_FLIGHT
        self._since[slot] = time.monotonic()
        return off, gen

    def release(self, slot: int) -> None:
        """The slot's frame was never sent: it may be reused at once."""
        self._state[slot] = _FREE

    def reclaim_all(self) -> None:
        """The receiver went away: nothing in flight will ever be acknowledged."""
        self._state = [_FREE] * self.nslots

    def close(self) -> None:
        """Unmap and (in the owning process) unlink; idempotent."""
        if self._ctrl is None:
            return
        self._ctrl.release()
        self._ctrl = None
        if self._header is not None:
            self._header.release()
            self._header = None
        self._data = None
        self._slots.close()
        with contextlib.suppress(BufferError):
            self._shm.close()
        if os.getpid() == self._owner:
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()

    def __enter__(self) -> ShmRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Mapping:
    """One attached segment: its layout read from its own header and checked."""

    def __init__(self, name: str) -> None:
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR) if SHM_DIR.is_dir() else _shm_open(name)
        except FileNotFoundError:
            raise SegmentError(f"shared-memory segment {name} has vanished "
                               "(did the producer exit?)") from None
        except OSError as exc:
            raise SegmentError(f"cannot open shared-memory segment {name}: {exc}") from None
        try:
            self.size = os.fstat(fd).st_size
            if self.size < HEADER_BYTES:
                raise SegmentError(f"shared-memory segment {name} is too small to be a ring")
            # no MAP_POPULATE: mmap() keeps the GIL while it maps (and, for the slots the
            # producer has not written yet, allocates) every page: 65-280 ms for a 64 MiB ring,
            # when napari's main thread cannot run and the producer's first frames wait. Pages
            # fault in as slots are first read: about 35 us more for a 512 KiB slot, once.
            self._mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        magic, version, nslots, slot_bytes, self.pid, data_offset = _HEADER.unpack_from(
            self._mm, 0)
        ok = (magic == MAGIC and version == LAYOUT_VERSION and 1 <= nslots <= 65536
              and slot_bytes % PAGE == 0 and data_offset == align(HEADER_BYTES + nslots
                                                                  * LINE_BYTES)
              and data_offset + nslots * slot_bytes <= self.size)
        if not ok:
            self._mm.close()
            raise SegmentError(f"shared-memory segment {name} is not an hcs ring of layout "
                               f"{LAYOUT_VERSION} (bad header)")
        self.nslots, self.slot_bytes, self.data_offset = nslots, slot_bytes, data_offset
        self.ctrl: memoryview = memoryview(self._mm)[
            HEADER_BYTES:HEADER_BYTES + nslots * LINE_BYTES].cast("Q")
        self.header: memoryview = memoryview(self._mm)[:HEADER_BYTES].cast("Q")
        self.data: np.ndarray = np.frombuffer(self._mm, np.uint8)
        self.slots = _SlotViews(self.data)

    @property
    def waited_ns(self) -> int:
        return int(self.header[_WAITED_WORD])

    def close(self) -> None:
        self.ctrl.release()
        self.header.release()
        self.slots.close()
        del self.data
        with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it later
            self._mm.close()


def _shm_open(name: str) -> int:  # pragma: no cover - platforms without /dev/shm (macOS)
    import _posixshmem

    return int(_posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600))


class RingReader:
    """The receiver's side: attaches segments by name, copies out, never unlinks.

    Segments are mapped with plain ``mmap`` rather than ``SharedMemory`` so that attaching
    never registers them with this process's resource tracker (which would unlink a producer's
    ring when the viewer exits, or fight the producer's own tracker).
    """

    def __init__(self, max_segments: int = 256) -> None:
        self.max_segments = max_segments
        self._maps: OrderedDict[str, _Mapping] = OrderedDict()

    @property
    def names(self) -> list[str]:
        return list(self._maps)

    def _attach(self, name: str) -> _Mapping:
        m = self._maps.get(name)
        if m is None:
            if not SEGMENT_RE.fullmatch(name):
                raise SegmentError(f"{name!r} is not a segment name of ours")
            m = _Mapping(name)
            self._maps[name] = m
            if len(self._maps) > self.max_segments:
                self._maps.popitem(last=False)[1].close()
        return m

    def copy_into(self, ref: ShmRef, dest: np.ndarray, wire: np.dtype | None = None) -> None:
        """Copy the slot into ``dest``, raising :class:`TornRead` if it was rewritten.

        ``wire``: the little-endian form of ``dest.dtype`` (computed when not given).
        Every bound is checked against the segment's own header before memory is touched.
        """
        m = self._maps.get(ref.segment)
        if m is None:
            m = self._attach(ref.segment)
        slot, offset, nbytes = ref.slot, ref.offset, ref.nbytes
        if slot >= m.nslots:
            raise SegmentError(f"slot {slot} is outside segment {ref.segment} "
                               f"({m.nslots} slots)")
        if offset != m.data_offset + slot * m.slot_bytes:
            raise SegmentError(f"offset {offset} is not the start of slot {slot} in "
                               f"segment {ref.segment}")
        if nbytes > m.slot_bytes:
            raise SegmentError(f"{nbytes} bytes do not fit slot {slot} of "
                               f"{m.slot_bytes} bytes in {ref.segment}")
        if dest.nbytes != nbytes:
            raise ValueError(f"destination holds {dest.nbytes} bytes, the slot {nbytes}")
        if wire is None:
            wire = dest.dtype.newbyteorder("<")
        ctrl, gi, gen = m.ctrl, slot * _WORDS, ref.generation
        if ctrl[gi] != gen:
            raise TornRead("overwritten before it was read")
        out = dest.data
        if out.c_contiguous and not out.readonly and dest.dtype == wire:
            # the common case: the wire's bytes are the destination's bytes (a plain memcpy,
            # holding the GIL: see copy_pixels)
            copy_bytes(out, m.slots.raw(offset, nbytes))
        else:  # strides, or a byte order to swap: numpy does it
            copy_pixels(dest, m.slots.typed(offset, wire, dest.shape))
        if ctrl[gi] != gen:
            raise TornRead("overwritten while copying")
        ctrl[gi + 1] = gen  # consumed: the producer may reuse the slot

    def waited_ns(self, name: str) -> int:
        """Nanoseconds the owner of segment ``name`` has waited so far for a free slot (0 if
        the segment is not attached, or its producer does not count)."""
        m = self._maps.get(name)
        return 0 if m is None else m.waited_ns

    def release(self, name: str) -> None:
        m = self._maps.pop(name, None)
        if m is not None:
            m.close()

    def close(self) -> None:
        for name in list(self._maps):
            self.release(name)


def sweep_stale_segments() -> list[str]:
    """Unlink our segments whose owner pid is gone; returns the names swept.

    Only files of this user named ``hcs_<pid>_<token>`` are considered, and only when that pid
    no longer exists. Producers in another pid namespace sharing ``/dev/shm`` would look dead:
    set ``NAPARI_HCS_STREAM_SWEEP=0`` there. Without ``/dev/shm`` (macOS) nothing is swept.
    """
    if os.environ.get("NAPARI_HCS_STREAM_SWEEP", "1") == "0" or not SHM_DIR.is_dir():
        return []
    swept = []
    uid = os.getuid()
    for path in SHM_DIR.iterdir():
        name = path.name
        if not SEGMENT_RE.fullmatch(name):
            continue
        pid = int(name.split("_")[1])
        try:
            if path.stat().st_uid != uid or pid_alive(pid):
                continue
            path.unlink()
        except (FileNotFoundError, PermissionError):
            continue
        swept.append(name)
    return swept
