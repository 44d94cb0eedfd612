"""Transport throughput: the real Publisher -> Receiver path against a raw two-process ring.

    python benchmarks/transport.py --quick      # under a minute
    python benchmarks/transport.py              # longer runs, steadier numbers

For 512x512 and 2048x2048 uint16 frames it measures, each in fresh processes:

* ``fps``: frames received *and copied* per second by the real :class:`Receiver`, fed by the
  real :class:`Publisher` (shm transport, ipc endpoint) in a spawned producer process, copying
  straight into a preallocated stack through a ``destination`` callback (cycling its planes).
  The producer runs ``strict=True`` so nothing is dropped: the rate is end-to-end, once the
  ring is warm (``steady_rate``: the first lap over the slots is left out, for both paths,
  since it pays the kernel's first touches of a fresh segment). Its ring
  has the slots a Publisher makes by default for the frame size (``slots_<side>``, from
  :func:`napari_hcs_stream.publisher.ring_geometry`: 128 at 512x512, 16 at 2048x2048).
* ``raw_fps``: the same work with no project code: a ``multiprocessing.shared_memory`` ring
  of as many slots, a tiny header over a ``multiprocessing.Pipe``, one ``np.copyto`` into a
  slot, one ``np.copyto`` out into the same kind of stack, an acknowledgement back (pipelined
  over the slots, so both sides run at once exactly as in the real path).
* ``ratio``: the median over the interleaved repeats of project / raw, each repeat's two runs
  made back to back (:func:`paired_ratio`): a run that the machine slowed down, or sped up
  (a raw 2048x2048 run once went twice as fast as every other one), moves one pair, not the
  figure. ``fps`` and ``raw_fps`` are the best runs of each path, ``best_ratio`` their ratio
  (the figure until the sixth session), ``median_fps`` the medians.
* ``fps_512_16``, ``raw_fps_512_16``, ``ratio_512_16``: both paths again with a 16-slot ring
  at 512x512, whose 8 MiB stay in this machine's L3 cache: the fastest either path goes here,
  and the geometry this benchmark used before it measured the default one.
* ``publish_ms``: median time inside ``publish()`` while the viewer keeps up (the producer
  is paced below the measured rate, so this is the cost a pipeline pays, not back-pressure);
  ``publish_cpu_ms`` is the producer thread's CPU time for the same calls (wall time on a
  shared machine includes time the thread was descheduled), read on one call in
  ``CPU_SAMPLE``: the thread CPU clock is a system call, which would otherwise slow only the
  project's producer.
* ``cpu_us_per_frame`` / ``raw_cpu_us_per_frame``: CPU time of both processes (every thread,
  ZeroMQ's I/O threads included) per frame: on few cores, this is what bounds the rate.
* ``memcpy_ms``: median ``np.copyto`` of one frame between buffers of the same footprint as
  the pipeline (sources cycled, destinations cycled over a 16-frame stack), and
  ``memcpy_hot_ms``: the same buffer pair every time (cache-warm; a lower bound).

Progress goes to stderr; the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

#: the cache-resident ring: 16 slots of a 512x512 frame (8 MiB) stay in this machine's L3
CACHE_SLOTS = 16
STACK = 16
SOURCES = 4
#: the publish CPU time (a median) is read on one frame in CPU_SAMPLE
CPU_SAMPLE = 8
#: frames between two ``take_updates`` of the assembler in ``run_project(listener=True)``
TAKE_EVERY = 500


def _cpu() -> float:
    """CPU seconds of this whole process (every thread: ZeroMQ's I/O thread included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _frames(side: int) -> list[np.ndarray]:
    rng = np.random.default_rng(side)
    return [rng.integers(0, 4096, (side, side), dtype=np.uint16) for _ in range(SOURCES)]


# -- the project's path ------------------------------------------------------------------------
def _project_producer(endpoint: str, side: int, n: int, pace: float, slots: int,
                      conn: Connection) -> None:
    from napari_hcs_stream.publisher import Publisher

    frames = _frames(side)
    pub = Publisher(endpoint, transport="shm", strict=True, connect_timeout=10.0,
                    strict_timeout=20.0, ring_slots=slots)
    conn.send("ready")
    conn.recv()  # go
    cpu = _cpu()
    thread_cpu = []
    for i in range(n):
        if i % CPU_SAMPLE:  # the thread CPU clock is a system call (0.7 us here): sampled,
            pub.publish(frames[i % SOURCES], z=i % STACK, source="bench")  # so that the
        else:  # instrumentation does not slow the project's producer against the raw one
            t = time.thread_time()
            pub.publish(frames[i % SOURCES], z=i % STACK, source="bench")
            thread_cpu.append(time.thread_time() - t)
        if pace:
            time.sleep(pace)
    cpu = _cpu() - cpu
    durations = sorted(pub.stats.durations)[: n]
    stats = {"sent": pub.stats.sent, "dropped": pub.stats.dropped,
             "oversize": pub.stats.oversize, "producer_cpu_us": cpu / n * 1e6,
             "publish_median_s": statistics.median(durations) if durations else 0.0,
             "publish_cpu_median_s": statistics.median(thread_cpu)}
    pub.close()
    conn.send(stats)


def steady_rate(times: list[float], slots: int) -> float:
    """Frames per second once the ring is warm: the first lap over its slots is left out
    (both paths alike), since it pays the kernel's first touches of a fresh segment (several
    ms per 2 MiB on a VM whose host reclaims freed memory), a cost a long run pays once."""
    warm = min(slots, len(times) // 4)
    times = times[warm:]
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def paired_ratio(project: list[float], raw: list[float]) -> float:
    """Median over interleaved repeats of project / raw, each pair measured back to back."""
    return statistics.median(p / r for p, r in zip(project, raw, strict=True) if r > 0)


def default_slots(side: int) -> int:
    """Slots of the ring a Publisher makes by default for side x side uint16 frames."""
    from napari_hcs_stream.publisher import ring_geometry

    return ring_geometry(side * side * 2)[1]


def run_project(side: int, n: int, pace: float = 0.0, slots: int | None = None, *,
                listener: bool = False) -> dict[str, Any]:
    """The real Publisher -> Receiver path. ``listener``: as the plugin's listener thread
    runs it instead: the receiver lives in a background thread (so it takes headers keeping
    the GIL) and copies into a real ``PlateAssembler``'s stacks, whose updates are taken every
    :data:`TAKE_EVERY` frames (the render tick's side of it, without napari); the calling
    thread only waits. Otherwise the receiver runs in this thread into a plain stack."""
    from napari_hcs_stream.receiver import Receiver

    slots = slots or default_slots(side)
    counter = [0]
    times: list[float] = []
    if listener:
        from napari_hcs_stream.assembler import PlateAssembler

        assembler = PlateAssembler()
        destination: Callable[[Any], np.ndarray] = assembler.destination

        def on_frame(header: Any, array: np.ndarray) -> None:
            assembler.commit(header, array)
            counter[0] += 1
            times.append(time.perf_counter())
            if counter[0] % TAKE_EVERY == 0:
                assembler.take_updates()
    else:
        stack = np.zeros((STACK, side, side), np.uint16)

        def destination(header: Any) -> np.ndarray:
            return stack[counter[0] % STACK]

        def on_frame(header: Any, array: np.ndarray) -> None:
            counter[0] += 1
            times.append(time.perf_counter())

    result: dict[str, Any] = {}

    def receive(endpoint: str, parent: Connection, proc: Any) -> None:
        receiver = Receiver(endpoint, destination=destination, on_frame=on_frame,
                            register=False)
        receiver.bind()
        proc.start()
        try:
            deadline = time.monotonic() + 60
            while not parent.poll(0):  # keep servicing the socket so the subscription flows
                receiver.poll(10)
                if time.monotonic() > deadline:
                    raise RuntimeError("producer did not start")
            parent.recv()
            parent.send("go")
            cpu = _cpu()
            deadline = time.monotonic() + 120
            while counter[0] < n and time.monotonic() < deadline:
                receiver.poll(100)
            cpu = _cpu() - cpu
            while not parent.poll(0) and time.monotonic() < deadline:
                receiver.poll(10)  # the producer's close waits for in-flight copies
            result.update(parent.recv(), receiver_cpu_us=cpu / n * 1e6)
        finally:
            proc.join(30)
            receiver.close()
        result.update(torn=receiver.stats.torn, rejected=receiver.stats.rejected)

    with tempfile.TemporaryDirectory(prefix="hcsb") as rundir:
        endpoint = f"ipc://{rundir}/bench.data"
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_project_producer,
                           args=(endpoint, side, n, pace, slots, child))
        if listener:  # a thread of its own, as the widget's listener; errors re-raised here
            with ThreadPoolExecutor(1, thread_name_prefix="bench-listener") as pool:
                pool.submit(receive, endpoint, parent, proc).result()
        else:
            receive(endpoint, parent, proc)
    rate = steady_rate(times, slots)
    return {"fps": rate, "received": counter[0], **result}


# -- the raw limit: same work, no project code -------------------------------------------------
def _raw_producer(name: str, side: int, n: int, nslots: int, conn: Connection) -> None:
    shm = shared_memory.SharedMemory(name)
    nbytes = side * side * 2
    slots = [np.ndarray((side, side), np.uint16, shm.buf, i * nbytes) for i in range(nslots)]
    frames = _frames(side)
    conn.send_bytes(b"ready")
    conn.recv_bytes()
    cpu = _cpu()
    in_flight = 0
    for i in range(n):
        if in_flight == nslots:
            conn.recv_bytes()  # an ack frees the oldest slot
            in_flight -= 1
        np.copyto(slots[i % nslots], frames[i % SOURCES])
        conn.send_bytes(i.to_bytes(8, "little"))
        in_flight += 1
    while in_flight:
        conn.recv_bytes()
        in_flight -= 1
    conn.send_bytes(struct.pack("<d", (_cpu() - cpu) / n * 1e6))
    del slots
    shm.close()


def run_raw(side: int, n: int, nslots: int | None = None) -> dict[str, Any]:
    """The raw ring with ``nslots`` slots (default: as many as the project's ring has)."""
    nslots = nslots or default_slots(side)
    nbytes = side * side * 2
    shm = shared_memory.SharedMemory(create=True, size=nslots * nbytes)
    try:
        slots = [np.ndarray((side, side), np.uint16, shm.buf, i * nbytes) for i in range(nslots)]
        stack = np.zeros((STACK, side, side), np.uint16)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_raw_producer, args=(shm.name, side, n, nslots, child))
        proc.start()
        parent.recv_bytes()
        parent.send_bytes(b"go")
        times = []
        cpu = _cpu()
        for j in range(n):
            i = int.from_bytes(parent.recv_bytes(), "little")
            np.copyto(stack[j % STACK], slots[i % nslots])
            parent.send_bytes(b"a")
            times.append(time.perf_counter())
        cpu = _cpu() - cpu
        producer_cpu = struct.unpack("<d", parent.recv_bytes())[0]
        proc.join(30)
        del slots
    finally:
        shm.close()
        shm.unlink()
    return {"fps": steady_rate(times, nslots), "receiver_cpu_us": cpu / n * 1e6,
            "producer_cpu_us": producer_cpu}


