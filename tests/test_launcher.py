"""Launching and reusing a real napari viewer process from the pipeline side (under Xvfb)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import wait_until
from napari_hcs_stream.demo import build_pipeline
from napari_hcs_stream.publisher import (
    Pipeline,
    SyntheticPlate,
    compile_pipeline,
    run_pipeline,
)
from napari_hcs_stream.publisher.viewer import ViewerManager

pytestmark = [pytest.mark.gui, pytest.mark.slow]


@pytest.fixture
def endpoint_name(runtime_dir: Path) -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def viewer(endpoint_name: str):
    """A launched, non-persistent viewer, shut down (over its control channel) afterwards."""
    manager = ViewerManager(endpoint_name, persistent=False)
    info = manager.start_viewer()
    assert info.launched
    yield manager
    manager.stop_viewer(force=True)
    if manager._process is not None and manager._process.poll() is None:
        manager._process.wait(timeout=30)


def _pipeline(endpoint: str, output: Path, well_filter: str | None = None,
              persistent: bool = False) -> Pipeline:
    return build_pipeline(endpoint, output, persistent=persistent, well_filter=well_filter,
                          name="test")


def _flush(manager: ViewerManager, result) -> None:
    reply = manager.flush({k: v["last_seq"] for k, v in result.producers.items()}, timeout=60)
    assert reply.get("ok"), reply


def test_run_streams_exactly_the_persisted_outputs(viewer: ViewerManager, tmp_path: Path):
    plate = SyntheticPlate(n_wells=24, sites=2, channels=("DAPI", "GFP"), size=64)
    compiled = compile_pipeline(_pipeline(viewer.endpoint_spec, tmp_path, "row:A,row:B"))
    assert [v.endpoint for v in compiled.viewers] == [viewer.endpoint_spec]
    with ThreadPoolExecutor(2) as pool:
        result = run_pipeline(compiled, plate, executor=pool, viewers=False)
    _flush(viewer, result)
    layers = {layer["name"]: layer for layer in viewer.state()["layers"]}
    sources = {layer["source"] for layer in layers.values()}
    assert sources == {"illumination (checkpoint)", "segmentation"}  # no memory-only denoise
    wells = 12  # rows A and B of a 24-well plate (4 x 6)
    for layer in layers.values():
        per_layer = wells * 2  # sites
        assert layer["frames"] == per_layer, layer
        assert layer["run"] == compiled.run_id
    channels = {layer.get("channel") for layer in layers.values() if layer["kind"] == "image"}
    assert channels == {"DAPI", "GFP"}
    assert [layer["kind"] for layer in layers.values()].count("labels") == 1
    # a plate montage, from the pipeline's side
    assert viewer.overview() == {**viewer.overview(), "ok": True, "active": True}
    reply = viewer.screenshot(tmp_path / "plate.png", canvas_only=True)
    assert reply["ok"] and (tmp_path / "plate.png").stat().st_size > 0
    assert viewer.overview(on=False)["active"] is False
    assert not viewer.screenshot("relative.png")["ok"]


def test_second_run_reuses_the_persistent_viewer(endpoint_name: str, tmp_path: Path):
    first = ViewerManager(endpoint_name, persistent=True)
    try:
        info = first.start_viewer()
        assert info.launched
        second = ViewerManager(endpoint_name, persistent=True)
        again = second.start_viewer()
        assert not again.launched
        assert again.pid == info.pid
        second.stop_viewer()  # persistent: left running
        assert first.is_running
        # each run's layers are kept apart, and clearing one run leaves the other
        plate = SyntheticPlate(n_wells=6, sites=1, channels=("DAPI",), size=32)
        runs = []
        for _ in range(2):
            compiled = compile_pipeline(_pipeline(endpoint_name, tmp_path, persistent=True))
            # the runner reuses the viewer and flushes it: when it returns, all is shown
            run_pipeline(compiled, plate, executor=ThreadPoolExecutor(1))
            runs.append(compiled.run_id)
            shown = [la for la in second.state()["layers"] if la["run"] == compiled.run_id]
            assert sum(la["frames"] for la in shown) == 6 * 2, shown  # DAPI + labels
            assert first.is_running  # persistent: still there after the run
        state = second.state()
        assert {layer["run"] for layer in state["layers"]} == set(runs)
        assert second.clear(runs[0])["ok"]
        wait_until(lambda: {la["run"] for la in second.state()["layers"]} == {runs[1]},
                   timeout=10, message="run 1 cleared, run 2 kept")
    finally:
        first.stop_viewer(force=True)
        if first._process is not None:
            first._process.wait(timeout=30)


def test_concurrent_start_viewer_launches_one(endpoint_name: str):
    managers = [ViewerManager(endpoint_name, persistent=False) for _ in range(3)]
    infos: list = [None] * 3

    def start(i: int) -> None:
        infos[i] = managers[i].start_viewer()

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert all(info is not None for info in infos)
        assert sum(info.launched for info in infos) == 1
        assert len({info.pid for info in infos}) == 1
    finally:
        owner = next(m for m, i in zip(managers, infos, strict=True)
                     if i is not None and i.launched)
        owner.stop_viewer(force=True)
        owner._process.wait(timeout=30)


def test_viewer_command_keep_runs_reaches_the_widget(endpoint_name: str):
    """``napari-hcs-stream viewer --keep-runs N --memory-cap GIB``: the launched widget keeps
    N runs within that memory."""
    env = {**os.environ, "NAPARI_HCS_STREAM_OWNED": "1"}  # a shutdown request closes it
    cmd = [sys.executable, "-m", "napari_hcs_stream", "viewer", "--endpoint", endpoint_name,
           "--keep-runs", "2", "--memory-cap", "1.5"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manager = ViewerManager(endpoint_name)
    try:
        wait_until(manager.ping, timeout=120, message="the viewer answers")
        state = manager.state()
        assert state["keep_runs"] == 2 and state["runs_dropped"] == 0
        assert state["max_bytes"] == 3 << 29 and state["coarsen"] is True
        status = subprocess.run(  # what a person sees, from another terminal
            [sys.executable, "-m", "napari_hcs_stream", "status", "--endpoint", endpoint_name],
            capture_output=True, text=True, timeout=60, env=dict(os.environ))
        assert status.returncode == 0, status.stderr
        assert f"viewer on {endpoint_name!r}" in status.stdout and "keep runs: 2" in status.stdout
    finally:
        manager.stop_viewer(force=True)
        proc.wait(timeout=30)


def test_viewer_killed_mid_run_does_not_fail_the_pipeline(endpoint_name: str, tmp_path: Path):
    manager = ViewerManager(endpoint_name, persistent=False)
    info = manager.start_viewer()
    plate = SyntheticPlate(n_wells=96, sites=2, channels=("DAPI", "GFP"), size=128)
    compiled = compile_pipeline(_pipeline(endpoint_name, tmp_path))
    done = []

    def progress(n: int, total: int) -> None:
        done.append(n)
        if n == 20:  # kill the viewer (a process we launched) while frames keep coming
            os.kill(info.pid, signal.SIGKILL)

    result = run_pipeline(compiled, plate, executor=ThreadPoolExecutor(2), progress=progress,
                          viewers=False)
    manager._process.wait(timeout=10)
    assert done[-1] == 96 * 2
    stats = list(result.producers.values())
    assert sum(s["sent"] + s["dropped"] for s in stats) == 96 * 2 * 3  # 2 channels + labels
    assert sum(s["dropped"] for s in stats) > 0
    assert max(s["max_publish_s"] for s in stats) < 0.5  # every publish bounded
    assert all(0 <= s["waited_s"] < 30 for s in stats)  # time the viewer held workers back
    assert manager.ping() is None


def test_demo_unattended_screenshot(runtime_dir: Path, tmp_path: Path):
    shot = tmp_path / "demo.png"
    proc = subprocess.run(
        [sys.executable, "-m", "napari_hcs_stream", "demo", "--endpoint", "demo-test",
         "--wells", "12", "--sites", "1", "--size", "128", "--workers", "2",
         "--exit", "--overview", "--screenshot", shot.name],  # relative, as in the README
        capture_output=True, text=True, timeout=240, env=dict(os.environ), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "denoise" in proc.stdout and "not streamed" in proc.stdout.lower()
    assert "plate overview: shown" in proc.stdout
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert (img.max(axis=2) > 30).mean() > 0.01, "the screenshot is blank"
