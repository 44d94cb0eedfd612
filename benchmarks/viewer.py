"""Viewer-side benchmark: a producer process streams into a shown napari viewer.

    xvfb-run -a python benchmarks/viewer.py --quick     # under a minute
    xvfb-run -a python benchmarks/viewer.py             # more frames, steadier numbers

This process is the viewer: napari (shown), the HCS Stream widget listening on a private ipc
endpoint, its render tick running. A spawned producer process uses the real ``Publisher``
(shared-memory ring, ``strict=True`` so the rate is end to end and nothing is dropped).

* ``ingest_fps_<side>``: frames per second committed into the widget's layers, 2048x2048 and
  512x512 uint16, cycling over 16 z planes of one well (the slider follows the newest frame,
  so napari re-slices and redraws while it ingests: the honest live case). Both this and the
  raw rate leave out the first lap over the ring's slots (``steady_rate``: a fresh segment's
  first touches, paid once per producer).
* ``ingest_ratio_<side>``: the median over the interleaved repeats of viewer / raw, each
  pair measured back to back (``transport.paired_ratio``); ``ingest_median_ratio_<side>`` is
  the median viewer rate over the median raw rate (the figure until the sixth session).
* ``raw_fps_<side>``: the raw two-process shared-memory ring limit for the same frames, from
  ``benchmarks/transport.py`` (``run_raw``: no project code), run in this same session, with
  as many slots as the producer's ring (the Publisher's default for the frame size:
  ``slots_<side>``, 128 at 512x512, 16 at 2048x2048). ``raw_fps_512_16``: the raw ring with
  16 slots at 512x512, whose 8 MiB stay in this machine's L3 cache (faster than the default
  geometry for the raw ring, slower for napari, which needs the slots to ride out its stalls).
* ``listener_fps_512`` / ``listener_ratio_512``: the same 512x512 frames through the same
  listener code path without napari's part: ``transport.run_project(listener=True)``, a
  ``Receiver`` in a background thread (taking headers keeping the GIL, as the widget's
  listener does) feeding a ``PlateAssembler``, in this process while napari's main thread only
  waits for it (no slicing, no redraw). Paired with the raw ring like ``ingest_ratio_512``;
  the distance between the two ratios is what napari's work in the process costs the listener.
* ``flat_ratio``: mean ingest cost per frame (listener-thread CPU time in ``destination`` +
  copy + ``commit``; CPU time, so waits for the GIL held by napari's main thread do not count)
  over the last 64 frames of a 96-well x 4-site x 4-channel 512x512 plate divided by that over
  its first 64 (1.0: adding a frame costs the same however big the plate).
  ``flat_ratio_median`` uses medians: the mean is dominated by the frames that are first to
  write a fresh 2 MiB page of a stack (transparent huge pages), which the kernel zeroes and,
  on a virtual machine, the host must back first: several ms each on the development VM
  whenever the prefaulter (``_prefault.py``) falls behind. The first window's stacks are
  small and land in memory the process freed a moment before.
  ``flat_ratio_interval`` is the same ratio for the wall time between commits (end to end,
  including contention, so noisier).
* ``flat_ratio_warm`` (``flat_ratio_warm_median``, ``plate_fps_warm``): the same plate
  streamed again right after the first is cleared, into memory the process has just given
  back. On a virtual machine whose host takes freed memory back, the first plate's new memory
  costs the host milliseconds per 2 MiB to back (``slow_frames``: frames over 3 ms of listener
  CPU, whole plate); the second plate shows what the assembler costs once that is paid.
  ``flat_ratio`` stays the first plate's: a fresh viewer streams into fresh memory.
* ``rss_ratio``: this process's RSS growth over the first plate / bytes of its pixels.
* ``latency_p99_ms``: ``publish()`` call (producer clock) to the render tick having applied
  the frame to its layer (viewer clock; both CLOCK_MONOTONIC), 512x512 at half the measured
  maximum rate; ``latency_500_p99_ms``: the same at a fixed 500 frames/s.
* ``tick_p99_ms``: 99th percentile of render ticks that applied something, whole session;
  ``tick_p99_steady_ms`` leaves out the ticks that created or removed a napari layer (a
  one-off of a few hundred ms per layer with software OpenGL: vispy visual, shaders, layer
  controls, dims sliders).

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transport import (  # the shared raw-ring baseline
    CACHE_SLOTS,
    default_slots,
    paired_ratio,
    run_project,
    run_raw,
    steady_rate,
)

ENDPOINT = "bench"
CHANNELS = ("DAPI", "GFP", "RFP", "Cy5")
WINDOW = 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- producer process ------------------------------------------------------------------------
def _produce(runtime_dir: str, phase: str, side: int, n: int, rate: float,
             conn: Connection) -> None:
    os.environ["NAPARI_HCS_STREAM_RUNTIME_DIR"] = runtime_dir
    from napari_hcs_stream.publisher import Publisher

    rng = np.random.default_rng(side)
    frames = [rng.integers(0, 4096, (side, side), dtype=np.uint16) for _ in range(4)]
    pub = Publisher(ENDPOINT, run=phase, producer=phase, transport="shm", strict=True,
                    connect_timeout=20.0, strict_timeout=30.0)  # the default ring
    conn.send("ready")
    conn.recv()
    next_at = time.monotonic()
    for i, coords in enumerate(_coords(phase, n)):
        meta = None
        if rate:
            next_at += 1.0 / rate
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            meta = {"t0": time.monotonic()}
        pub.publish(frames[i % 4], source=f"{phase}{side}", meta=meta, **coords)
    stats = {"sent": pub.stats.sent, "dropped": pub.stats.dropped}
    pub.close()
    conn.send(stats)


def _coords(phase: str, n: int) -> list[dict[str, Any]]:
    if phase == "plate":
        wells = [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)]
        return [{"well": w, "site": s, "channel": ch}
                for w in wells for s in range(1, 5) for ch in CHANNELS][:n]
    return [{"well": "A01", "z": i % 16} for i in range(n)]


# -- the viewer side ---------------------------------------------------------------------------
def _instrumented_assembler() -> Any:
    from napari_hcs_stream.assembler import PlateAssembler

    class Timed(PlateAssembler):
        """Records, in the listener thread, what each frame cost and when it landed."""

        def __init__(self) -> None:
            super().__init__()
            self.costs: list[float] = []
            self.commits: list[float] = []
            self.sent_at: list[float | None] = []
            self._t0 = 0.0

        #: per-frame CPU time is only read for the plate (``flat_ratio``): the thread CPU
        #: clock is a system call, and would slow the ingest runs it does not serve
        timing = False

        def destination(self, header: Any) -> Any:
            if self.timing:
                self._t0 = time.thread_time()  # CPU time of this thread: GIL waits excluded
            return super().destination(header)

        def commit(self, header: Any, array: Any) -> None:
            super().commit(header, array)
            self.costs.append(time.thread_time() - self._t0 if self.timing else 0.0)
            self.commits.append(time.perf_counter())
            self.sent_at.append(header.meta.get("t0"))

    return Timed()


def _run_until(app: Any, done: Callable[[], bool], timeout: float) -> None:
    """Run the Qt event loop (not a busy loop: it sleeps between events) until ``done``."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    deadline = time.monotonic() + timeout
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: (done() or time.monotonic() > deadline) and loop.quit())
    timer.start()
    if not done():
        loop.exec()
    timer.stop()
    if not done():
        raise TimeoutError(f"benchmark phase did not finish within {timeout:.0f} s")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Session:
    def __init__(self, runtime_dir: str) -> None:
        import napari
        from qtpy.QtWidgets import QApplication

        from napari_hcs_stream._qt.widget import StreamWidget

        self.runtime_dir = runtime_dir
        self.viewer = napari.Viewer(show=True, title="napari-hcs-stream benchmark")
        self.app = QApplication.instance()
        self.assembler = _instrumented_assembler()
        self.widget = StreamWidget(self.viewer, assembler=self.assembler)
        self.viewer.window.add_dock_widget(self.widget, name="HCS Stream")
        self.widget.start(ENDPOINT)
        _run_until(self.app, lambda: bool(self.widget.listener and
                                          self.widget.listener.address), 20)
        self.render = self.widget.render_tick
        self.latencies: list[float] = []
        self.loads: list[float] = []
        self._marked = 0
        self.render.applied.connect(self._on_applied)

    def _on_applied(self) -> None:
        """Frames up to the rendered generation are in their layers now."""
        now = time.monotonic()
        self.loads.append(self.render.pacer.load())
        upto = min(self.render.rendered_generation, len(self.assembler.sent_at))
        for i in range(self._marked, upto):
            sent = self.assembler.sent_at[i]
            if sent is not None:
                self.latencies.append(now - sent)
        self._marked = max(self._marked, upto)

    def stream(self, phase: str, side: int, n: int, rate: float = 0.0) -> dict[str, Any]:
        start = len(self.assembler.commits)
        self.loads.clear()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_produce, args=(self.runtime_dir, phase, side, n, rate, child))
        proc.start()
        _run_until(self.app, lambda: parent.poll(0), 60)
        parent.recv()
        parent.send("go")
        _run_until(self.app, lambda: len(self.assembler.commits) - start >= n
                   and self.render.rendered_generation >= start + n, 300)
        _run_until(self.app, lambda: parent.poll(0), 60)
        stats = parent.recv()
        proc.join(30)
        commits = self.assembler.commits[start:]
        fps = steady_rate(commits, default_slots(side))  # the first lap of a fresh ring: out
        load = float(np.mean(self.loads)) if self.loads else 0.0
        log(f"  {phase} {side}: listener load {load:.2f}, {len(self.loads)} redraws")
        return {"fps": fps, "costs": self.assembler.costs[start:], "commits": commits,
                "load": load, **stats}

    def clear(self) -> None:
        self.widget.clear(None)
        self._run(0.3)
        gc.collect()

    def _run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        _run_until(self.app, lambda: time.monotonic() >= end, seconds + 5)

    def close(self) -> None:
        self.widget.stop()
        self.viewer.close()


