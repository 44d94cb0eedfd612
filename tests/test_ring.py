"""The shared-memory ring: layout, flow control, torn-read detection, bounds, sweeping."""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from conftest import wait_until
from napari_hcs_stream import ring as ring_module
from napari_hcs_stream.protocol import ShmRef
from napari_hcs_stream.ring import (
    MAGIC,
    RingReader,
    SegmentError,
    ShmRing,
    TornRead,
    sweep_stale_segments,
)


def ref(ring: ShmRing, slot: int, nbytes: int, gen: int) -> ShmRef:
    return ShmRef(ring.name, ring.slot_offset(slot), nbytes, slot, gen)


@pytest.fixture
def ring() -> ShmRing:
    with ShmRing(10_000, 4) as r:
        yield r


@pytest.fixture
def reader() -> RingReader:
    rd = RingReader()
    yield rd
    rd.close()


def test_layout_is_as_documented(ring: ShmRing) -> None:
    assert ring.name.startswith(f"hcs_{os.getpid()}_")
    data = Path("/dev/shm", ring.name).read_bytes()
    magic, version, nslots, slot_bytes, pid, data_offset = struct.unpack_from("<8sIIQQQ", data)
    assert (magic, version, nslots, pid) == (MAGIC, 1, 4, os.getpid())
    assert slot_bytes == 12288  # rounded up to whole pages
    assert data_offset == 4096  # 64-byte header + 4 x 64-byte lines, page aligned
    assert len(data) == data_offset + 4 * slot_bytes
    assert ring.slot_offset(3) == 4096 + 3 * 12288
    a = np.arange(100, dtype=np.uint16).reshape(10, 10)
    slot = ring.acquire()
    offset, gen = ring.write(slot, a)
    data = Path("/dev/shm", ring.name).read_bytes()
    generation, consumed = struct.unpack_from("<QQ", data, 64 + slot * 64)
    assert (generation, consumed, gen) == (2, 0, 2)
    assert data[offset:offset + 200] == a.astype("<u2").tobytes()


def test_round_trip_any_layout_into_little_endian(ring: ShmRing, reader: RingReader) -> None:
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    for a in (base, base.astype(">i4"), base[:, ::2], base.T):
        slot = ring.acquire()
        offset, gen = ring.write(slot, a)
        dest = np.empty(a.shape, np.int32)
        reader.copy_into(ShmRef(ring.name, offset, a.nbytes, slot, gen), dest)
        np.testing.assert_array_equal(dest, a)


def test_slots_are_reused_only_once_consumed_or_released(reader: RingReader) -> None:
    with ShmRing(4096, 2) as ring:
        a = np.ones((8, 8), np.uint8)
        s0 = ring.acquire()
        g0 = ring.write(s0, a)[1]
        s1 = ring.acquire()
        ring.write(s1, a)
        assert ring.acquire() is None  # both in flight, nothing acknowledged
        assert ring.pending() == 2
        reader.copy_into(ref(ring, s0, 64, g0), np.empty((8, 8), np.uint8))
        assert ring.acquire() == s0  # consumed -> reusable
        ring.release(s0)  # dropped before sending -> reusable at once
        assert ring.acquire() == s0
        assert ring.acquire() is None
        ring.reclaim_all()  # the viewer went away
        assert ring.acquire() is not None


def test_acquire_waits_at_most_its_timeout() -> None:
    with ShmRing(4096, 1) as ring:
        ring.write(ring.acquire(), np.zeros(4, np.uint8).reshape(2, 2))
        start = time.monotonic()
        assert ring.acquire(timeout=0.05) is None
        assert 0.04 < time.monotonic() - start < 0.5


def test_time_spent_waiting_for_a_slot_is_added_up_in_the_header(reader: RingReader) -> None:
    with ShmRing(4096, 1) as ring:
        slot = ring.acquire()
        assert ring.acquire(timeout=0) is None and ring.waited_ns == 0  # no wait, no time
        gen = ring.write(slot, np.zeros((2, 2), np.uint8))[1]
        start = time.monotonic_ns()
        assert ring.acquire(timeout=0.05) is None
        elapsed = time.monotonic_ns() - start
        assert 0.04e9 < ring.waited_ns <= elapsed
        word = struct.unpack_from("<Q", Path("/dev/shm", ring.name).read_bytes(), 40)[0]
        assert word == ring.waited_ns  # documented place: the u64 after the header fields
        reader.copy_into(ref(ring, slot, 4, gen), np.empty((2, 2), np.uint8))
        assert reader.waited_ns(ring.name) == ring.waited_ns
        assert ring.acquire(timeout=0.05) == slot  # consumed: no wait
        assert reader.waited_ns(ring.name) == word
    assert reader.waited_ns("hcs_1_00000000") == 0  # not attached


