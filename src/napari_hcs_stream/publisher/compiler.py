"""Compile a pipeline: find the streaming configs, apply the materialization-aware filter.

Everything that decides *what* streams happens here, once, before any worker starts, so that a
run can print why each step streams or not, launch exactly the viewers it needs (none when no
step streams: no viewer, no publisher, no cost), and ship workers a plain plan with no
decisions left in it.

The filter rules (``docs/pipeline.md`` has them as a table):

- Only persisted outputs stream. A step's main output streams when its backend is not
  ``"memory"``; its checkpoint streams when it has a ``MaterializationConfig`` with
  ``checkpoint=True`` (source ``"<step> (checkpoint)"``).
- A memory-only step without a checkpoint streams nothing, even with a streaming config.
- The last step's output is the pipeline's result: it is written to disk even when its backend
  is ``"memory"`` (``GlobalConfig.persist_final_step``, default True), so it streams.
- ``enabled=False`` streams nothing; ``outputs`` ("all", "main", "checkpoint") narrows further.
- The well filter applies on top, per item, at run time.
"""

from __future__ import annotations

import importlib.util
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULTS, GlobalConfig, MaterializationConfig, StreamingConfig, resolve
from .pipeline import Pipeline, Step
from .wells import WellFilter

if TYPE_CHECKING:
    from .plate import Plate

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ViewerSpec:
    """A viewer the run needs: one per distinct endpoint across all streaming steps."""

    kind: str
    endpoint: str
    persistent: bool
    transport: str
    #: the viewer's CURVE public key, when the configs name one (a viewer elsewhere)
    server_key: str | None = None


@dataclass(frozen=True)
class StreamPlan:
    """One streaming config found on a step, resolved, with what it streams and why."""

    attribute: str  # where it was found on the step (any name)
    config: StreamingConfig  # resolved: no field left to inherit
    stream_main: bool
    stream_checkpoint: bool
    reason: str

    @property
    def well_filter(self) -> WellFilter | None:
        return self.config.well_filter  # type: ignore[return-value]

    @property
    def endpoint(self) -> str:
        return self.config.endpoint  # type: ignore[return-value]


@dataclass(frozen=True)
class StepPlan:
    """Everything a worker needs to run one step and route its outputs; no decisions left."""

    step_name: str
    index: int
    kind: str
    backend: str  # effective backend of the main output (a final memory step becomes "disk")
    func: Callable[..., Any]
    output_dir: Path | None  # folder of the main output's files (None: kept in memory)
    checkpoint_backend: str | None  # None: no checkpoint
    checkpoint_dir: Path | None
    streams: tuple[StreamPlan, ...]
    reason: str
    final: bool = False

    @property
    def source(self) -> str:
        return self.step_name

    @property
    def checkpoint_source(self) -> str:
        return f"{self.step_name} (checkpoint)"

    @property
    def stream_main(self) -> bool:
        return any(s.stream_main for s in self.streams)

    @property
    def stream_checkpoint(self) -> bool:
        return any(s.stream_checkpoint for s in self.streams)

    @property
    def streaming(self) -> StreamingConfig | None:
        """The (first) resolved streaming config that streams something, if any."""
        return next((s.config for s in self.streams if s.stream_main or s.stream_checkpoint),
                    None)

    @property
    def well_filter(self) -> WellFilter | None:
        cfg = self.streaming
        return None if cfg is None else cfg.well_filter  # type: ignore[return-value]


@dataclass(frozen=True)
class CompiledPipeline:
    """The plan of one run: its id, one plan per step, and the viewers it needs."""

    run_id: str
    name: str
    steps: list[StepPlan]
    viewers: list[ViewerSpec]

    @property
    def streams(self) -> bool:
        return bool(self.viewers)

    def describe(self) -> str:
        """One line per step: what it writes and why it streams or not (printed by runs)."""
        return "\n".join(f"{p.step_name}: {p.reason}" for p in self.steps)

    def for_plate(self, plate: Plate) -> CompiledPipeline:
        """Check every well filter against the plate and resolve "first N" to explicit wells.

        Raises :class:`~.wells.WellFilterError` (before anything is submitted) when a filter
        names a well, row or column the plate does not have.
        """
        wells = plate.wells()
        steps = []
        for plan in self.steps:
            streams = []
            for s in plan.streams:
                wf = s.well_filter
                if wf is not None:
                    wf.check_plate(plate.rows, plate.cols)
                    s = replace(s, config=replace(s.config, well_filter=wf.bind(wells)))
                streams.append(s)
            steps.append(replace(plan, streams=tuple(streams)))
        return replace(self, steps=steps)


