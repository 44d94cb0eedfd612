"""The demo: a real pipeline processes a synthetic plate and streams what it persists into napari.

Three steps show the materialization-aware filter at work:

- ``illumination`` corrects uneven illumination; its output stays in memory, but the step
  writes a checkpoint to disk, so the checkpoint streams;
- ``denoise`` is memory-only: it has a streaming config, yet nothing of it is persisted, so
  nothing of it streams (the plan printed at the start says so);
- ``segmentation`` writes nucleus labels to disk, so they stream as a Labels layer.

The pipeline side runs here without Qt; napari runs in its own process, launched (or reused)
through its control channel.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .publisher import Pipeline

CHANNELS = ("DAPI", "GFP", "RFP", "Cy5")
COLORMAPS = {"DAPI": "blue", "GFP": "green", "RFP": "magenta", "Cy5": "red"}


# -- the pipeline's functions (top level, so worker processes can import them) ----------------
def illumination_correct(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    """Divide each channel by a smooth estimate of its illumination (a coarse block mean)."""
    c, h, w = image.shape
    b = max(h // 16, 1)
    hh, ww = (h // b) * b, (w // b) * b
    blocks = image[:, :hh, :ww].reshape(c, hh // b, b, ww // b, b).astype(np.float32)
    coarse = np.percentile(blocks, 20, axis=(2, 4)) + 1.0
    field = np.repeat(np.repeat(coarse, b, axis=1), b, axis=2)
    field = np.pad(field, ((0, 0), (0, h - hh), (0, w - ww)), mode="edge")
    field /= field.mean(axis=(1, 2), keepdims=True)
    corrected = image.astype(np.float32) / field
    return np.clip(corrected, 0, np.iinfo(np.uint16).max).astype(np.uint16)


def denoise(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    """A 3x3 mean filter (memory-only intermediate: configured to stream, filtered out)."""
    padded = np.pad(image.astype(np.float32), ((0, 0), (1, 1), (1, 1)), mode="edge")
    acc = np.zeros(image.shape, np.float32)
    for dy in range(3):
        for dx in range(3):
            acc += padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
    return (acc / 9.0).astype(image.dtype)


def segment_nuclei(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    """Label nuclei: Otsu threshold on DAPI, then connected components."""
    nuclei = image[channels.index("DAPI") if "DAPI" in channels else 0].astype(np.float32)
    mask = nuclei > _otsu(nuclei)
    try:
        from scipy import ndimage
    except ImportError:  # a worker without scipy still produces a (single-label) mask
        return mask.astype(np.int32)
    labels, _ = ndimage.label(mask)
    return labels.astype(np.int32)


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


# -- the command -----------------------------------------------------------------------------
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default="demo",
                   help="viewer endpoint name (default: %(default)s)")
    p.add_argument("--wells", type=int, default=96, help="plate size: 6..1536 (default: 96)")
    p.add_argument("--sites", type=int, default=3, help="sites per well (default: 3)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    from .cli import whole_number
    from .protocol import MAX_DOWNSAMPLE

    p.add_argument("--downsample", type=whole_number(1, MAX_DOWNSAMPLE), default=None,
                   metavar="N",
                   help="show every N-th pixel along each image axis (1 to 64; try 4 with "
                        "--wells 1536 --size 2048; default: the viewer's own setting)")
    p.add_argument("--stream-wells", default=None,
                   help="which wells to stream: 24, 'A01:B12', 'row:C', 'col:03', ... "
                        "(default: all)")
    p.add_argument("--output", default=None,
                   help="folder for materialized outputs (default: a temporary folder, removed)")
    p.add_argument("--screenshot", default=None, metavar="PATH",
                   help="save a screenshot of the viewer once the run is visible")
    p.add_argument("--overview", action="store_true",
                   help="show the plate overview once the run is visible (every well side by "
                        "side; with --screenshot: a plate montage)")
    p.add_argument("--exit", action="store_true",
                   help="close the viewer at the end (for unattended runs, e.g. under xvfb-run)")


def build_pipeline(
    endpoint: str, output: Path, *, persistent: bool = True, well_filter: str | None = None,
    name: str = "demo", downsample: int | None = None,
) -> Pipeline:
    """The demo's three steps: a streamed checkpoint, a memory-only step, streamed labels."""
    from .publisher import MaterializationConfig, NapariStreamingConfig, Pipeline, Step

    streaming = NapariStreamingConfig(
        endpoint=endpoint,
        persistent=persistent,
        well_filter=well_filter,
        colormaps=COLORMAPS,
        downsample=downsample,
    )
    steps = [
        Step("illumination", illumination_correct,
             materialization=MaterializationConfig(backend="disk",
                                                   output_dir=output / "checkpoints"),
             streaming=NapariStreamingConfig()),
        Step("denoise", denoise, streaming=NapariStreamingConfig()),
        Step("segmentation", segment_nuclei, backend="disk", kind="labels",
             streaming=NapariStreamingConfig()),
    ]
    return Pipeline(name, steps, streaming=streaming, output_dir=output)


