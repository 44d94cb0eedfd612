"""A small pipeline runner: steps over every (well, site) of a plate, on any Executor.

The runner exists for the demo and the tests; the publisher does not depend on it. Its one
unit of work is a site: read the image, run the steps in order, write what is persisted,
publish what streams. The worker function :func:`run_site` is top level and takes plain data
(the compiled plan and a plate description), so a ``ThreadPoolExecutor``, a
``ProcessPoolExecutor`` (fork or spawn) or a ``dask.distributed`` client all run it.

Each worker thread keeps one publisher per (endpoint, run): opening one costs a connection
and a shared-memory ring, far too much per site. A worker process closes its publishers at
exit through ``multiprocessing.util.Finalize`` (``atexit`` does not run in pool workers), and
the runner closes the ones made in its own process (threads) when the run ends.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from multiprocessing.reduction import ForkingPickler
from multiprocessing.util import Finalize
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .config import GlobalConfig, MaterializationConfig, StreamingConfig
from .plate import Plate

if TYPE_CHECKING:
    from .compiler import CompiledPipeline, StepPlan, StreamPlan

log = logging.getLogger("napari_hcs_stream")

StepFunc = Callable[[np.ndarray, tuple[str, ...]], np.ndarray]
BACKENDS = ("memory", "disk", "zarr")
KINDS = ("image", "labels")
#: heavy metadata (channel names, colormaps, modes, plate layout) is re-sent this often per
#: source, so that a viewer started (or restarted) mid-run still learns it
META_REFRESH_S = 5.0


class StepError(RuntimeError):
    """A step failed on one site; the text names the step, the well and the site."""


@dataclass(eq=False)
class Step:
    """One processing step: ``func(image (C, Y, X), channels) -> (C, Y, X) image or (Y, X)
    labels``.

    ``backend`` says where the main output goes ("memory": only to the next step). A labels
    step is a side output: the next step receives the image the labels step received.
    Streaming configs may sit in any attribute (``streaming`` is only the usual name).
    """

    name: str
    func: StepFunc
    _: KW_ONLY
    backend: Literal["memory", "disk", "zarr"] = "memory"
    materialization: MaterializationConfig | None = None
    streaming: StreamingConfig | None = None
    kind: Literal["image", "labels"] = "image"
    output_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 200:
            raise ValueError(f"a step's name is a non-empty string (at most 200 characters), "
                             f"got {self.name!r}")
        if not callable(self.func):
            raise TypeError(f"step {self.name!r}: func must be callable, got {self.func!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"step {self.name!r}: backend must be one of {BACKENDS}, "
                             f"got {self.backend!r}")
        if self.kind not in KINDS:
            raise ValueError(f"step {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.materialization is not None and not isinstance(self.materialization,
                                                               MaterializationConfig):
            raise TypeError(f"step {self.name!r}: materialization must be a "
                            f"MaterializationConfig, got {self.materialization!r}")
        if self.streaming is not None and not isinstance(self.streaming, StreamingConfig):
            raise TypeError(f"step {self.name!r}: streaming must be a StreamingConfig "
                            f"(e.g. NapariStreamingConfig()), got {self.streaming!r}")
        if self.output_dir is not None:
            if not isinstance(self.output_dir, (str, Path)):
                raise TypeError(f"step {self.name!r}: output_dir must be a path")
            self.output_dir = Path(self.output_dir)


@dataclass(eq=False)
class Pipeline:
    """Steps run in order on every site; ``streaming`` holds defaults the steps inherit.

    The pipeline's config never streams anything by itself: only steps that carry a
    streaming config stream.
    """

    name: str
    steps: list[Step]
    _: KW_ONLY
    streaming: StreamingConfig | None = None
    output_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a pipeline's name is a non-empty string, got {self.name!r}")
        self.steps = list(self.steps)
        if not self.steps:
            raise ValueError(f"pipeline {self.name!r} has no steps")
        for s in self.steps:
            if not isinstance(s, Step):
                raise TypeError(f"pipeline {self.name!r}: steps must be Step objects, got {s!r}")
        names = [s.name for s in self.steps]
        from .compiler import safe_name

        folders = [safe_name(n) for n in names]
        dupes = sorted({n for n, f in zip(names, folders, strict=True) if folders.count(f) > 1})
        if dupes:
            raise ValueError(f"pipeline {self.name!r}: step names must be distinct (they name "
                             f"layers and folders), repeated: {dupes}")
        if self.streaming is not None and not isinstance(self.streaming, StreamingConfig):
            raise TypeError(f"pipeline {self.name!r}: streaming must be a StreamingConfig, "
                            f"got {self.streaming!r}")
        if self.output_dir is not None:
            if not isinstance(self.output_dir, (str, Path)):
                raise TypeError(f"pipeline {self.name!r}: output_dir must be a path")
            self.output_dir = Path(self.output_dir)


@dataclass
class RunResult:
    """What a run did: files written per output, and each producer's counts.

    ``producers`` maps producer id -> {"last_seq", "sent", "dropped", "max_publish_s",
    "waited_s", "endpoint"}: ``last_seq`` is what a viewer needs to ``flush`` (wait until all
    of it is shown), ``max_publish_s`` the slowest publish and ``waited_s`` the time spent
    waiting for the viewer to free shared memory (the cost the viewer put on the pipeline).
    ``unavailable`` counts, per endpoint, items not published because no publisher could be
    opened there.
    """

    run_id: str
    n_tasks: int
    written: dict[str, list[Path]]
    producers: dict[str, dict[str, Any]]
    duration: float
    unavailable: dict[str, int] = field(default_factory=dict)

    @property
    def last_seqs(self) -> dict[str, int]:
        return {pid: int(p["last_seq"]) for pid, p in self.producers.items()}


# -- the worker ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteTask:
    """One unit of work, as plain picklable data."""

    run_id: str
    steps: tuple[StepPlan, ...]
    plate: Plate
    well: str
    site: int


@dataclass
class SiteResult:
    well: str
    site: int
    written: list[tuple[str, str]]  # (source, path)
    producers: dict[str, dict[str, Any]]
    unavailable: dict[str, int]


class _Sink:
    """One publisher of one thread, plus which sources already got their heavy metadata."""

    def __init__(self, key: tuple[Any, ...], publisher: Any, error: str | None = None) -> None:
        self.key = key
        self.publisher = publisher
        self.error = error
        self.meta_sent: dict[str, float] = {}
        self.failed = 0  # publish() raised: our item was not streamable (dtype, shape, ...)
        self.warned: set[str] = set()
        self.finalizer: Finalize | None = None
        if publisher is not None:
            self.finalizer = Finalize(None, _close_quietly, args=(publisher,), exitpriority=10)

    def close(self) -> None:
        if self.finalizer is not None:
            self.finalizer()  # runs _close_quietly once and unregisters it


def _close_quietly(publisher: Any) -> None:
    try:
        publisher.close()
    except Exception:  # closing must never fail a run or a worker's exit
        log.debug("closing a publisher failed", exc_info=True)


_sinks: dict[tuple[Any, ...], _Sink] = {}
_sinks_lock = threading.Lock()


def _open_publisher(endpoint: str, run: str, transport: str, strict: bool,
                    server_key: str | None = None) -> Any:
    """Open a publisher: the one place the runner touches the transport (tests replace it)."""
    from ._publisher import Publisher

    return Publisher(endpoint, run=run, transport=transport,  # type: ignore[arg-type]
                     strict=strict, server_key=server_key)


def _sink_for(stream: StreamPlan, run_id: str) -> _Sink:
    cfg = stream.config
    me = (os.getpid(), threading.get_ident())
    key = (*me, cfg.endpoint, run_id, cfg.transport, bool(cfg.strict), cfg.server_key)
    with _sinks_lock:
        sink = _sinks.get(key)
        if sink is not None:
            return sink
        # a thread works for one run at a time: free what it opened for earlier runs
        stale = [_sinks.pop(k) for k in list(_sinks) if k[:2] == me and k[3] != run_id]
    for old in stale:
        old.close()  # outside the lock: closing may wait (bounded) for the viewer
    try:
        publisher = _open_publisher(str(cfg.endpoint), run_id, str(cfg.transport),
                                    bool(cfg.strict), cfg.server_key)
        sink = _Sink(key, publisher)
    except Exception as exc:
        if cfg.strict:
            raise
        log.warning("cannot stream to %r (items are dropped): %s", cfg.endpoint, exc)
        sink = _Sink(key, None, error=str(exc))
    with _sinks_lock:
        _sinks[key] = sink
    return sink


def close_publishers(run_id: str | None = None) -> int:
    """Close this process's publishers (of one run, or all); returns how many were closed.

    The runner calls it for the threads of its own process. On a long-lived pool whose
    workers should release their publishers before exiting, submit it to the workers (with
    dask: ``client.run(close_publishers, run_id)``).
    """
    with _sinks_lock:
        keys = [k for k in _sinks
                if k[0] == os.getpid() and (run_id is None or k[3] == run_id)]
        sinks = [_sinks.pop(k) for k in keys]
    for sink in sinks:
        sink.close()
    return sum(1 for s in sinks if s.publisher is not None)


def _stats(sink: _Sink) -> dict[str, Any]:
    publisher = sink.publisher
    stats = publisher.stats
    get = stats.get if isinstance(stats, Mapping) else lambda k, d=0: getattr(stats, k, d)
    slowest = get("max_publish_s", 0.0)
    return {"last_seq": int(publisher.last_seq), "sent": int(get("sent", 0)),
            "dropped": int(get("dropped", 0)) + sink.failed,
            "max_publish_s": float(slowest() if callable(slowest) else slowest),
            "waited_s": float(get("waited_s", 0.0)), "endpoint": str(sink.key[2])}


def _channel_names(cfg: StreamingConfig, names: tuple[str, ...]) -> list[str]:
    rename: dict[Any, str] = getattr(cfg, "channel_names", None) or {}
    return [rename.get(n, rename.get(i, n)) for i, n in enumerate(names)]


def _publish(sink: _Sink, stream: StreamPlan, plan: StepPlan, source: str, data: np.ndarray,
             names: tuple[str, ...], task: SiteTask, unavailable: dict[str, int]) -> None:
    cfg = stream.config
    planes = [data] if plan.kind == "labels" else list(data)
    if sink.publisher is None:
        unavailable[str(cfg.endpoint)] = unavailable.get(str(cfg.endpoint), 0) + len(planes)
        return
    channels: list[str | None] = (
        [None] if plan.kind == "labels" else list(_channel_names(cfg, names)))
    now = time.monotonic()
    heavy = now - sink.meta_sent.get(source, -1e9) > META_REFRESH_S
    meta: dict[str, Any] | None = None
    if heavy:
        meta = {"plate": task.plate.layout(), "modes": getattr(cfg, "modes", None) or {},
                "step": plan.step_name}
        downsample = getattr(cfg, "downsample", None)
        if downsample is not None:  # else the viewer's own resolution setting decides
            meta["downsample"] = downsample
        if plan.kind != "labels":
            colormaps = getattr(cfg, "colormaps", None) or {}
            meta["channel_names"] = channels
            meta["colormaps"] = {c: cmap for c, n in zip(channels, names, strict=True)
                                 if (cmap := colormaps.get(c) or colormaps.get(n))}
    for plane, channel in zip(planes, channels, strict=True):
        try:
            ok = sink.publisher.publish(plane, well=task.well, site=task.site, channel=channel,
                                        source=source, kind=plan.kind, meta=meta)
        except Exception as exc:
            if cfg.strict:
                raise
            sink.failed += 1
            if source not in sink.warned:  # once per source: not once per frame
                sink.warned.add(source)
                log.warning("cannot stream %r (%s %s s%d; further failures are only "
                            "counted as dropped): %s", source, plan.kind, task.well, task.site,
                            exc)
            ok = False
        if ok and meta is not None:
            sink.meta_sent[source] = now
            meta = None  # one delivered frame with the heavy metadata is enough


def _write(directory: Path, backend: str, well: str, site: int, data: np.ndarray) -> Path:
    stem = f"{well}_s{site}"
    if backend == "zarr":
        import zarr

        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stem}.zarr"
        zarr.save_array(str(path), data)
        return path
    path = directory / f"{stem}.npy"
    tmp = directory / f".{stem}.{os.getpid()}.{threading.get_ident()}.tmp"
    if not directory.is_dir():  # workers may race to create it: fine
        directory.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as fh:  # write then rename: a reader never sees half a file
        np.save(fh, data)
    tmp.replace(path)
    return path


def _check_output(plan: StepPlan, out: object, task: SiteTask) -> np.ndarray:
    where = f"step {plan.step_name!r} on well {task.well} site {task.site}"
    if not isinstance(out, np.ndarray):
        raise StepError(f"{where} returned {type(out).__name__}, not a numpy array")
    if plan.kind == "labels":
        if out.ndim != 2:
            raise StepError(f"{where}: a labels step returns a (Y, X) array, got shape "
                            f"{out.shape}")
        if out.dtype == bool:
            out = out.astype(np.uint8)
        if not np.issubdtype(out.dtype, np.integer):
            raise StepError(f"{where}: labels must be integers, got {out.dtype}")
        return out
    if out.ndim == 2:
        out = out[np.newaxis]
    if out.ndim != 3:
        raise StepError(f"{where}: an image step returns a (C, Y, X) array, got shape "
                        f"{out.shape}")
    return out


def run_site(task: SiteTask) -> SiteResult:
    """Process one (well, site): the function every executor runs."""
    image = task.plate.read(task.well, task.site)
    names = tuple(task.plate.channels)
    written: list[tuple[str, str]] = []
    unavailable: dict[str, int] = {}
    used: dict[tuple[Any, ...], _Sink] = {}
    for plan in task.steps:
        try:
            out = plan.func(image, names)
        except Exception as exc:
            raise StepError(f"step {plan.step_name!r} failed on well {task.well} site "
                            f"{task.site}: {type(exc).__name__}: {exc}") from exc
        out = _check_output(plan, out, task)
        out_names = names if plan.kind == "labels" or out.shape[0] == len(names) else tuple(
            f"c{i}" for i in range(out.shape[0]))
        if plan.output_dir is not None:
            path = _write(plan.output_dir, plan.backend, task.well, task.site, out)
            written.append((plan.source, str(path)))
        if plan.checkpoint_dir is not None and plan.checkpoint_backend is not None:
            path = _write(plan.checkpoint_dir, plan.checkpoint_backend, task.well, task.site,
                          out)
            written.append((plan.checkpoint_source, str(path)))
        for stream in plan.streams:
            if not (stream.stream_main or stream.stream_checkpoint):
                continue
            wf = stream.well_filter
            if wf is not None and task.well not in wf:
                continue
            sink = _sink_for(stream, task.run_id)
            used[sink.key] = sink
            if stream.stream_main:
                _publish(sink, stream, plan, plan.source, out, out_names, task, unavailable)
            if stream.stream_checkpoint:
                _publish(sink, stream, plan, plan.checkpoint_source, out, out_names, task,
                         unavailable)
        if plan.kind == "image":
            image, names = out, out_names
    producers = {}
    for sink in used.values():
        if sink.publisher is not None:
            producers[str(sink.publisher.producer_id)] = _stats(sink)
    return SiteResult(task.well, task.site, written, producers, unavailable)


# -- the orchestrator ------------------------------------------------------------------------
def _check_picklable(task: SiteTask) -> None:
    """Serialise one task the way the process pool will (outbound only: nothing here is ever
    loaded), so a lambda step fails now with advice instead of deep inside the pool."""
    try:
        ForkingPickler.dumps(task)
    except Exception as exc:
        raise TypeError(
            f"the pipeline cannot be sent to worker processes ({exc}); step functions must "
            "be defined at the top level of a module (no lambdas or local functions), or run "
            "with a ThreadPoolExecutor"
        ) from exc


def run_pipeline(
    pipeline_or_compiled: Pipeline | CompiledPipeline,
    plate: Plate,
    *,
    executor: Executor | None = None,
    progress: Callable[[int, int], None] | None = None,
    defaults: GlobalConfig | None = None,
    viewers: bool = True,
) -> RunResult:
    """Run every (well, site) of ``plate`` through the pipeline on ``executor``.

    ``executor`` is any object with ``submit()`` returning futures with
    ``add_done_callback()``: a ``concurrent.futures`` executor or a ``dask.distributed``
    client. None: a ``ProcessPoolExecutor`` of up to 2 workers, shut down at the end.
    ``progress(done, total)`` is called in this thread as sites complete. The first failing
    site cancels what has not started and its :class:`StepError` is raised.

    ``viewers``: launch (or reuse) the viewers the run needs before the first site, and flush
    them at the end, so that when this returns the results are on screen; a non-persistent
    viewer is then shut down. False: the caller manages viewers (or a bare receiver listens).
    """
    from .compiler import CompiledPipeline, compile_pipeline

    if isinstance(pipeline_or_compiled, Pipeline):
        compiled = compile_pipeline(pipeline_or_compiled, defaults=defaults)
    elif isinstance(pipeline_or_compiled, CompiledPipeline):
        if defaults is not None:
            raise TypeError("defaults apply when compiling: pass them to compile_pipeline()")
        compiled = pipeline_or_compiled
    else:
        raise TypeError(f"run_pipeline() takes a Pipeline or a CompiledPipeline, "
                        f"got {type(pipeline_or_compiled).__name__}")
    if not isinstance(plate, Plate):
        raise TypeError(f"plate must be a Plate (e.g. SyntheticPlate), got {plate!r}")
    compiled = compiled.for_plate(plate)  # bad well filters fail here, before any work
    steps = tuple(compiled.steps)
    tasks = [SiteTask(compiled.run_id, steps, plate, w, s)
             for w in plate.wells() for s in plate.site_ids()]
    managers = _start_viewers(compiled) if viewers else []
    own = executor is None
    if executor is None:
        executor = ProcessPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    if isinstance(executor, ProcessPoolExecutor) and tasks:
        _check_picklable(tasks[0])

    written: dict[str, list[Path]] = {}
    for plan in steps:
        if plan.output_dir is not None:
            written[plan.source] = []
        if plan.checkpoint_dir is not None:
            written[plan.checkpoint_source] = []
    producers: dict[str, dict[str, Any]] = {}
    unavailable: dict[str, int] = {}
    start = time.monotonic()
    done_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    futures = []
    try:
        for task in tasks:
            fut = executor.submit(run_site, task)
            fut.add_done_callback(done_q.put)
            futures.append(fut)
        for done in range(1, len(futures) + 1):
            fut = done_q.get()
            result: SiteResult = fut.result()  # re-raises the site's error
            for source, path in result.written:
                written.setdefault(source, []).append(Path(path))
            for pid, stats in result.producers.items():
                known = producers.get(pid)
                if known is None:
                    producers[pid] = dict(stats)
                elif stats["last_seq"] >= known["last_seq"]:  # counts are cumulative
                    slowest = max(known["max_publish_s"], stats["max_publish_s"])
                    producers[pid] = {**stats, "max_publish_s": slowest}
                else:
                    known["max_publish_s"] = max(known["max_publish_s"],
                                                 stats["max_publish_s"])
            for endpoint, n in result.unavailable.items():
                unavailable[endpoint] = unavailable.get(endpoint, 0) + n
            if progress is not None:
                progress(done, len(futures))
    except BaseException:
        for fut in futures:
            fut.cancel()
        # wait for the sites already running (a cancelled future reports done too) before
        # closing publishers their threads may still be using
        pending = sum(1 for f in futures if not f.done())
        for _ in range(pending):
            done_q.get()
        raise
    finally:
        close_publishers(compiled.run_id)  # those of this process's threads
        if own:
            executor.shutdown(wait=True, cancel_futures=True)
    for paths in written.values():
        paths.sort()
    run_result = RunResult(run_id=compiled.run_id, n_tasks=len(tasks), written=written,
                           producers=producers, duration=time.monotonic() - start,
                           unavailable=unavailable)
    for manager in managers:
        _finish_viewer(manager, run_result)
    return run_result


def _start_viewers(compiled: CompiledPipeline) -> list[Any]:
    """Launch or reuse one viewer per endpoint the run streams to (none: no cost at all)."""
    from .viewer import ViewerError, ViewerManager

    managers = []
    for spec in compiled.viewers:
        manager = ViewerManager(spec.endpoint, persistent=spec.persistent,
                                server_key=spec.server_key)
        try:
            manager.start_viewer()
        except ViewerError as exc:  # the run goes on; its frames are counted as dropped
            log.error("streaming to %r is off for this run: %s", spec.endpoint, exc)
            continue
        managers.append(manager)
    return managers


def _finish_viewer(manager: Any, result: RunResult) -> None:
    """Flush (the run's results are visible when the run returns), then stop a non-persistent
    viewer. A viewer that died or hangs costs a bounded wait and a warning, never an error."""
    until = {pid: int(p["last_seq"]) for pid, p in result.producers.items()
             if p.get("endpoint") == manager.endpoint_spec and p["last_seq"] >= 0}
    if until:
        reply = manager.flush(until)
        if not reply.get("ok"):
            log.warning("viewer %r: not everything is shown: %s", manager.endpoint_spec,
                        reply.get("error") or reply)
    manager.stop_viewer()