def new_run_id(name: str) -> str:
    """``<pipeline>-<date>-<time>-<random>``: sortable, unique, safe as a folder name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:60] or "run"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def safe_name(name: str) -> str:
    """A step name as a folder name (spaces and separators become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "step"


def find_streaming_configs(step: Step) -> list[tuple[str, StreamingConfig]]:
    """Every streaming config on ``step``, whatever the attribute's name or the config's class.

    Instance attributes are scanned first, then class attributes of :class:`Step` subclasses
    (an instance attribute of the same name hides the class one).
    """
    found: dict[str, StreamingConfig] = {}
    for attr, value in vars(step).items():
        if isinstance(value, StreamingConfig):
            found[attr] = value
    for klass in type(step).__mro__:
        if klass in (Step, object):
            break
        for attr, value in vars(klass).items():
            if isinstance(value, StreamingConfig) and attr not in vars(step):
                found.setdefault(attr, value)
    return list(found.items())


def compile_pipeline(pipeline: Pipeline, defaults: GlobalConfig | None = None,
                     run_id: str | None = None) -> CompiledPipeline:
    """Detect streaming configs, resolve them, and decide what each step streams and writes.

    Raises ValueError/TypeError for what would otherwise fail in a worker: a folder missing for
    an output that must be written, the zarr backend without the zarr package, two configs of
    one step streaming to the same viewer, a malformed well filter or run id.
    """
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"compile_pipeline() takes a Pipeline, got {type(pipeline).__name__}")
    defaults = defaults or DEFAULTS
    if not isinstance(defaults, GlobalConfig):
        raise TypeError(f"defaults must be a GlobalConfig, got {type(defaults).__name__}")
    if run_id is None:
        run_id = new_run_id(pipeline.name)
    elif not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"run_id must be 1 to 128 letters, digits, '.', '_' or '-' (starting "
                         f"with a letter or digit), got {run_id!r}")

    plans = [_plan_step(pipeline, step, i, defaults, run_id) for i, step in
             enumerate(pipeline.steps)]
    return CompiledPipeline(run_id=run_id, name=pipeline.name, steps=plans,
                            viewers=_viewers(plans))


def _root(step: Step, pipeline: Pipeline, defaults: GlobalConfig, what: str) -> Path:
    root = step.output_dir or pipeline.output_dir or defaults.output_dir
    if root is None:
        raise ValueError(
            f"step {step.name!r} writes {what} but no output folder is set: pass "
            f"Pipeline(..., output_dir=...), Step(..., output_dir=...) or "
            f"GlobalConfig(output_dir=...)"
        )
    return Path(root)


def _check_backend(step: Step, backend: str) -> None:
    if backend == "zarr" and importlib.util.find_spec("zarr") is None:
        raise ValueError(f"step {step.name!r} writes with backend 'zarr' but the zarr package is "
                         "not installed: `pip install zarr`, or use backend='disk'")


