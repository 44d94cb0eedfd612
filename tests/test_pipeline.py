"""The runner and the synthetic plate: files on disk, every executor, and real streaming.

The end-to-end tests run a pipeline into a real :class:`Receiver` (real ipc sockets, real
shared memory) polled in its own thread, and check exactly which sources, wells, sites and
channels arrived: memory-only steps and filtered wells must be absent.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import napari_hcs_stream.publisher.pipeline as runner
from napari_hcs_stream.protocol import FrameHeader
from napari_hcs_stream.publisher.compiler import compile_pipeline
from napari_hcs_stream.publisher.config import MaterializationConfig, NapariStreamingConfig
from napari_hcs_stream.publisher.pipeline import (
    Pipeline,
    RunResult,
    Step,
    StepError,
    close_publishers,
    run_pipeline,
)
from napari_hcs_stream.publisher.plate import PLATE_FORMATS, SyntheticPlate
from napari_hcs_stream.publisher.wells import WellFilterError

try:
    from .conftest import wait_until
except ImportError:  # tests/ is not a package
    from conftest import wait_until


# -- step functions (top level: worker processes import them by name) ------------------------
def identity(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    return image


def double(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    return image.astype(np.float32) * 2


def nuclei(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    dapi = image[channels.index("DAPI")]
    return (dapi > np.median(dapi)).astype(np.int32)


def first_channel(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    return image[:1]


def boom(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    raise RuntimeError("kaboom")


def float_labels(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    return image[0].astype(np.float32)


def not_an_array(image: np.ndarray, channels: tuple[str, ...]) -> list[int]:
    return [1, 2, 3]


SMALL = SyntheticPlate(n_wells=6, sites=2, channels=("DAPI", "GFP"), size=32)


def executor_for(kind: str):
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=2)
    if kind == "spawn":
        return ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    return ProcessPoolExecutor(max_workers=2)  # the platform's default start method


# -- the synthetic plate --------------------------------------------------------------------
def test_plate_is_deterministic_and_shaped():
    plate = SyntheticPlate(n_wells=96, sites=2, size=128)
    a = plate.read("B03", 2)
    assert a.shape == (4, 128, 128) and a.dtype == np.uint16
    np.testing.assert_array_equal(a, SyntheticPlate(n_wells=96, sites=2, size=128).read("B03", 2))
    assert not np.array_equal(a, plate.read("B03", 1))  # sites differ
    assert not np.array_equal(a, SyntheticPlate(size=128, seed=1).read("B03", 2))
    assert a.max() > 1000  # there are cells, not just background


def test_plate_order_formats_and_sparse_plates():
    for n, (rows, cols) in PLATE_FORMATS.items():
        wells = SyntheticPlate(n_wells=n, size=16).wells()
        assert len(wells) == n == rows * cols
        assert wells[0] == "A01" and wells[1] == "A02" and wells[cols] == "B01"
    assert SyntheticPlate(n_wells=1536, size=16).wells()[-1] == "AF48"
    sparse = SyntheticPlate(n_wells=96, only_wells=("H12", "a1", "B3"), size=16)
    assert sparse.wells() == ["A01", "B03", "H12"]
    assert sparse.site_ids() == [1, 2, 3, 4]
    assert sparse.layout() == {"rows": 8, "cols": 12}


def test_plate_variation_follows_the_plate_design():
    plate = SyntheticPlate(n_wells=96, sites=1, size=256)
    gfp = [float(np.mean([np.percentile(plate.read(f"{r}{c:02d}", 1)[1], 99.5)
                          for r in "BCDEFG"])) for c in (2, 11)]
    assert gfp[1] > 2 * gfp[0]  # cells are brighter with the dose, across columns
    assert plate.dose("A12") > 0.9 > 0.1 > plate.dose("A01")


def test_plate_dtypes_and_channels():
    f = SyntheticPlate(n_wells=6, sites=1, size=32, dtype="float32", channels=tuple("abcdef"))
    img = f.read("A01", 1)
    assert img.dtype == np.float32 and img.shape == (6, 32, 32) and img.min() >= 0
    assert SyntheticPlate(n_wells=6, size=32, dtype=np.uint8).read("A01", 1).dtype == np.uint8


def test_plate_is_cheap_to_send():
    plate = SyntheticPlate(n_wells=1536, sites=9, size=2048)
    blob = pickle.dumps(plate)
    assert len(blob) < 1000
    assert pickle.loads(blob) == plate  # noqa: S301 (our own bytes)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_wells": 100}, "n_wells"), ({"sites": 0}, "sites"), ({"size": 8}, "size"),
     ({"channels": ()}, "channels"), ({"channels": ("A", "A")}, "channels"),
     ({"dtype": "int64"}, "dtype"), ({"only_wells": ("Z99",)}, "Z99"),
     ({"only_wells": ("H12",), "n_wells": 24}, "not on a 24-well plate")],
)
def test_plate_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticPlate(**kwargs)


def test_plate_read_outside_the_plate():
    with pytest.raises(ValueError, match="not on this plate"):
        SMALL.read("C01", 1)
    with pytest.raises(ValueError, match="not on this plate"):
        SMALL.read("A01", 3)


def test_plate_speed():
    """A 512x512x4 uint16 site should take well under 20 ms; allow a noisy shared machine."""
    plate = SyntheticPlate()
    plate.read("A01", 1)  # kernels and the noise tile are made once per worker
    times = []
    for well in plate.wells()[:24]:
        t0 = time.perf_counter()
        plate.read(well, 1)
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.05, f"median {np.median(times) * 1000:.1f} ms"


# -- running: files -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["thread", "process", "spawn"])
def test_run_writes_npy_files(kind, tmp_path):
    pipe = Pipeline("files", [
        Step("twice", double, backend="disk"),
        Step("kept", identity, materialization=MaterializationConfig()),
        Step("mask", nuclei, backend="disk", kind="labels"),
        Step("last", first_channel),
    ], output_dir=tmp_path)
    seen: list[tuple[int, int]] = []
    with executor_for(kind) as ex:
        result = run_pipeline(pipe, SMALL, executor=ex,
                              progress=lambda done, total: seen.append((done, total)))
    assert isinstance(result, RunResult)
    assert result.n_tasks == 12
    assert seen == [(i, 12) for i in range(1, 13)]
    assert set(result.written) == {"twice", "kept (checkpoint)", "mask", "last"}
    run_dir = tmp_path / result.run_id
    for source, folder in [("twice", "twice"), ("kept (checkpoint)", "kept.checkpoint"),
                           ("mask", "mask"), ("last", "last")]:
        paths = result.written[source]
        assert len(paths) == 12
        assert {p.parent for p in paths} == {run_dir / folder}
        assert {p.name for p in paths} == {f"{w}_s{s}.npy" for w in SMALL.wells() for s in (1, 2)}
    raw = SMALL.read("B02", 2)
    np.testing.assert_array_equal(np.load(run_dir / "twice" / "B02_s2.npy"), double(raw, ()))
    np.testing.assert_array_equal(np.load(run_dir / "kept.checkpoint" / "B02_s2.npy"),
                                  double(raw, ()))
    mask = np.load(run_dir / "mask" / "B02_s2.npy")
    assert mask.dtype == np.int32 and mask.shape == (32, 32)
    # a labels step is a side output: the next step got the image, not the mask
    np.testing.assert_array_equal(np.load(run_dir / "last" / "B02_s2.npy"), double(raw, ())[:1])
    assert not list(run_dir.rglob("*.tmp"))
    assert result.producers == {} and result.unavailable == {}


def test_default_executor(tmp_path):
    pipe = Pipeline("default", [Step("a", double)], output_dir=tmp_path)
    plate = SyntheticPlate(n_wells=6, sites=1, size=16)
    result = run_pipeline(pipe, plate)
    assert len(result.written["a"]) == 6 and result.duration > 0


def test_compiled_pipeline_and_defaults(tmp_path):
    compiled = compile_pipeline(Pipeline("c", [Step("a", identity)], output_dir=tmp_path),
                                run_id="fixed-run")
    with ThreadPoolExecutor(1) as ex:
        result = run_pipeline(compiled, SyntheticPlate(n_wells=6, sites=1, size=16), executor=ex,
                              viewers=False)
    assert result.run_id == "fixed-run"
    assert (tmp_path / "fixed-run" / "a" / "A01_s1.npy").is_file()
    with pytest.raises(TypeError, match="pass them to compile_pipeline"):
        run_pipeline(compiled, SMALL, executor=ex, defaults=runner.GlobalConfig())
    with pytest.raises(TypeError, match="Pipeline or a CompiledPipeline"):
        run_pipeline([Step("a", identity)], SMALL)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a Plate"):
        run_pipeline(compiled, "plate.tif")  # type: ignore[arg-type]


# -- running: errors ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_failing_step_names_step_well_and_site(kind, tmp_path):
    pipe = Pipeline("fails", [Step("ok", identity), Step("broken", boom)], output_dir=tmp_path)
    with executor_for(kind) as ex, pytest.raises(StepError) as info:
        run_pipeline(pipe, SMALL, executor=ex, viewers=False)
    assert "step 'broken' failed on well" in str(info.value) and "kaboom" in str(info.value)


@pytest.mark.parametrize(
    ("step", "match"),
    [(Step("bad", float_labels, kind="labels"), "labels must be integers"),
     (Step("bad", not_an_array), "not a numpy array"),
     (Step("bad", identity, kind="labels"), r"returns a \(Y, X\) array")],
)
def test_step_output_is_checked(step, match, tmp_path):
    with ThreadPoolExecutor(1) as ex, pytest.raises(StepError, match=match):
        run_pipeline(Pipeline("p", [step], output_dir=tmp_path), SMALL, executor=ex, viewers=False)


def test_unpicklable_step_with_processes_is_a_clear_error(tmp_path):
    pipe = Pipeline("p", [Step("lambda", lambda im, ch: im)], output_dir=tmp_path)
    with ProcessPoolExecutor(1) as ex, pytest.raises(TypeError, match="top level of a module"):
        run_pipeline(pipe, SMALL, executor=ex, viewers=False)
    with ThreadPoolExecutor(1) as ex:  # threads need no pickling
        assert run_pipeline(pipe, SMALL, executor=ex, viewers=False).n_tasks == 12


def test_well_filter_outside_the_plate_fails_before_any_work(tmp_path):
    pipe = Pipeline("p", [Step("a", identity, streaming=NapariStreamingConfig(
        well_filter="row:H"))], output_dir=tmp_path)
    with pytest.raises(WellFilterError, match="outside this 6-well plate"):
        run_pipeline(pipe, SMALL, executor=ThreadPoolExecutor(1), viewers=False)
    assert not any(tmp_path.iterdir())


# -- zero cost without streaming --------------------------------------------------------------
def test_no_config_creates_no_publisher(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a publisher was opened although nothing streams")

    monkeypatch.setattr(runner, "_open_publisher", forbidden)
    pipes = [
        Pipeline("none", [Step("a", double, backend="disk"), Step("b", identity)],
                 streaming=NapariStreamingConfig(), output_dir=tmp_path),
        # a config, but on a memory-only step, and a final step with none: nothing streams
        Pipeline("memory", [Step("a", double, streaming=NapariStreamingConfig()),
                            Step("b", identity)], output_dir=tmp_path),
    ]
    for pipe in pipes:
        assert compile_pipeline(pipe).viewers == []
        with ThreadPoolExecutor(2) as ex:
            result = run_pipeline(pipe, SMALL, executor=ex, viewers=False)
        assert result.producers == {} and result.unavailable == {}
    assert not runner._sinks


def test_no_viewer_costs_a_bounded_time_and_is_counted(tmp_path, runtime_dir):
    pipe = Pipeline("absent", [
        Step("a", identity, backend="disk", streaming=NapariStreamingConfig(endpoint="nobody")),
    ], output_dir=tmp_path)
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as ex:
        result = run_pipeline(pipe, SMALL, executor=ex, viewers=False)
    elapsed = time.monotonic() - t0
    assert elapsed < 15, elapsed  # one connect wait per worker thread, not one per frame
    assert sum(p["sent"] for p in result.producers.values()) == 0
    assert sum(p["dropped"] for p in result.producers.values()) == 12 * 2  # sites x channels
    assert len(result.written["a"]) == 12
    assert not runner._sinks  # closed at the end of the run


def test_unopenable_publisher_is_counted_not_raised(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(runner, "_open_publisher", broken)
    pipe = Pipeline("p", [Step("a", identity, streaming=NapariStreamingConfig())],
                    output_dir=tmp_path)
    with ThreadPoolExecutor(2) as ex:
        result = run_pipeline(pipe, SMALL, executor=ex, viewers=False)
    assert result.unavailable == {"default": 24} and result.producers == {}


def test_close_publishers_of_this_process(monkeypatch):
    closed = []

    class FakePublisher:
        def close(self):
            closed.append(self)

    monkeypatch.setattr(runner, "_open_publisher", lambda *a, **k: FakePublisher())
    plan = compile_pipeline(
        Pipeline("p", [Step("a", identity, streaming=NapariStreamingConfig())],
                 output_dir="/nonexistent"), run_id="r1").steps[0]
    runner._sink_for(plan.streams[0], "r1")
    runner._sink_for(plan.streams[0], "r1")  # cached: still one
    assert len(runner._sinks) == 1
    runner._sink_for(plan.streams[0], "r2")  # a new run in this thread frees the old one
    assert len(closed) == 1 and len(runner._sinks) == 1
    assert close_publishers("other") == 0
    assert close_publishers() == 1 and len(closed) == 2 and not runner._sinks


# -- end to end into a real receiver ------------------------------------------------------------
class LiveReceiver:
    """A real Receiver bound and polled in its own thread, as the viewer's listener does."""

    def __init__(self, endpoint: str) -> None:
        from napari_hcs_stream.receiver import Receiver

        self.frames: list[tuple[FrameHeader, np.ndarray]] = []
        self.receiver = Receiver(endpoint, on_frame=self._on_frame)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the receiver did not start: {self._error}")

    def _on_frame(self, header: FrameHeader, array: np.ndarray) -> None:
        self.frames.append((header, array.copy()))

    def _run(self) -> None:
        try:
            self.receiver.bind()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                self.receiver.poll(20)
        finally:
            self.receiver.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def live_receiver(runtime_dir):
    rx = LiveReceiver("e2e")
    yield rx
    rx.stop()