def test_unacknowledged_slots_are_reclaimed_after_an_age(reader: RingReader) -> None:
    with ShmRing(4096, 1, reclaim_age=0.05) as ring:
        a = np.zeros((2, 2), np.uint8)
        slot = ring.acquire()
        gen = ring.write(slot, a)[1]
        slot2 = wait_until(lambda: ring.acquire() == 0 and 1, timeout=5)
        assert slot2 and ring.reclaimed == 1
        ring.write(0, a + 1)
        # the late reader sees the slot was rewritten: torn, never shown
        with pytest.raises(TornRead, match="before it was read"):
            reader.copy_into(ref(ring, slot, 4, gen), np.empty((2, 2), np.uint8))


def test_overwrite_before_read_is_torn(ring: ShmRing, reader: RingReader) -> None:
    a = np.zeros((10, 10), np.uint16)
    slot = ring.acquire()
    gen = ring.write(slot, a)[1]
    ring.write(slot, a + 1)  # the producer reuses the slot before the viewer copies
    with pytest.raises(TornRead, match="overwritten before it was read"):
        reader.copy_into(ref(ring, slot, 200, gen), np.empty((10, 10), np.uint16))


def test_overwrite_while_copying_is_torn(ring: ShmRing, reader: RingReader,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a = np.zeros((10, 10), np.uint16)
    slot = ring.acquire()
    gen = ring.write(slot, a)[1]

    raced: list[bool] = []

    def copy_racing_the_producer(dest: memoryview, src: memoryview) -> None:
        dest.cast("B")[:] = src.cast("B")
        if not raced:  # the reader's copy: the producer gets in while it runs
            raced.append(True)
            ring.write(slot, a + 1)

    monkeypatch.setattr(ring_module, "copy_bytes", copy_racing_the_producer)
    with pytest.raises(TornRead, match="overwritten while copying"):
        reader.copy_into(ref(ring, slot, 200, gen), np.empty((10, 10), np.uint16))
    monkeypatch.undo()
    assert ring.pending() == 1  # never acknowledged


def test_bounds_are_checked_before_touching_memory(ring: ShmRing, reader: RingReader) -> None:
    dest = np.empty((10, 10), np.uint16)
    with pytest.raises(SegmentError, match="slot 4 is outside"):
        reader.copy_into(ShmRef(ring.name, ring.slot_offset(3) + 12288, 200, 4, 2), dest)
    with pytest.raises(SegmentError, match="is not the start of slot 1"):
        reader.copy_into(ShmRef(ring.name, ring.slot_offset(1) + 8, 200, 1, 2), dest)
    big = np.empty(20000, np.uint8)
    with pytest.raises(SegmentError, match="20000 bytes do not fit slot"):
        reader.copy_into(ShmRef(ring.name, ring.slot_offset(0), 20000, 0, 2), big)
    with pytest.raises(ValueError, match="destination holds 200 bytes"):
        reader.copy_into(ShmRef(ring.name, ring.slot_offset(0), 100, 0, 2), dest)


def test_vanished_and_foreign_segments(reader: RingReader) -> None:
    dest = np.empty(4, np.uint8)
    with pytest.raises(SegmentError, match=r"hcs_1_00000000 has vanished \(did the producer"):
        reader.copy_into(ShmRef("hcs_1_00000000", 4096, 4, 0, 2), dest)
    with pytest.raises(SegmentError, match="not a segment name of ours"):
        reader.copy_into(ShmRef("../etc/passwd", 4096, 4, 0, 2), dest)
    name = f"hcs_{os.getpid()}_0badf00d"
    shm = shared_memory.SharedMemory(name, create=True, size=8192)
    try:
        with pytest.raises(SegmentError, match="is not an hcs ring"):
            reader.copy_into(ShmRef(name, 4096, 4, 0, 2), dest)
    finally:
        shm.close()
        shm.unlink()


def test_reader_never_unlinks(ring: ShmRing) -> None:
    reader = RingReader()
    slot = ring.acquire()
    gen = ring.write(slot, np.ones((2, 2), np.uint8))[1]
    reader.copy_into(ref(ring, slot, 4, gen), np.empty((2, 2), np.uint8))
    assert reader.names == [ring.name]
    reader.release(ring.name)
    reader.close()
    assert Path("/dev/shm", ring.name).exists()
    ring.close()
    ring.close()  # idempotent
    assert not Path("/dev/shm", ring.name).exists()


def test_attaching_touches_only_the_slots_read(reader: RingReader) -> None:
    """Populating the whole mapping at attach time kept the GIL (``mmap.mmap`` with
    ``MAP_POPULATE``) for tens of ms and allocated every slot not yet written: napari's main
    thread froze once per new producer. Pages are mapped as slots are read instead."""
    with ShmRing(1 << 20, 64) as ring:  # 64 MiB of slots
        blocks = Path("/dev/shm", ring.name).stat().st_blocks
        a = np.ones((512, 1024), np.uint16)
        slot = ring.acquire()
        gen = ring.write(slot, a)[1]
        dest = np.empty_like(a)
        reader.copy_into(ref(ring, slot, a.nbytes, gen), dest)
        np.testing.assert_array_equal(dest, a)
        allocated = (Path("/dev/shm", ring.name).stat().st_blocks - blocks) * 512
        assert allocated <= 2 << 20  # the slot written, not the ring


def _exit_at_once() -> None:
    pass


def test_sweep_removes_only_dead_owners_segments() -> None:
    proc = mp.get_context("spawn").Process(target=_exit_at_once)
    proc.start()
    proc.join(30)
    dead = Path("/dev/shm", f"hcs_{proc.pid}_deadbeef")
    dead.write_bytes(b"x")
    with ShmRing(4096, 1) as alive:
        swept = sweep_stale_segments()
        assert dead.name in swept
        assert not dead.exists()
        assert Path("/dev/shm", alive.name).exists()
        assert alive.name not in swept


def test_sweep_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = mp.get_context("spawn").Process(target=_exit_at_once)
    proc.start()
    proc.join(30)
    dead = Path("/dev/shm", f"hcs_{proc.pid}_deadbeef")
    dead.write_bytes(b"x")
    try:
        monkeypatch.setenv("NAPARI_HCS_STREAM_SWEEP", "0")
        assert sweep_stale_segments() == []
        assert dead.exists()
    finally:
        dead.unlink()


@pytest.mark.parametrize("dtype", ["uint8", "<u2", ">u2", "float32", "int32", "bool", "float16"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_copy_pixels_copies_every_layout_exactly(dtype: str, layout: str) -> None:
    src = (np.arange(6 * 8) % 7).astype(dtype).reshape(6, 8)
    if layout == "strided":
        src = src[:, ::2]
    dest = np.zeros(src.shape, np.dtype(dtype).newbyteorder("="))
    ring_module.copy_pixels(dest, src)
    np.testing.assert_array_equal(dest, src)


def test_copy_pixels_refuses_what_numpy_refuses() -> None:
    dest = np.zeros((4, 4), np.uint16)
    dest.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ring_module.copy_pixels(dest, np.ones((4, 4), np.uint16))
    with pytest.raises(TypeError):  # float into int is not a byte-order change
        ring_module.copy_pixels(np.zeros((4, 4), np.uint16), np.ones((4, 4), np.float32))


@pytest.mark.parametrize("dest_kind", ["contiguous", "strided", "big-endian", "fortran"])
def test_copy_into_any_destination_layout(ring: ShmRing, reader: RingReader,
                                          dest_kind: str) -> None:
    """Plain destinations take a byte copy; the others go through numpy, same values."""
    a = (np.arange(12 * 10) * 7).astype(np.uint16).reshape(12, 10)
    slot = ring.acquire()
    gen = ring.write(slot, a)[1]
    if dest_kind == "strided":
        dest = np.zeros((12, 20), np.uint16)[:, ::2]
    elif dest_kind == "big-endian":
        dest = np.zeros((12, 10), ">u2")
    elif dest_kind == "fortran":
        dest = np.zeros((12, 10), np.uint16, order="F")
    else:
        dest = np.zeros((12, 10), np.uint16)
    for _ in range(2):  # the second time from the cached views
        reader.copy_into(ref(ring, slot, a.nbytes, gen), dest)
        np.testing.assert_array_equal(dest, a)
        dest[...] = 0
    assert ring.pending() == 0  # every copy acknowledged