def _plan_step(pipeline: Pipeline, step: Step, index: int, defaults: GlobalConfig,
               run_id: str) -> StepPlan:
    final = index == len(pipeline.steps) - 1
    backend = step.backend
    promoted = final and backend == "memory" and defaults.persist_final_step
    if promoted:
        backend = defaults.materialization.backend or "disk"
    output_dir = None
    if backend != "memory":
        _check_backend(step, backend)
        what = ("its output (the final step's result is always written; "
                "GlobalConfig(persist_final_step=False) keeps it in memory)"
                if promoted else "its output")
        output_dir = _root(step, pipeline, defaults, what) / run_id / safe_name(step.name)

    mat: MaterializationConfig | None = step.materialization
    ck_backend = ck_dir = None
    if mat is not None and mat.checkpoint:
        ck_backend = mat.backend or defaults.materialization.backend or "disk"
        _check_backend(step, ck_backend)
        ck_root = mat.output_dir or defaults.materialization.output_dir
        root = Path(ck_root) if ck_root else _root(step, pipeline, defaults, "a checkpoint")
        ck_dir = root / run_id / f"{safe_name(step.name)}.checkpoint"

    configs = find_streaming_configs(step)
    streams: list[StreamPlan] = []
    for attr, cfg in configs:
        resolved: StreamingConfig = resolve(cfg, pipeline.streaming, defaults=defaults)
        streams.append(_stream_plan(attr, resolved, backend, ck_backend, promoted, len(configs)))
    endpoints = [s.endpoint for s in streams if s.stream_main or s.stream_checkpoint]
    dupes = sorted({e for e in endpoints if endpoints.count(e) > 1})
    if dupes:
        raise ValueError(f"step {step.name!r} has several streaming configs for the viewer "
                         f"{dupes[0]!r} ({', '.join(a for a, _ in configs)}): each item would "
                         "arrive twice; keep one, or point them at different endpoints")
    if streams:
        reason = "; ".join(s.reason for s in streams)
    else:
        writes = [f"writes its output ({backend})"] if backend != "memory" else []
        writes += [f"writes a checkpoint ({ck_backend})"] if ck_backend else []
        reason = ("no streaming config" + (f" ({', '.join(writes)})" if writes else "")
                  + ": not streamed")
    return StepPlan(step_name=step.name, index=index, kind=step.kind, backend=backend,
                    func=step.func, output_dir=output_dir, checkpoint_backend=ck_backend,
                    checkpoint_dir=ck_dir, streams=tuple(streams), reason=reason, final=final)


def _stream_plan(attr: str, cfg: StreamingConfig, backend: str, ck_backend: str | None,
                 promoted: bool, n_configs: int) -> StreamPlan:
    where = f"[{attr}] " if n_configs > 1 else ""
    if not cfg.enabled:
        return StreamPlan(attr, cfg, False, False,
                          f"{where}not streamed: streaming disabled (enabled=False)")
    writes_main = backend != "memory"
    want_main = cfg.outputs in ("all", "main")
    want_ck = cfg.outputs in ("all", "checkpoint")
    main, ck = writes_main and want_main, ck_backend is not None and want_ck
    if not (main or ck):
        if not writes_main and ck_backend is None:
            why = ("memory-only step without a checkpoint: nothing of it is persisted, so it "
                   "is not streamed (set backend='disk' or add "
                   "MaterializationConfig(checkpoint=True) to stream it)")
        else:
            persisted = "its output" if writes_main else "only its checkpoint"
            if writes_main and ck_backend:
                persisted = "its output and a checkpoint"
            why = f"not streamed: outputs={cfg.outputs!r} but the step persists {persisted}"
        return StreamPlan(attr, cfg, False, False, where + why)
    what = []
    if main:
        what.append(f"its output ({backend})")
    if ck:
        what.append(f"its checkpoint ({ck_backend})")
    text = f"streams {' and '.join(what)} to {cfg.endpoint!r}"
    wf = cfg.well_filter
    text += f", wells {wf}" if wf is not None else ", all wells"
    if promoted:
        text = "final step, written to disk as the pipeline's result; " + text
    return StreamPlan(attr, cfg, main, ck, where + text)


def _viewers(plans: list[StepPlan]) -> list[ViewerSpec]:
    """One viewer per endpoint; it is persistent if any step wants it so, and its transport is
    the one all steps agree on (else "auto": each publisher still uses its own)."""
    by_endpoint: dict[str, list[StreamingConfig]] = {}
    for plan in plans:
        for s in plan.streams:
            if s.stream_main or s.stream_checkpoint:
                by_endpoint.setdefault(s.endpoint, []).append(s.config)
    viewers = []
    for endpoint, cfgs in by_endpoint.items():
        kinds = {type(c).viewer_kind for c in cfgs}
        if len(kinds) > 1:
            raise ValueError(f"the endpoint {endpoint!r} is used by configs for different "
                             f"viewers ({', '.join(sorted(kinds))}): give each its own endpoint")
        transports = {str(c.transport) for c in cfgs}
        keys = {c.server_key for c in cfgs if c.server_key is not None}
        if len(keys) > 1:
            raise ValueError(f"the endpoint {endpoint!r} is given {len(keys)} different "
                             "server keys: one viewer has one key")
        viewers.append(ViewerSpec(
            kind=kinds.pop(),
            endpoint=endpoint,
            persistent=any(bool(c.persistent) for c in cfgs),
            transport=transports.pop() if len(transports) == 1 else "auto",
            server_key=keys.pop() if keys else None,
        ))
    return viewers