class ProgressBar:
    """A terminal progress bar on stderr (no dependency: workers need none)."""

    def __init__(self, total: int, label: str, width: int = 32) -> None:
        self.total, self.label, self.width = max(total, 1), label, width
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = -1.0

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        frac = done / max(total, 1)
        now = time.monotonic()
        if not self.tty and done < total and now - self._last < 2.0:
            return
        self._last = now
        filled = int(frac * self.width)
        rate = done / max(now - self.start, 1e-6)
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{done}/{total} ({frac:.0%}, {rate:.1f}/s)")
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)
        if done >= total and self.tty:
            print(file=sys.stderr)


def run_demo(args: argparse.Namespace) -> int:
    from .labels import LOWERED_NOTE
    from .publisher import SyntheticPlate, compile_pipeline, run_pipeline
    from .publisher.viewer import ViewerManager

    tmp = None
    if args.output:
        output = Path(args.output)
    else:
        tmp = tempfile.mkdtemp(prefix="hcs-demo-")
        output = Path(tmp)
    try:
        plate = SyntheticPlate(n_wells=args.wells, sites=args.sites, channels=CHANNELS,
                               size=args.size)
        compiled = compile_pipeline(build_pipeline(
            args.endpoint, output, persistent=not args.exit, well_filter=args.stream_wells,
            downsample=args.downsample))
        print(f"napari-hcs-stream demo: run {compiled.run_id}, {args.wells} wells x "
              f"{args.sites} sites x {len(CHANNELS)} channels ({args.size}x{args.size})")
        for plan in compiled.steps:
            print(f"  step {plan.step_name:<14} {plan.reason}")
        if not compiled.viewers:
            print("  no step streams: no viewer needed")
        managers = [ViewerManager(v.endpoint, persistent=v.persistent) for v in compiled.viewers]
        for manager in managers:
            t0 = time.monotonic()
            info = manager.start_viewer()
            how = "launched" if info.launched else "reusing"
            print(f"  viewer {manager.endpoint_spec!r}: {how} napari (pid {info.pid}) "
                  f"in {time.monotonic() - t0:.1f} s")
        tasks = args.wells * args.sites
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
            result = run_pipeline(compiled, plate, executor=pool,
                                  progress=ProgressBar(tasks, "processing"), viewers=False)
        for manager in managers:
            reply = manager.flush({k: v["last_seq"] for k, v in result.producers.items()})
            if not reply.get("ok"):
                print(f"  flush: {reply.get('error')}", file=sys.stderr)
        sent = sum(p.get("sent", 0) for p in result.producers.values())
        dropped = sum(p.get("dropped", 0) for p in result.producers.values())
        waited = sum(p.get("waited_s", 0.0) for p in result.producers.values())
        print(f"done in {result.duration:.1f} s: {sent} frames streamed, {dropped} dropped; "
              f"workers waited {waited:.2f} s for the viewer")
        for manager in managers:
            state = manager.state()
            lowered = state.get("lowered") or []
            for layer in state.get("layers", []):
                step = layer.get("downsample") or 1
                why = LOWERED_NOTE if layer.get("run") in lowered else ""
                print(f"  layer {layer['name']:<32} {layer['frames']:>5} frames  "
                      f"shape {tuple(layer['shape'])}"
                      f"{f', 1/{step} resolution{why}' if step > 1 else ''}")
            if args.overview:
                reply = manager.overview()
                print(f"  plate overview: {'shown' if reply.get('ok') else reply.get('error')}")
            if args.screenshot:
                reply = manager.screenshot(Path(args.screenshot).resolve())
                print(f"  screenshot: {reply.get('path') or reply.get('error')}")
            if args.exit:
                manager.stop_viewer(force=True)
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