def _flatness(r: dict[str, Any], suffix: str) -> dict[str, Any]:
    """``flat_ratio`` and its companions for one plate run (``suffix``: which run)."""
    costs, commits = r["costs"], np.diff(r["commits"])
    first, last = costs[:WINDOW], costs[-WINDOW:]
    mean = statistics.mean(last) / statistics.mean(first)
    median = statistics.median(last) / statistics.median(first)
    interval = float(commits[-WINDOW:].mean() / commits[:WINDOW].mean())
    slow = sum(c > 0.003 for c in costs)
    log(f"plate 96x4x4 512x512{' again' if suffix else ''}: {r['fps']:.0f} frames/s, flat "
        f"ratio {mean:.2f} (median {median:.2f}, interval {interval:.2f}), "
        f"{slow} frames over 3 ms")
    return {f"flat_ratio{suffix}": round(mean, 3), f"flat_ratio{suffix}_median": round(median, 3),
            f"flat_ratio{suffix}_interval": round(interval, 3),
            f"plate_fps{suffix}": round(r["fps"], 1), f"slow_frames{suffix}": slow}


def _median_of(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per size")
    args = parser.parse_args()
    counts = {2048: 120, 512: 800} if args.quick else {2048: 400, 512: 3000}
    repeats = args.repeats or (3 if args.quick else 5)
    plate_n = 96 * 4 * 4
    out: dict[str, Any] = {"cpus": os.cpu_count(), "quick": args.quick, "repeats": repeats}

    with tempfile.TemporaryDirectory(prefix="hcsv") as rundir:
        Path(rundir).chmod(0o700)
        os.environ["NAPARI_HCS_STREAM_RUNTIME_DIR"] = rundir
        session = Session(rundir)
        try:
            for side in counts:  # napari's first layer of each kind costs a one-off setup
                session.stream("ingest", side, 32)
            fps: dict[int, list[float]] = {side: [] for side in counts}
            raw: dict[int, list[float]] = {side: [] for side in counts}
            raw16: list[float] = []
            alone: list[float] = []  # the listener path with napari's main thread waiting
            alone_raw: list[float] = []
            for rep in range(repeats):  # interleaved, so machine noise hits both alike
                for side, n in counts.items():
                    slots = default_slots(side)
                    raw[side].append(run_raw(side, n, slots)["fps"])
                    if side == 512:
                        raw16.append(run_raw(side, n, CACHE_SLOTS)["fps"])
                    r = session.stream("ingest", side, n)
                    fps[side].append(r["fps"])
                    log(f"{side}x{side} run {rep + 1}/{repeats}: viewer {r['fps']:.0f} "
                        f"frames/s (sent {r['sent']}, dropped {r['dropped']}), raw ring "
                        f"{raw[side][-1]:.0f} frames/s ({slots} slots)")
                    if side == 512:
                        alone_raw.append(run_raw(side, n, slots)["fps"])
                        alone.append(run_project(side, n, slots=slots, listener=True)["fps"])
                        log(f"  the listener path without napari: {alone[-1]:.0f} frames/s, "
                            f"raw ring {alone_raw[-1]:.0f} frames/s")
            for side in counts:
                f, rf = _median_of(fps[side]), _median_of(raw[side])
                out[f"slots_{side}"] = default_slots(side)
                out[f"ingest_fps_{side}"] = round(f, 1)
                out[f"raw_fps_{side}"] = round(rf, 1)
                out[f"ingest_ratio_{side}"] = round(paired_ratio(fps[side], raw[side]), 3)
                out[f"ingest_median_ratio_{side}"] = round(f / rf, 3) if rf else 0.0
            if raw16:
                out[f"raw_fps_512_{CACHE_SLOTS}"] = round(_median_of(raw16), 1)
            if alone:
                out["listener_fps_512"] = round(_median_of(alone), 1)
                out["listener_ratio_512"] = round(paired_ratio(alone, alone_raw), 3)
                log(f"512x512 ingest ratio {out['ingest_ratio_512']:.2f} in napari, "
                    f"{out['listener_ratio_512']:.2f} for the listener path without napari")
            session.clear()

            for suffix in ("", "_warm"):  # fresh memory, then memory just given back
                gc.collect()
                rss0 = _rss_bytes()
                session.assembler.timing = True
                r = session.stream("plate", 512, plate_n)
                session.assembler.timing = False
                rss1 = _rss_bytes()
                out.update(_flatness(r, suffix))
                if not suffix:
                    pixels = plate_n * 512 * 512 * 2
                    out["rss_ratio"] = round((rss1 - rss0) / pixels, 3)
                    out["plate_layers"] = len(session.viewer.layers)
                    log(f"  rss growth {(rss1 - rss0) / 2**20:.0f} MiB for "
                        f"{pixels / 2**20:.0f} MiB of pixels (ratio {out['rss_ratio']:.2f})")
                session.clear()

            rate = 0.5 * out["ingest_fps_512"]
            session.stream("latency", 512, 32)  # the layer exists before timing starts
            session.latencies.clear()
            n = int(min(rate * (5 if args.quick else 20), 20000))
            session.stream("latency", 512, n, rate=rate)
            lat = np.array(session.latencies) * 1e3
            out["latency_rate_fps"] = round(rate, 1)
            out["latency_p50_ms"] = round(float(np.percentile(lat, 50)), 2)
            out["latency_p99_ms"] = round(float(np.percentile(lat, 99)), 2)
            log(f"latency at {rate:.0f} frames/s ({len(lat)} frames): p50 "
                f"{out['latency_p50_ms']:.1f} ms, p99 {out['latency_p99_ms']:.1f} ms")
            # the same at a fixed 500 frames/s: comparable across code versions and machines
            # whose maximum rate (and so the rate above) differs
            session.latencies.clear()
            session.stream("latency", 512, 500 * (5 if args.quick else 10), rate=500.0)
            lat = np.array(session.latencies) * 1e3
            out["latency_500_p50_ms"] = round(float(np.percentile(lat, 50)), 2)
            out["latency_500_p99_ms"] = round(float(np.percentile(lat, 99)), 2)
            log(f"latency at 500 frames/s ({len(lat)} frames): p50 "
                f"{out['latency_500_p50_ms']:.1f} ms, p99 {out['latency_500_p99_ms']:.1f} ms")
            ticks = np.fromiter(session.render.tick_ms, float)
            out["tick_p50_ms"] = round(float(np.percentile(ticks, 50)), 2)
            out["tick_p99_ms"] = round(float(np.percentile(ticks, 99)), 2)
            out["tick_max_ms"] = round(float(ticks.max()), 2)
            steady = np.fromiter(session.render.steady_tick_ms, float)
            out["tick_p99_steady_ms"] = round(float(np.percentile(steady, 99)), 2)
            log(f"render ticks ({len(ticks)}): p50 {out['tick_p50_ms']:.1f} ms, p99 "
                f"{out['tick_p99_ms']:.1f} ms, max {out['tick_max_ms']:.1f} ms; without the "
                f"{len(ticks) - len(steady)} that created or removed layers: p99 "
                f"{out['tick_p99_steady_ms']:.1f} ms")
        finally:
            session.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