def e2e_pipeline(out: Path, strict: bool) -> Pipeline:
    return Pipeline("e2e", [
        # memory-only with a config: must not arrive
        Step("smooth", double, streaming=NapariStreamingConfig()),
        # memory with a checkpoint, row A only
        Step("illum", identity, materialization=MaterializationConfig(),
             streaming=NapariStreamingConfig(well_filter="row:A")),
        # labels on disk, all wells but B01 and B02
        Step("nuclei", nuclei, backend="disk", kind="labels",
             streaming=NapariStreamingConfig(well_filter="B01:B02", well_filter_mode="exclude")),
        # on disk without a config: must not arrive
        Step("hidden", identity, backend="disk"),
        # the final memory step is written, so it streams: the first 2 wells
        Step("final", identity, streaming=NapariStreamingConfig(well_filter=2, downsample=2)),
    ], streaming=NapariStreamingConfig(endpoint="e2e", channel_names={"GFP": "Green"},
                                       colormaps={"Green": "green"}, strict=strict),
        output_dir=out)


def expected_items() -> set[tuple[str, str, int, object, str]]:
    sites = (1, 2)
    items = {("illum (checkpoint)", w, s, c, "image")
             for w in ("A01", "A02", "A03") for s in sites for c in ("DAPI", "Green")}
    items |= {("nuclei", w, s, None, "labels") for w in ("A01", "A02", "A03", "B03")
              for s in sites}
    items |= {("final", w, s, c, "image") for w in ("A01", "A02") for s in sites
              for c in ("DAPI", "Green")}
    return items