def memcpy_ms(side: int, reps: int) -> tuple[float, float]:
    frames = _frames(side)
    stack = np.zeros((STACK, side, side), np.uint16)
    cold, hot = [], []
    for i in range(reps):
        t = time.perf_counter()
        np.copyto(stack[i % STACK], frames[i % SOURCES])
        cold.append(time.perf_counter() - t)
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(stack[0], frames[0])
        hot.append(time.perf_counter() - t)
    return statistics.median(cold) * 1e3, statistics.median(hot) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (median)")
    args = parser.parse_args()
    counts = {512: 3000, 2048: 300} if args.quick else {512: 12000, 2048: 1200}
    repeats = args.repeats or (4 if args.quick else 7)
    out: dict[str, Any] = {"cpus": os.cpu_count(), "repeats": repeats}
    rows = []
    for side, n in counts.items():
        slots = default_slots(side)
        cached = slots != CACHE_SLOTS  # also measure both paths with a cache-resident ring
        fps, raw, cpus, raw_cpus = [], [], [], []
        fps16, raw16 = [], []
        for r in range(repeats):  # interleaved, so machine noise hits both alike
            p = run_project(side, n, slots=slots)
            q = run_raw(side, n, slots)
            log(f"{side}x{side} run {r + 1}/{repeats}, {slots} slots: project {p['fps']:.0f} "
                f"frames/s (received {p['received']}/{n}, dropped {p['dropped']}, torn "
                f"{p['torn']}, oversize {p['oversize']}; CPU us/frame: producer "
                f"{p['producer_cpu_us']:.0f} + receiver {p['receiver_cpu_us']:.0f}), "
                f"raw {q['fps']:.0f} frames/s (CPU us/frame: {q['producer_cpu_us']:.0f} + "
                f"{q['receiver_cpu_us']:.0f})")
            cpus.append(p["producer_cpu_us"] + p["receiver_cpu_us"])
            raw_cpus.append(q["producer_cpu_us"] + q["receiver_cpu_us"])
            if p["received"] != n or p["dropped"] or p["torn"] or p["rejected"]:
                log(f"  WARNING: not every frame arrived intact: {p}")
            fps.append(p["fps"])
            raw.append(q["fps"])
            if cached:
                fps16.append(run_project(side, n, slots=CACHE_SLOTS)["fps"])
                raw16.append(run_raw(side, n, CACHE_SLOTS)["fps"])
                log(f"  with {CACHE_SLOTS} slots: project {fps16[-1]:.0f}, raw "
                    f"{raw16[-1]:.0f} frames/s")
        f, rf = max(fps), max(raw)  # the best runs: what each path can do at its best
        ratio = paired_ratio(fps, raw)
        paced = run_project(side, max(200, n // 4), pace=1.0 / (0.5 * f), slots=slots)
        cold, hot = memcpy_ms(side, 200 if side == 2048 else 1000)
        log(f"{side}x{side}: publish() median {paced['publish_median_s'] * 1e3:.3f} ms "
            f"(CPU {paced['publish_cpu_median_s'] * 1e3:.3f} ms), memcpy {cold:.3f} ms "
            f"(hot {hot:.3f} ms)")
        out.update({f"slots_{side}": slots,
                    f"fps_{side}": round(f, 1), f"raw_fps_{side}": round(rf, 1),
                    f"ratio_{side}": round(ratio, 3),
                    f"best_ratio_{side}": round(f / rf, 3),
                    f"median_fps_{side}": round(statistics.median(fps), 1),
                    f"median_raw_fps_{side}": round(statistics.median(raw), 1),
                    f"publish_ms_{side}": round(paced["publish_median_s"] * 1e3, 4),
                    f"publish_cpu_ms_{side}": round(paced["publish_cpu_median_s"] * 1e3, 4),
                    f"memcpy_ms_{side}": round(cold, 4), f"memcpy_hot_ms_{side}": round(hot, 4),
                    f"MBps_{side}": round(f * side * side * 2 / 1e6, 1),
                    f"cpu_us_per_frame_{side}": round(statistics.median(cpus), 1),
                    f"raw_cpu_us_per_frame_{side}": round(statistics.median(raw_cpus), 1)})
        rows.append((f"{side}x{side}", slots, f, rf, ratio, paced["publish_median_s"] * 1e3,
                     cold, hot))
        if cached:
            f16, rf16, ratio16 = max(fps16), max(raw16), paired_ratio(fps16, raw16)
            out.update({f"fps_{side}_{CACHE_SLOTS}": round(f16, 1),
                        f"raw_fps_{side}_{CACHE_SLOTS}": round(rf16, 1),
                        f"ratio_{side}_{CACHE_SLOTS}": round(ratio16, 3),
                        f"best_ratio_{side}_{CACHE_SLOTS}": round(f16 / rf16, 3)})
            rows.append((f"{side}x{side}", CACHE_SLOTS, f16, rf16, ratio16, None, None, None))
    print(f"{'frame':>10} {'slots':>6} {'best fps':>9} {'best raw':>9} {'ratio':>6} "
          f"{'publish ms':>11} {'memcpy ms':>10} {'hot ms':>8}")
    for name, nslots, f, rf, ratio, pub, cold, hot in rows:
        extra = (f"{pub:11.3f} {cold:10.3f} {hot:8.3f}" if pub is not None
                 else f"{'':>11} {'':>10} {'':>8}")
        print(f"{name:>10} {nslots:6d} {f:9.0f} {rf:9.0f} {ratio:6.2f} {extra}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
