"""Publisher -> Receiver over real ZeroMQ sockets, real shared memory and real processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from conftest import our_segments, wait_until
from napari_hcs_stream.endpoints import Endpoint, tcp_endpoint
from napari_hcs_stream.protocol import (
    Bye,
    Coords,
    FrameHeader,
    FrameRef,
    ShmRef,
    encode_bye,
    encode_frame_header,
)
from napari_hcs_stream.publisher import DeliveryError, Publisher, ring_geometry
from napari_hcs_stream.publisher._publisher import SLOTS_BUSY
from napari_hcs_stream.receiver import Receiver
from napari_hcs_stream.ring import ShmRing, sweep_stale_segments
from transport_helpers import (
    late_producer_main,
    pattern,
    poll_until,
    producer_main,
    raw_xpub,
    receiver_main,
    serving,
)

SPAWN = mp.get_context("spawn")

ITEMS: list[tuple[str, tuple[int, ...], str, bool]] = [
    ("uint8", (31, 17), "image", False),
    ("uint16", (64, 48), "image", False),
    ("uint32", (3, 20, 10), "image", False),
    ("float32", (40, 40), "image", False),
    ("int32", (50, 30), "labels", False),
    ("int32", (4, 16, 16), "labels", False),
    ("uint8", (24, 32, 3), "image", True),
    ("float32", (2, 8, 8, 4), "image", True),
    ("uint16", (300, 700), "image", False),  # over 64 KiB: zero-copy frames
]


def _endpoint(kind: str) -> str | Endpoint:
    return "rt" if kind == "ipc" else tcp_endpoint("rt", 0)


@pytest.mark.parametrize("address", ["ipc", "tcp"])
@pytest.mark.parametrize("transport", ["shm", "frames"])
def test_round_trip_exact(runtime_dir: Path, transport: str, address: str,
                          recv_mode: str) -> None:
    with serving(_endpoint(address)) as served:
        assert served.endpoint.data.startswith(f"{address}://")
        assert (served.receiver._take_header is not None) == (recv_mode == "libzmq")
        with Publisher(served.endpoint, transport=transport, strict=True,
                       strict_timeout=10) as pub:
            for i, (dtype, shape, kind, rgb) in enumerate(ITEMS):
                assert pub.publish(pattern(shape, dtype, i), well="H12", site=i, channel="GFP",
                                   z=2, t=i, kind=kind, rgb=rgb, source="seg",
                                   meta={"i": i, "name": "ünï"})
            producer = pub.producer_id
            run = pub.run
        wait_until(lambda: served.count() == len(ITEMS), timeout=20)
    assert served.errors == [] and served.torn == []
    pairs = zip(served.frames, ITEMS, strict=True)
    for i, ((h, array), (dtype, shape, kind, rgb)) in enumerate(pairs):
        assert (h.producer, h.run, h.seq, h.source) == (producer, run, i, "seg")
        assert (h.dtype, h.shape, h.kind, h.rgb) == (dtype, shape, kind, rgb)
        assert h.coords == Coords(well="H12", site=i, channel="GFP", z=2, t=i)
        assert h.meta == {"i": i, "name": "ünï"}
        assert isinstance(h.pixels, ShmRef if transport == "shm" else FrameRef)
        assert array.dtype == np.dtype(dtype) and array.shape == shape
        np.testing.assert_array_equal(array, pattern(shape, dtype, i))
    stats = served.receiver.stats.producers[producer]
    assert (stats.received, stats.dropped, stats.rejected, stats.closed) == (len(ITEMS), 0, 0,
                                                                            True)


@pytest.mark.parametrize("transport", ["shm", "frames"])
def test_any_memory_layout_arrives_as_c_order_values(runtime_dir: Path, transport: str) -> None:
    base = pattern((40, 30), "uint16", 5)
    inputs = [base.astype(">u2"), base[:, ::2], base.T, np.asfortranarray(base)]
    with serving("layout") as served, Publisher("layout", transport=transport, strict=True,
                                                strict_timeout=10) as pub:
        for a in inputs:
            pub.publish(a)
        wait_until(lambda: served.count() == len(inputs))
    for (h, got), a in zip(served.frames, inputs, strict=True):
        assert h.dtype == "uint16" and got.shape == a.shape
        np.testing.assert_array_equal(got, a)


def test_transport_auto_follows_the_address(runtime_dir: Path) -> None:
    remote_key = zmq.curve_keypair()[0]  # beyond loopback a viewer requires CURVE
    for spec, expected in (("auto-ipc", "shm"), ("tcp://127.0.0.1:0", "shm"),
                           ("tcp://192.0.2.1:9", "frames")):
        key = remote_key if spec.startswith("tcp://192") else None
        pub = Publisher(spec, connect_timeout=0, server_key=key)
        assert pub.transport == expected
        pub.close()


def test_ring_grows_while_idle_and_oversize_frames_go_inline(runtime_dir: Path) -> None:
    got: list[tuple[FrameHeader, np.ndarray]] = []
    receiver = Receiver("grow", on_frame=lambda h, a: got.append((h, a.copy())))
    receiver.bind()
    pub = Publisher("grow", min_slot_bytes=4096, ring_slots=2, connect_timeout=0)
    try:
        poll_until(receiver, lambda: pub.connected)
        small, big = pattern((10, 10), "uint16", 1), pattern((100, 100), "uint16", 2)
        assert pub.publish(small)  # creates a one-page ring
        assert pub.publish(big)  # the small frame is still in flight: inline instead
        assert pub.stats.oversize == 1
        poll_until(receiver, lambda: len(got) == 2)
        assert pub.publish(big)  # nothing in flight now: the ring is replaced by a bigger one
        poll_until(receiver, lambda: len(got) == 3)
        assert pub.stats.oversize == 1
        kinds = [type(h.pixels) for h, _ in got]
        assert kinds == [ShmRef, FrameRef, ShmRef]
        assert got[0][0].pixels.segment != got[2][0].pixels.segment
        assert receiver.segments == [got[2][0].pixels.segment]  # the old mapping was let go
        for (_, a), want in zip(got, (small, big, big), strict=True):
            np.testing.assert_array_equal(a, want)
    finally:
        pub.close()
        poll_until(receiver, lambda: receiver.stats.producers[pub.producer_id].closed)
        assert receiver.segments == []  # bye releases the producer's mappings
        receiver.close()


def test_default_ring_geometry_gives_small_frames_many_slots(runtime_dir: Path) -> None:
    """128 MiB of 1 MiB slots by default: a 512x512 uint16 frame gets 128 slots (enough to
    ride out napari's redraws), a 2048x2048 one 16; and that is the ring a Publisher makes."""
    mib = 1 << 20
    free = os.statvfs("/dev/shm")
    room = free.f_bavail * free.f_frsize // 4
    assert ring_geometry(512 * 512 * 2) == (mib, min(128, room // mib))
    assert ring_geometry(2048 * 2048 * 2) == (8 * mib, min(16, room // (8 * mib)))
    assert ring_geometry(100, ring_bytes=mib) == (mib, 4)  # never fewer than 4
    assert ring_geometry(100, ring_bytes=4 * mib, min_slot_bytes=4096) == (4096, 1024)
    receiver = Receiver("geometry", on_frame=lambda h, a: None)
    receiver.bind()
    with Publisher("geometry", ring_bytes=8 * mib, connect_timeout=5) as pub:
        poll_until(receiver, lambda: pub.connected)
        assert pub.publish(pattern((512, 512), "uint16", 0))
        segment = next(iter(our_segments()))
        size = (Path("/dev/shm") / segment).stat().st_size
        assert 8 * mib <= size < 8 * mib + 64 * 1024  # 8 slots of 1 MiB and the header
        poll_until(receiver, lambda: receiver.stats.received == 1)
    receiver.close()


@pytest.mark.parametrize("nproducers", [2, 8])
def test_many_producer_processes(runtime_dir: Path, nproducers: int) -> None:
    count = 40 if nproducers == 2 else 15
    with serving("many") as served:
        pipes, procs = [], []
        for salt in range(nproducers):
            parent, child = SPAWN.Pipe()
            kwargs = {"strict": True, "strict_timeout": 30.0, "connect_timeout": 30.0}
            proc = SPAWN.Process(target=producer_main,
                                 args=("many", count, salt, kwargs, child))
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        reports = []
        for parent in pipes:
            assert parent.poll(60), "a producer did not report"
            reports.append(parent.recv()[1])
            assert parent.poll(60), "a producer did not finish"
            reports.append(parent.recv()[1])
        for proc in procs:
            proc.join(30)
            assert proc.exitcode == 0
        wait_until(lambda: served.count() == count * nproducers, timeout=30)
    done = [r for r in reports if isinstance(r, dict)]
    assert sorted(r["sent"] for r in done) == [count] * nproducers
    stats = served.receiver.stats
    assert (stats.received, stats.dropped, stats.rejected, stats.torn) == (
        count * nproducers, 0, 0, 0)
    for report in done:
        ps = stats.producers[report["producer"]]
        assert (ps.received, ps.last_seq, ps.closed) == (count, count - 1, True)
    for h, a in served.frames:
        salt, i = h.meta["salt"], h.meta["i"]
        assert h.coords.z == i and h.coords.site == salt
        np.testing.assert_array_equal(a, pattern((64, 48), "uint16", salt * 10000 + i))


def test_a_viewer_that_starts_late_gets_everything_after_the_wait(runtime_dir: Path) -> None:
    parent, child = SPAWN.Pipe()
    count = 30
    proc = SPAWN.Process(target=late_producer_main, args=(
        "late", count, 0.005, {"connect_timeout": 30.0}, child))
    proc.start()
    try:
        assert parent.poll(60)
        producer = parent.recv()[1]  # it is now waiting (bounded) for a viewer
        with serving("late") as served:
            assert parent.poll(60)
            report = parent.recv()[1]
            wait_until(lambda: served.receiver.stats.producers.get(producer) is not None
                       and served.receiver.stats.producers[producer].closed, timeout=20)
    finally:
        proc.join(30)
    ps = served.receiver.stats.producers[producer]
    assert report["results"] == [True] * count
    assert (ps.received, ps.dropped, ps.last_seq) == (count, 0, count - 1)


def test_without_a_viewer_publish_is_bounded_and_counted(runtime_dir: Path) -> None:
    pub = Publisher("nobody", connect_timeout=0.2)
    start = time.monotonic()
    assert pub.publish(np.zeros((8, 8), np.uint16)) is False  # waits once, bounded
    first = time.monotonic() - start
    assert 0.15 < first < 2.0
    for _ in range(50):
        assert pub.publish(np.zeros((8, 8), np.uint16)) is False
    assert pub.stats.max_publish_s() < 2.0
    assert sorted(pub.stats.durations)[-2] < 0.05  # only the first one waited
    assert pub.stats.dropped == 51 and pub.last_seq == 50
    assert pub.stats.last_drop_reason == "no viewer connected"
    start = time.monotonic()
    pub.close()
    assert time.monotonic() - start < 2.0


def test_a_publisher_counts_the_time_the_viewer_held_it_back(runtime_dir: Path) -> None:
    gate = threading.Event()

    def slow_destination(h: FrameHeader) -> None:
        gate.wait(10)  # the viewer is busy: the only slot stays in flight meanwhile
        return None

    with serving("slow", destination=slow_destination) as served:
        pub = Publisher("slow", ring_slots=1, send_timeout=0.05, connect_timeout=10)
        try:
            assert pub.publish(np.zeros((8, 8), np.uint16), z=0)
            assert pub.stats.waited_s == 0  # a free slot: no wait
            assert not pub.publish(np.zeros((8, 8), np.uint16), z=1)
            assert pub.stats.last_drop_reason == SLOTS_BUSY
            assert 0.04 < pub.stats.waited_s < 5
        finally:
            gate.set()
            wait_until(lambda: served.count() == 1, timeout=10)
            pub.close()


def test_strict_mode_raises_instead_of_dropping(runtime_dir: Path) -> None:
    pub = Publisher("nobody-strict", strict=True, strict_timeout=0.2)
    with pytest.raises(DeliveryError, match="no viewer connected"):
        pub.publish(np.zeros((8, 8), np.uint16))
    pub.close()


def test_a_viewer_that_dies_mid_stream_costs_little_and_is_counted(runtime_dir: Path) -> None:
    received, bound = SPAWN.Value("i", 0), SPAWN.Event()
    proc = SPAWN.Process(target=receiver_main, args=("dies", received, bound))
    proc.start()
    pub = None
    try:
        assert bound.wait(60)
        pub = Publisher("dies", connect_timeout=30.0)
        frame = pattern((256, 256), "uint16", 3)
        for _ in range(20):
            pub.publish(frame)
        wait_until(lambda: received.value >= 10, timeout=20)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        results = [pub.publish(frame) for _ in range(300)]
        assert not all(results)
        assert pub.stats.max_publish_s() < 0.25, sorted(pub.stats.durations)[-5:]
        assert pub.stats.dropped >= 1 and pub.stats.sent + pub.stats.dropped == 320
        assert pub.last_seq == 319
        start = time.monotonic()
        pub.close()  # no viewer: nothing to wait for
        assert time.monotonic() - start < 1.0
    finally:
        if pub is not None:
            pub.close()
        if proc.is_alive():
            proc.kill()
            proc.join(10)


KILLED_PRODUCER = """
import sys, numpy as np
from napari_hcs_stream.publisher import Publisher
pub = Publisher(sys.argv[1], connect_timeout=30)
frame = np.ones((128, 128), np.uint16)
while True:
    pub.publish(frame)
"""


def test_a_killed_producers_segment_is_swept(runtime_dir: Path) -> None:
    with serving("killed") as served:
        env = {**os.environ, "NAPARI_HCS_STREAM_RUNTIME_DIR": str(runtime_dir)}
        proc = subprocess.Popen([sys.executable, "-c", KILLED_PRODUCER, "killed"], env=env,
                                stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: served.count() >= 10, timeout=60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        segment = served.frames[0][0].pixels.segment
        assert segment.startswith(f"hcs_{proc.pid}_")
        # the dead producer's own resource tracker or our sweep removes it
        wait_until(lambda: (sweep_stale_segments(), not Path("/dev/shm", segment).exists())[1],
                   timeout=10)
        served.frames.clear()
        with Publisher("killed") as pub:  # the viewer carries on serving others
            assert pub.publish(np.zeros((4, 4), np.uint8))
            wait_until(lambda: served.count(pub.producer_id) == 1)


def test_receiver_sweeps_dead_producers_segments_at_bind(runtime_dir: Path) -> None:
    proc = SPAWN.Process(target=os.getpid)
    proc.start()
    proc.join(30)
    stale = Path("/dev/shm", f"hcs_{proc.pid}_0000abcd")
    stale.write_bytes(b"left behind")
    receiver = Receiver("sweeper")
    receiver.bind()
    receiver.close()
    assert not stale.exists()


def _raw_frame(ring: ShmRing, seq: int, array: np.ndarray, producer: str = "raw:1") -> bytes:
    slot = ring.acquire()
    offset, gen = ring.write(slot, array)
    return encode_frame_header(FrameHeader(
        producer, seq, "run", "src", "image", array.dtype.name, array.shape,
        ShmRef(ring.name, offset, array.nbytes, slot, gen)))


def test_a_slot_rewritten_before_the_copy_is_torn_and_never_shown(runtime_dir: Path) -> None:
    ring = ShmRing(4096, 4)
    shown: list[int] = []
    torn: list[int] = []

    def destination(h: FrameHeader) -> np.ndarray:
        if h.seq == 1:  # the producer reuses the slot just before the viewer copies it
            ring.write(h.pixels.slot, np.full(h.shape, 99, np.uint16))
        return np.empty(h.shape, np.uint16)

    receiver = Receiver("torn", destination=destination,
                        on_frame=lambda h, a: shown.append(h.seq),
                        on_torn=lambda h, a: torn.append(h.seq))
    receiver.bind()
    sock = raw_xpub(receiver.endpoint.data, receiver)
    try:
        for seq in range(3):
            sock.send(_raw_frame(ring, seq, np.full((8, 8), seq, np.uint16)))
        poll_until(receiver, lambda: len(shown) + len(torn) == 3)
        assert shown == [0, 2] and torn == [1]
        ps = receiver.stats.producers["raw:1"]
        assert (ps.received, ps.torn, ps.rejected, ps.dropped) == (2, 1, 0, 0)
    finally:
        sock.close()
        receiver.close()
        ring.close()


def test_time_a_producer_waited_for_the_receiver_is_counted(runtime_dir: Path) -> None:
    """A producer waits for a free slot while the receiver is behind: ``waited_s`` says how
    long, and keeps counting across a replaced ring and after the receiver closes."""
    first, second = ShmRing(4096, 1), ShmRing(8192, 1)
    seen: list[int] = []
    receiver = Receiver("waits", on_frame=lambda h, a: seen.append(h.seq))
    receiver.bind()
    sock = raw_xpub(receiver.endpoint.data, receiver)
    try:
        sock.send(_raw_frame(first, 0, np.zeros((8, 8), np.uint16)))
        assert first.acquire(timeout=0.05) is None  # the receiver has not taken frame 0 yet
        poll_until(receiver, lambda: seen == [0])
        waited = receiver.snapshot()["producers"]["raw:1"]["waited_s"]
        assert waited == first.waited_ns / 1e9 and waited > 0.04
        sock.send(_raw_frame(second, 1, np.zeros((8, 8), np.uint16)))  # a bigger ring
        assert second.acquire(timeout=0.03) is None
        poll_until(receiver, lambda: seen == [0, 1])
        total = (first.waited_ns + second.waited_ns) / 1e9
        assert receiver.snapshot()["producers"]["raw:1"]["waited_s"] == pytest.approx(total)
    finally:
        sock.close()
        receiver.close()
        first.close()
        second.close()
    assert receiver.snapshot()["producers"]["raw:1"]["waited_s"] == pytest.approx(total)


def test_bad_destinations_and_failing_callbacks_are_rejected_not_fatal(runtime_dir: Path
                                                                       ) -> None:
    readonly = np.zeros((8, 8), np.uint16)
    readonly.flags.writeable = False
    plans: dict[int, Any] = {
        0: lambda h: np.empty((3, 3), np.uint16),
        1: lambda h: np.empty(h.shape, np.float32),
        2: lambda h: readonly,
        3: lambda h: [[0] * 8] * 8,
    }

    def destination(h: FrameHeader) -> np.ndarray | None:
        if h.seq == 4:
            raise RuntimeError("boom")
        plan = plans.get(h.seq)
        return plan(h) if plan else None

    def on_frame(h: FrameHeader, a: np.ndarray) -> None:
        if h.seq == 5:
            raise KeyError("no layer")
        good.append(h.seq)

    good: list[int] = []
    errors: list[str] = []
    receiver = Receiver("dest", destination=destination, on_frame=on_frame,
                        on_error=errors.append)
    receiver.bind()
    try:
        with Publisher("dest", connect_timeout=0) as pub:
            poll_until(receiver, lambda: pub.connected)
            for _ in range(7):
                assert pub.publish(np.ones((8, 8), np.uint16))
            poll_until(receiver, lambda: len(good) + len(errors) == 7)
        assert good == [6]
        assert "is not a writable uint16 array of shape (8, 8): got uint16 array of shape " \
               "(3, 3)" in errors[0]
        assert "got float32 array" in errors[1]
        assert "got read-only uint16 array" in errors[2]
        assert "got list" in errors[3]
        assert "destination failed: RuntimeError: boom" in errors[4]
        assert "failed: KeyError: 'no layer'" in errors[5]
        assert receiver.stats.rejected == 6
        assert receiver.stats.last_error == errors[5]
    finally:
        receiver.close()


def test_sequence_gaps_are_counted_as_dropped(runtime_dir: Path) -> None:
    receiver = Receiver("gaps")
    receiver.bind()
    sock = raw_xpub(receiver.endpoint.data, receiver)
    try:
        a = np.zeros((2, 2), np.uint8)
        for seq in (0, 1, 5, 6):
            h = FrameHeader("gappy", seq, "r", "s", "image", "uint8", (2, 2), FrameRef(1))
            sock.send_multipart([encode_frame_header(h), a.tobytes()])
        sock.send(encode_bye(Bye("gappy", 9)))  # seqs 7 and 8 never came either
        poll_until(receiver, lambda: receiver.stats.producers.get("gappy") is not None
                   and receiver.stats.producers["gappy"].closed)
        ps = receiver.stats.producers["gappy"]
        assert (ps.received, ps.dropped, ps.last_seq) == (4, 5, 9)
        assert receiver.reached({"gappy": 9}) and not receiver.reached({"other": 0})
    finally:
        sock.close()
        receiver.close()


def test_stats_snapshot_is_json(runtime_dir: Path) -> None:
    with serving("snap") as served, Publisher("snap") as pub:
        pub.publish(np.zeros((4, 4), np.uint8), well="A01")
        wait_until(lambda: served.count() == 1)
        snapshot = served.receiver.stats.as_dict()
    assert json.loads(json.dumps(snapshot))["producers"][pub.producer_id]["received"] == 1


@pytest.mark.parametrize(("array", "kwargs", "error", "message"), [
    ([[1, 2], [3, 4]], {}, TypeError, "needs a numpy array"),
    (np.zeros((4, 4), np.complex64), {}, TypeError, "cannot be streamed"),
    (np.zeros((4, 4), np.float32), {"kind": "labels"}, TypeError, "labels need an integer"),
    (np.zeros(4, np.uint8), {}, ValueError, "cannot stream shape"),
    (np.zeros((4, 4, 5), np.uint8), {"rgb": True}, ValueError, "last axis of 3 or 4"),
    (np.zeros((4, 4), np.uint8), {"kind": "movie"}, ValueError, "kind must be"),
    (np.zeros((4, 4), np.uint8), {"well": "B03\n"}, ValueError, "like 'B03'"),
    (np.zeros((4, 4), np.uint8), {"site": True}, TypeError, "site must be an integer"),
    (np.zeros((4, 4), np.uint8), {"z": -1}, ValueError, "z must be 0 to"),
    (np.zeros((4, 4), np.uint8), {"channel": ""}, ValueError, "channel must be a string"),
    (np.zeros((4, 4), np.uint8), {"meta": {"a": object()}}, TypeError, "JSON-serialisable"),
    (np.zeros((4, 4), np.uint8), {"source": 3}, ValueError, "source must be a string"),
])
def test_the_callers_mistakes_raise_before_anything_is_sent(
        runtime_dir: Path, array: Any, kwargs: dict[str, Any], error: type, message: str
) -> None:
    with Publisher("mistakes", connect_timeout=0) as pub:
        with pytest.raises(error, match=message):
            pub.publish(array, **kwargs)
        assert pub.last_seq == -1 and pub.stats.dropped == 0
        assert pub.publish(np.zeros((4, 4), np.uint8), site=np.int64(2)) is False  # no viewer
    with pytest.raises(RuntimeError, match="closed Publisher"):
        pub.publish(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"site": True}, TypeError), ({"z": 1.0}, TypeError), ({"t": np.bool_(True)}, TypeError),
    ({"well": "B3!"}, ValueError), ({"channel": -1}, ValueError), ({"site": 2**40}, ValueError),
])
def test_cached_coordinates_never_skip_a_check(runtime_dir: Path, kwargs: dict[str, Any],
                                               error: type) -> None:
    """The header bytes of plain coordinates are cached; look-alikes (True == 1, 1.0 == 1)
    must still be checked, and equal numpy integers give the same bytes."""
    good = {"well": "B03", "site": 1, "z": 1, "t": 1, "channel": 0}
    with Publisher("cached-coords", connect_timeout=0) as pub:
        for _ in range(2):
            pub.publish(np.zeros((4, 4), np.uint8), **good)
        assert len(pub._bodies) == 1
        with pytest.raises(error):
            pub.publish(np.zeros((4, 4), np.uint8), **{**good, **kwargs})
        numpy_ints = {k: np.int64(v) if type(v) is int else v for k, v in good.items()}
        assert pub.publish(np.zeros((4, 4), np.uint8), **numpy_ints) is False  # no viewer
        assert pub.stats.dropped == 3 and len(pub._bodies) == 1


def _io_thread_policies() -> list[int]:
    policies = []
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().startswith("ZMQbg/IO"):
                policies.append(os.sched_getscheduler(int(task.name)))
        except OSError:  # the thread has just exited
            continue
    return policies


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH") or not Path("/proc/self/task").is_dir(),
                    reason="Linux scheduling policies")
def test_data_context_io_thread_batches_unless_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import zmq

    from napari_hcs_stream import _context

    ctx = _context.data_context()
    sock = ctx.socket(zmq.PUSH)  # the I/O thread starts with the first socket
    try:
        if _context._batch_allowed and os.sched_getscheduler(0) == os.SCHED_OTHER:
            # the new thread names itself and applies the policy on its own: wait for it
            wait_until(lambda: os.SCHED_BATCH in _io_thread_policies(), timeout=5.0)
    finally:
        sock.close(0)
        ctx.term()
    # a sandbox that refuses the switch: a plain context (libzmq would abort otherwise)
    monkeypatch.setattr(_context, "_batch_allowed", None)

    def refuse(*args: Any) -> None:
        raise PermissionError("not here")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    ctx = _context.data_context()
    sock = ctx.socket(zmq.PUSH)  # would abort the process if the policy had been asked for
    try:
        assert _context._batch_allowed is False
    finally:
        sock.close(0)
        ctx.term()