@pytest.mark.parametrize(("kind", "strict"), [("thread", False), ("thread", True),
                                              ("process", True), ("spawn", True)])
def test_end_to_end_into_a_real_receiver(kind, strict, live_receiver, tmp_path):
    """Strict delivery makes the arrivals exact even on a loaded machine; the default mode
    may drop a frame when the receiver falls behind, and must then count it."""
    compiled = compile_pipeline(e2e_pipeline(tmp_path, strict))
    assert [v.endpoint for v in compiled.viewers] == ["e2e"]
    with executor_for(kind) as ex:
        result = run_pipeline(compiled, SMALL, executor=ex, viewers=False)
    rx = live_receiver.receiver
    expected = expected_items()
    sent = sum(p["sent"] for p in result.producers.values())
    dropped = sum(p["dropped"] for p in result.producers.values())
    assert sent + dropped == len(expected), result.producers
    assert all(0 < p["max_publish_s"] < 30 for p in result.producers.values())
    wait_until(lambda: rx.reached(result.last_seqs) and len(live_receiver.frames) >= sent,
               timeout=30, message="every frame the run sent reaches the receiver")

    got = [(h.source, h.coords.well, h.coords.site, h.coords.channel, h.kind)
           for h, _ in live_receiver.frames]
    assert len(got) == len(set(got)) == sent  # nothing twice, nothing lost on the way
    assert set(got) <= expected
    if strict or dropped == 0:
        assert set(got) == expected and dropped == 0
    assert rx.stats.torn == rx.stats.rejected == 0
    assert {h.run for h, _ in live_receiver.frames} == {result.run_id}

    # the pixels are the step's output; labels are labels
    by_item = {(h.source, h.coords.well, h.coords.site, h.coords.channel): a
               for h, a in live_receiver.frames}
    raw = SMALL.read("A02", 2)
    np.testing.assert_array_equal(by_item[("final", "A02", 2, "Green")], double(raw, ())[1])
    np.testing.assert_array_equal(by_item[("nuclei", "B03", 1, None)],
                                  np.load(result.written["nuclei"][0].parent / "B03_s1.npy"))

    # the first frame of each source from each producer carries the heavy metadata
    firsts: dict[tuple[str, str], FrameHeader] = {}
    for h, _ in live_receiver.frames:
        firsts.setdefault((h.producer, h.source), h)
    for h in firsts.values():
        assert h.meta["plate"] == {"rows": 2, "cols": 3}
        assert h.meta["modes"]["channel"] == "layer"
        if h.kind == "image":
            assert h.meta["channel_names"] == ["DAPI", "Green"]
            assert h.meta["colormaps"] == {"DAPI": "blue", "Green": "green"}
        # a display resolution is sent only where a config asks for one
        assert h.meta.get("downsample") == (2 if h.source == "final" else None)
    light = [h for h, _ in live_receiver.frames if h not in firsts.values()]
    assert light and all("plate" not in h.meta for h in light)

    # every producer said goodbye (closed) once the run and its workers ended
    wait_until(lambda: all(rx.stats.producers[p].closed for p in result.producers),
               timeout=20, message="every publisher closed")
    assert len(result.written["final"]) == 12 and len(result.written["hidden"]) == 12


def test_the_pipeline_side_runs_without_qt_or_napari(tmp_path, runtime_dir):
    """A pipeline worker has no GUI stack: importing and running must not need one."""

    code = textwrap.dedent(f"""
        import sys
        from concurrent.futures import ThreadPoolExecutor

        class NoGui:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2",
                                          "PySide6", "superqt", "magicgui", "vispy"):
                    raise ImportError(f"{{name}} is not installed on a pipeline worker")
                return None

        sys.meta_path.insert(0, NoGui())
        from napari_hcs_stream.publisher import (
            NapariStreamingConfig, Pipeline, Step, SyntheticPlate, run_pipeline)
        from tests_steps import identity

        pipe = Pipeline("nogui", [Step("a", identity, backend="disk",
                                       streaming=NapariStreamingConfig(endpoint="nobody"))],
                        output_dir={str(tmp_path)!r})
        plate = SyntheticPlate(n_wells=6, sites=1, size=16)
        with ThreadPoolExecutor(1) as ex:
            result = run_pipeline(pipe, plate, executor=ex, viewers=False)
        assert len(result.written["a"]) == 6
        print("ok")
    """)
    (tmp_path / "tests_steps.py").write_text(
        "def identity(image, channels):\n    return image\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
