"""Route streamed items into preallocated plate stacks, one stack per napari layer.

The listener thread asks :meth:`PlateAssembler.destination` where an item goes and the receiver
copies the pixels straight there (no intermediate array); :meth:`~PlateAssembler.commit` then
marks the layer dirty. The main thread's render tick calls :meth:`~PlateAssembler.take_updates`
and gets one coalesced :class:`LayerUpdate` per changed layer. Nothing here imports Qt or
napari, so all of it is tested with plain numpy (``docs/assembler.md`` explains the model).

Every layer has the same five leading stack axes, ``("well", "site", "channel", "t", "z")``,
then the item axes. A component shown as separate layers (``Mode.LAYER``) or absent has size 1.
Equal leading axes keep layers aligned in napari's shared, right-aligned dims, and a well's
slider index is global (arrival order), so it is the same in every layer and every run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from . import _stackmem
from ._prefault import Prefaulter
from .labels import channel_display_name, format_labels
from .platemap import PlateMap, WellStatus, build_plate_map, plate_layout
from .protocol import MAX_DOWNSAMPLE, FrameHeader

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODES",
    "STACK_AXES",
    "AssemblerFull",
    "LayerInfo",
    "LayerUpdate",
    "Mode",
    "PlateAssembler",
    "default_max_bytes",
]

#: The leading axes of every layer, in this order (t before z: z is the one people scrub).
STACK_AXES: tuple[str, ...] = ("well", "site", "channel", "t", "z")
_N = len(STACK_AXES)
_GIB = 1024**3


class Mode(str, Enum):
    """How a component is shown: a slider axis of one layer, or one layer per value."""

    STACK = "stack"
    LAYER = "layer"


#: Channels become coloured additive layers; everything else a slider.
DEFAULT_MODES: dict[str, Mode] = {
    "well": Mode.STACK,
    "site": Mode.STACK,
    "channel": Mode.LAYER,
    "t": Mode.STACK,
    "z": Mode.STACK,
}

#: Contrast: percentiles of a strided subsample (about this many pixels) of the first
#: ``_CONTRAST_FIRST`` frames, then of one frame per ``contrast_interval`` seconds, pooled
#: over a reservoir of ``_CONTRAST_POOL`` samples so the estimate converges over the plate.
_CONTRAST_PERCENTILES = (0.5, 99.5)
_CONTRAST_TARGET = 8192
_CONTRAST_FIRST = 3
_CONTRAST_POOL = 16
#: More dirty steps than this between two updates are reported as ``None`` ("many").
DIRTY_STEPS_CAP = 256
#: Routes of items remembered (about 300 bytes each); past this the cache starts over.
_ROUTES_CAP = 1 << 16
#: With ``keep_runs`` set, an older run is dropped only once it has sent nothing for this long
#: (two runs streaming at once never take turns dropping each other).
RUN_QUIET_S = 5.0
#: The smallest memory cap (GiB) the widget, the settings and ``viewer --memory-cap`` take.
MIN_CAP_GIB = 0.25
#: At the memory cap a run's layers halve their resolution, down to every this-many-th pixel,
#: before frames are rejected (:attr:`PlateAssembler.coarsen`).
COARSEST = 16
#: Full-size buffers kept for downsampled layers (one per frame shape and dtype).
_SCRATCH_CAP = 8

_CYCLE = ("cyan", "magenta", "yellow", "green", "blue", "red")
_COLOR_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), colormap)
    for pattern, colormap in (
        (r"bright ?field|\bbf\b|phase|\bdic\b|\btrans", "gray"),
        (r"far[ _-]?red|cy5|cy7|(?<!\d)(633|635|640|642|647|650|660|680|700|750)(?!\d)", "red"),
        (r"yfp|venus|citrine|yellow", "yellow"),
        (r"cfp|cerulean|cyan", "cyan"),
        (r"dapi|hoechst|bfp|blue|(?<!\d)(350|360|405)(?!\d)", "blue"),
        (r"gfp|fitc|green|(?<!\d)(488|490|495)(?!\d)", "green"),
        (r"rfp|tritc|cherry|cy3|dsred|tomato|texas|txred|"
         r"(?<!\d)(543|546|555|561|568|594)(?!\d)", "magenta"),
        (r"\bred\b", "red"),
    )
)


class AssemblerFull(ValueError):
    """Storing this item would take streamed layers past the memory cap.

    A ``ValueError`` so the receiver counts the item as rejected and shows the message;
    slots that already exist keep working.
    """


@dataclass(frozen=True)
class LayerUpdate:
    """What changed in one layer since the previous :meth:`PlateAssembler.take_updates`.

    Apply in list order: ``removed`` (remove the layer named ``name``), else ``new`` (add a
    layer from ``data`` and the display fields), else ``grew`` (``layer.data = data``: the
    array object changed, by growth or because the used extent grew; a view, no copy), else
    refresh the layer (its array was written in place).
    """

    name: str
    key: tuple[Any, ...]
    kind: str
    data: np.ndarray | None
    new: bool = False
    grew: bool = False
    removed: bool = False
    axis_labels: tuple[str, ...] = ()
    rgb: bool = False
    colormap: str | None = None
    blending: str = "translucent"
    #: A new estimate since the last update, else ``None`` (keep the layer's limits).
    contrast_limits: tuple[float, float] | None = None
    #: Stack index (one per ``STACK_AXES``) of the most recent committed frame.
    newest: tuple[int, ...] | None = None
    #: napari ``scale`` for a downsampled layer (the step on its image axes), else ``None``.
    scale: tuple[float, ...] | None = None
    #: ``newest`` as of the previous update: follow the newest frame only if the user was there.
    previous_newest: tuple[int, ...] | None = None
    #: Stack indices written since the last update; ``None`` means more than ``DIRTY_STEPS_CAP``.
    dirty_steps: frozenset[tuple[int, ...]] | None = frozenset()
    frames: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerInfo:
    """One layer as the control ``state`` command and the status panel report it."""

    name: str
    run: str
    source: str
    channel: str | int | None
    kind: str
    shape: tuple[int, ...]
    dtype: str
    frames: int
    nbytes: int
    #: the layer keeps every ``downsample``-th pixel along each image axis (1: all)
    downsample: int = 1


def _whole(value: object, what: str, lo: int, hi: int | None = None) -> int:
    """``value`` if it is an int (not a bool) from ``lo`` to ``hi``, else a ValueError
    whose text says ``what`` it must be."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < lo
            or (hi is not None and value > hi)):
        raise ValueError(f"{what}, got {value!r}")
    return value


def _check_downsample(value: object, where: str) -> int:
    return _whole(value, f"{where} must be a whole number from 1 (full resolution) to "
                         f"{MAX_DOWNSAMPLE}", 1, MAX_DOWNSAMPLE)


def _image_axes(ndim: int, rgb: bool) -> tuple[int, int]:
    """Positions of an item's rows and columns (an RGB item ends with its colours)."""
    return (ndim - 3, ndim - 2) if rgb else (ndim - 2, ndim - 1)


def _reduced(shape: tuple[int, ...], rgb: bool, step: int) -> tuple[int, ...]:
    """An item's shape once every ``step``-th row and column is kept."""
    if step == 1:
        return shape
    axes = _image_axes(len(shape), rgb)
    return tuple(-(-n // step) if i in axes else n for i, n in enumerate(shape))


def _every(step: int, ndim: int, rgb: bool) -> tuple[slice, ...]:
    """The index that keeps every ``step``-th row and column of an item."""
    axes = _image_axes(ndim, rgb)
    return tuple(slice(None, None, step) if i in axes else slice(None) for i in range(ndim))


def _scale(step: int, ndim: int, rgb: bool) -> tuple[float, ...] | None:
    """napari ``scale`` of a stack whose items keep every ``step``-th row and column, so
    that it stays in full-resolution pixel coordinates (``None``: full resolution)."""
    if step == 1:
        return None
    axes = _image_axes(ndim, rgb)
    return (1.0,) * _N + tuple(float(step) if i in axes else 1.0 for i in range(ndim))


def parse_cap_gib(text: object) -> float:
    """A memory cap in GiB as a user gives it (a setting, a command-line argument): 0 for the
    default (:func:`default_max_bytes`) or a number from :data:`MIN_CAP_GIB`; else a
    ``ValueError`` saying so."""
    try:
        gib = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        gib = -1.0
    if gib != 0 and not MIN_CAP_GIB <= gib < math.inf:
        raise ValueError(f"expected 0 (half this machine's memory) or a number of GiB from "
                         f"{MIN_CAP_GIB}, got {text!r}")
    return gib


def _copy_written(stack: np.ndarray, old: np.ndarray, slots: list[tuple[int, ...]],
                  used: Sequence[int], *, into: tuple[slice, ...] = (),
                  keep: tuple[slice, ...] = ()) -> None:
    """Copy the items of ``old`` that were handed out (``slots``, within the extent ``used``)
    to the same stack indices of ``stack``: ``old``'s item ``[keep]`` into ``stack``'s item
    ``[into]``. Only those: copying blank ones would touch (and so commit) pages of the new
    stack that nothing ever wrote. One copy when every slot of the extent was handed out."""
    if len(slots) == math.prod(used):
        extent = tuple(slice(0, u) for u in used)
        stack[extent + into] = old[extent + keep]
    else:
        for slot_index in slots:
            stack[slot_index + into] = old[slot_index + keep]


def _check_keep_runs(value: object) -> int:
    return _whole(value, "keep_runs must be a whole number >= 0 (0: keep every run)", 0)


def default_max_bytes() -> int:
    """Half the physical memory: streamed layers must leave room for napari and the rest."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return (total if total > 0 else 16 * _GIB) // 2


def _parse_modes(modes: Mapping[str, Mode | str], where: str) -> dict[str, Mode]:
    out: dict[str, Mode] = {}
    for component, mode in modes.items():
        if component not in STACK_AXES:
            raise ValueError(
                f"{where}: unknown component {component!r} (expected one of "
                f"{', '.join(STACK_AXES)})"
            )
        try:
            out[component] = Mode(mode.lower() if isinstance(mode, str) else mode)
        except ValueError:
            raise ValueError(
                f"{where}: the mode for {component!r} must be 'stack' or 'layer', got {mode!r}"
            ) from None
    return out


def _item_axes(ndim: int, rgb: bool) -> tuple[str, ...]:
    spatial = ndim - 1 if rgb else ndim
    extra = tuple(f"item{i}" for i in range(max(0, spatial - 3)))
    return extra + ("plane", "y", "x")[3 - min(spatial, 3):]


def _gib(nbytes: int) -> str:
    if nbytes >= _GIB // 10:
        return f"{nbytes / _GIB:.3g} GiB"
    return f"{nbytes / 1024**2:.3g} MiB"


@dataclass
class _Group:
    """One ``(run, source)``: its modes are fixed when it first appears."""

    run: str
    source: str
    layer_mask: tuple[bool, ...]
    channel_names: dict[str, str] = field(default_factory=dict)
    colormaps: dict[str, str] = field(default_factory=dict)
    cycle: int = 0
    first_signature: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)
    #: assembler clock of this group's newest frame (of its creation, before any)
    last_seen: float = 0.0
    #: its layers keep every ``step``-th pixel along the image axes (set at creation, and
    #: doubled when the memory cap is reached: :meth:`PlateAssembler._coarsen_group`)
    step: int = 1
    #: the step was raised to stay under the memory cap
    lowered: bool = False

    def merge_meta(self, meta: Mapping[str, Any]) -> None:
        names = meta.get("channel_names")
        if isinstance(names, Mapping):
            self.channel_names.update({str(k): str(v) for k, v in names.items()})
        elif isinstance(names, (list, tuple)):
            self.channel_names.update({str(i): str(v) for i, v in enumerate(names)})
        colormaps = meta.get("colormaps")
        if isinstance(colormaps, Mapping):
            self.colormaps.update({str(k): v for k, v in colormaps.items() if isinstance(v, str)})

    def channel_name(self, channel: str | int | None) -> str:
        return channel_display_name(channel, {"channel_names": self.channel_names})

    def colormap_for(self, channel: str | int) -> str:
        name = self.channel_name(channel)
        for key in (str(channel), name):
            if key in self.colormaps:
                return self.colormaps[key]
        lowered = name.lower()
        for pattern, colormap in _COLOR_RULES:
            if pattern.search(lowered):
                return colormap
        self.cycle += 1
        return _CYCLE[(self.cycle - 1) % len(_CYCLE)]


class _Layer:
    """A stack and its bookkeeping; mutated under the assembler's lock only."""

    def __init__(self, key: tuple[Any, ...], name: str, group: _Group, header: FrameHeader,
                 layer_values: tuple[Any, ...], stack: np.ndarray) -> None:
        self.key = key
        self.name = name
        self.group = group
        self.kind = header.kind
        self.rgb = header.rgb
        self.layer_values = layer_values
        self.stack = stack
        #: what views of the stack name as their base (``_stackmem.memory``)
        self.memory = _stackmem.memory(stack)
        #: the stack axis laid out outermost in memory: growing it needs no copy
        self.outer = 0
        self.item_shape: tuple[int, ...] = stack.shape[_N:]
        self.used = [0] * _N
        self.slots: set[tuple[int, ...]] = set()  # stack indices handed out, for growth copies
        self.has: set[str] = set()
        self.frames = 0
        self.newest: tuple[int, ...] | None = None
        self.dirty_steps: set[tuple[int, ...]] | None = set()
        self.view: np.ndarray | None = None
        self.announced = False
        self.announced_view: np.ndarray | None = None
        self.announced_newest: tuple[int, ...] | None = None
        self.contrast: tuple[float, float] | None = None
        self.contrast_pending: tuple[float, float] | None = None
        self.contrast_time = -math.inf
        self.samples: list[np.ndarray] = []
        self.sampled = 0
        self.rng = random.Random(0)  # reservoir choice: deterministic, so runs repeat
        channel = self.channel
        channel_layer = header.kind == "image" and not header.rgb and channel is not None
        self.colormap: str | None = None
        if header.kind == "image" and not header.rgb:
            self.colormap = "gray" if channel is None else group.colormap_for(channel)
        self.blending = "additive" if channel_layer else "translucent"
        self.axis_labels = STACK_AXES + _item_axes(len(header.shape), header.rgb)
        self.scale = _scale(group.step, len(header.shape), header.rgb)

    @property
    def channel(self) -> str | int | None:
        """The layer's own channel when channels are separate layers, else ``None``."""
        pos = STACK_AXES.index("channel")
        if not self.group.layer_mask[pos]:
            return None
        return self.layer_values[sum(self.group.layer_mask[:pos])]

    def trimmed(self) -> np.ndarray:
        """The stack cut to the used extent, so sliders never show unused capacity."""
        if self.view is None:
            self.view = self.stack[tuple(slice(0, max(u, 1)) for u in self.used)]
        return self.view


def _subsample(region: np.ndarray) -> np.ndarray:
    """A strided copy of about ``_CONTRAST_TARGET`` pixels, finite, ready for percentiles."""
    step = max(1, math.ceil((region.size / _CONTRAST_TARGET) ** (1 / max(region.ndim, 1))))
    sample = np.array(region[(slice(None, None, step),) * region.ndim]).ravel()
    if sample.dtype == np.bool_:
        return sample.astype(np.uint8)
    if sample.dtype.kind == "f":
        return sample[np.isfinite(sample)]
    return sample


def _percentiles(samples: list[np.ndarray]) -> tuple[float, float] | None:
    pool = np.concatenate(samples) if len(samples) > 1 else samples[0]
    if pool.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(pool, _CONTRAST_PERCENTILES))
    return (lo, hi if hi > lo else lo + 1.0)  # napari needs lo < hi


_GENERATED_RUN = re.compile(r"^(?P<name>.+)-\d{8}-(?P<h>\d\d)(?P<m>\d\d)(?P<s>\d\d)-[0-9a-f]{4,6}$")


def run_label(run: str) -> str:
    """A run id as a layer name shows it: ``demo-20261125-173422-2810ed`` -> ``demo 17:34:22``.

    Generated ids (name, date, time, random hex) shorten to name and time of day; any other
    id is shown as given. The full id stays in the layer's metadata.
    """
    m = _GENERATED_RUN.match(run)
    return f"{m['name']} {m['h']}:{m['m']}:{m['s']}" if m else run


class PlateAssembler:
    """Plate stacks for streamed items; the listener thread writes, the main thread reads.

    ``modes`` overrides :data:`DEFAULT_MODES` per component; a producer's ``meta["modes"]``
    overrides both for its ``(run, source)`` when that group first appears. ``max_bytes`` caps
    the stacks' allocated size (default :func:`default_max_bytes`). ``clock`` and
    ``contrast_interval`` set the contrast refinement throttle (injectable for tests).
    ``prefault``: commit stack memory a few MiB ahead of the writes in a background thread
    (see :mod:`napari_hcs_stream._prefault`), so the listener does not pay the page faults.
    ``keep_runs``: keep only the newest runs this many (0: all); see :attr:`keep_runs`.
    ``downsample``: keep every n-th pixel along the image axes of new layers; see
    :attr:`downsample`. ``coarsen``: at the memory cap, lower the resolution of the run that
    needs more memory instead of rejecting its frames; see :attr:`coarsen`.
    """

    def __init__(self, modes: Mapping[str, Mode | str] | None = None,
                 max_bytes: int | None = None, *, clock: Callable[[], float] = time.monotonic,
                 contrast_interval: float = 1.0, prefault: bool = True,
                 keep_runs: int = 0, downsample: int = 1, coarsen: bool = True) -> None:
        self._modes = {**DEFAULT_MODES, **_parse_modes(modes or {}, "modes")}
        self._downsample = _check_downsample(downsample, "downsample")
        self._max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self._keep_runs = _check_keep_runs(keep_runs)
        self.coarsen = coarsen
        #: times a group's resolution was halved at the memory cap
        self.coarsenings = 0
        #: runs dropped so far because newer ones arrived (``keep_runs``)
        self.runs_dropped = 0
        self._clock = clock
        self._contrast_interval = contrast_interval
        # _lock guards all shared state and is held only briefly; _write_lock serialises the
        # writers so a growth can copy a large stack without holding _lock (the main thread
        # never waits for a copy).
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        #: Stack allocations so far (creations and growths): O(log n) in the plate size.
        self.allocations = 0
        #: growths along the axis outermost in memory, which kept the stack's memory: no copy
        self.grown_in_place = 0
        self.prefaulter = Prefaulter() if prefault else None
        self._reset()

    def _reset(self) -> None:
        self._index: dict[str, dict[Any, int]] = {c: {} for c in STACK_AXES}
        self._values: dict[str, list[Any]] = {c: [] for c in STACK_AXES}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._layers: dict[tuple[Any, ...], _Layer] = {}
        self._by_name: dict[str, _Layer] = {}
        self._dirty: dict[tuple[Any, ...], _Layer] = {}
        self._removed: list[LayerUpdate] = []
        self._plates: dict[str, Any] = {}
        #: (run, well) -> [frames, clock of the newest]: the plate map's tally
        self._wells: dict[tuple[str, str], list[Any]] = {}
        #: item -> (layer key, stack index) for slots already handed out; see destination
        self._routes: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[int, ...]]] = {}
        #: full-size buffers the receiver copies into for downsampled layers, by shape, dtype
        self._scratch: dict[tuple[tuple[int, ...], str], np.ndarray] = {}
        #: what the last destination() handed out, for the commit() that follows it
        #: (header, layer, stack index, view in the stack, whether the slot was new)
        self._handoff: tuple[FrameHeader, _Layer, tuple[int, ...], np.ndarray, bool] | None = (
            None)
        self._nbytes = 0
        self._generation = getattr(self, "_generation", 0) + 1

    # -- configuration (main thread) ------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        """Raise or lower the cap; it applies to the next allocation (nothing is freed)."""
        with self._lock:
            self._max_bytes = int(value)

    @property
    def keep_runs(self) -> int:
        """How many runs to keep, newest first (0: every run until cleared).

        Runs are ordered by their first frame. Once there are more, the older ones are
        dropped as if cleared, each as soon as it has been quiet (no frame) for
        :data:`RUN_QUIET_S`; checked on every :meth:`take_updates` and when this is set. A
        dropped run that sends again comes back as the newest run, as after a clear.
        """
        return self._keep_runs

    @keep_runs.setter
    def keep_runs(self, value: int) -> None:
        value = _check_keep_runs(value)
        with self._lock:
            self._keep_runs = value
            self._drop_old_runs()

    @property
    def downsample(self) -> int:
        """Display resolution of layers that appear from now on: every n-th pixel along the
        image axes (1: full resolution; a producer's ``meta["downsample"]`` wins for its own
        ``(run, source)``). A layer keeps its resolution until cleared. The pixels are
        subsampled while they are copied into place (no filtering: exact for labels, and
        what a live overview needs), memory shrinks by n x n, and the layer's ``scale``
        keeps it in full-resolution pixel coordinates."""
        return self._downsample

    @downsample.setter
    def downsample(self, value: int) -> None:
        value = _check_downsample(value, "downsample")
        with self._lock:
            self._downsample = value

    @property
    def coarsen(self) -> bool:
        """What happens when a layer needs memory past :attr:`max_bytes`: ``True`` (the
        default) halves the resolution of every layer of that ``(run, source)``, their
        frames so far included, as often as needed down to every :data:`COARSEST`-th pixel,
        and keeps streaming; only past that are frames rejected. ``False``: reject at once.
        Each halving is logged, and ``state()["lowered"]`` names the runs it happened to."""
        return self._coarsen

    @coarsen.setter
    def coarsen(self, value: bool) -> None:
        self._coarsen = bool(value)

    @property
    def modes(self) -> dict[str, Mode]:
        return dict(self._modes)

    def set_modes(self, modes: Mapping[str, Mode | str]) -> None:
        """Change the default modes for groups that appear from now on (or after a clear)."""
        parsed = _parse_modes(modes, "modes")
        with self._lock:
            self._modes = {**self._modes, **parsed}

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all stacks (address space; untouched pages hold no memory)."""
        return self._nbytes

    # -- listener thread ------------------------------------------------------------------

    def _group(self, header: FrameHeader, create: bool) -> _Group | None:
        group = self._groups.get((header.run, header.source))
        if group is None and create:
            modes = dict(self._modes)
            meta_modes = header.meta.get("modes")
            if meta_modes is not None:
                if not isinstance(meta_modes, Mapping):
                    raise ValueError("meta['modes'] must be an object like {'channel': 'stack'}")
                modes.update(_parse_modes(meta_modes, "meta['modes']"))
            step = header.meta.get("downsample")
            step = (self._downsample if step is None
                    else _check_downsample(step, "meta['downsample']"))
            group = _Group(header.run, header.source,
                           tuple(modes[c] is Mode.LAYER for c in STACK_AXES),
                           last_seen=self._clock(), step=step)
            self._groups[(header.run, header.source)] = group
        return group

    def _route(self, header: FrameHeader, create: bool
               ) -> tuple[_Group, tuple[Any, ...], list[int], list[tuple[str, Any]]] | None:
        """Group, layer key, stack index and not-yet-registered values of an item."""
        group = self._group(header, create)
        if group is None:
            return None
        if create and header.meta:
            group.merge_meta(header.meta)
            plate = header.meta.get("plate")
            if plate is not None and header.run not in self._plates:
                self._plates[header.run] = plate  # informational: shown by `state`
        coords = header.coords
        idx = [0] * _N
        layer_values = []
        fresh: list[tuple[str, Any]] = []
        for pos, component in enumerate(STACK_AXES):
            value = getattr(coords, component)
            if group.layer_mask[pos]:
                layer_values.append(value)
            elif value is not None:
                index = self._index[component].get(value)
                if index is None:
                    if not create:
                        return None
                    index = len(self._values[component])
                    fresh.append((component, value))
                idx[pos] = index
        shape = header.shape
        signature = (len(shape), header.rgb, header.dtype, shape[-1] if header.rgb else 0)
        key = (header.run, header.source, header.kind, tuple(layer_values), signature)
        return group, key, idx, fresh

    def _grown_shape(self, layer: _Layer | None, idx: list[int], header: FrameHeader,
                     stored: tuple[int, ...]) -> tuple[int, ...]:
        """Capacity after growth: x2 along axes that need it, less if that breaks the cap.
        ``stored``: the item's shape in the stack (smaller than the header's when
        downsampled)."""
        old = layer.stack.shape if layer is not None else (0,) * (_N + len(stored))
        stack = [max(i + 1, c if i < c else 2 * c) for i, c in zip(idx, old[:_N], strict=True)]
        item = [max(a, b) for a, b in zip(old[_N:], stored, strict=True)]
        itemsize = np.dtype(header.dtype).itemsize
        held = self._nbytes - (layer.stack.nbytes if layer is not None else 0)
        budget = self._max_bytes - held
        if math.prod(stack) * math.prod(item) * itemsize > budget:
            exact = [max(i + 1, c) for i, c in zip(idx, old[:_N], strict=True)]
            grown = [p for p in range(_N) if exact[p] > old[p]]
            unit = math.prod(item) * itemsize
            need = math.prod(exact) * unit
            if need > budget:
                raise AssemblerFull(
                    f"memory cap of {_gib(self._max_bytes)} reached by streamed layers "
                    f"({_gib(held)} held, this layer needs {_gib(need)}); clear a run, raise "
                    "the cap, or lower the resolution of new layers in the widget"
                )
            if len(grown) == 1:  # as much headroom as fits, so growth stays rare near the cap
                p = grown[0]
                per_index = need // exact[p]
                exact[p] = min(stack[p], budget // per_index)
            stack = exact
        return tuple(stack + item)

    def destination(self, header: FrameHeader) -> np.ndarray:
        """A writable array of exactly ``header.shape`` where the receiver copies the pixels:
        a view of the stack, or for a downsampled layer a reused full-size buffer whose every
        n-th pixel :meth:`commit` then copies into the stack.

        O(1) amortised: dict lookups and a view, plus a geometric growth now and then.
        Raises :class:`AssemblerFull` past the memory cap, ``ValueError`` for bad meta modes.
        """
        with self._write_lock:
            # The steady state: an item for a slot handed out before (the same well, site,
            # channel, t and z again) needs no routing, no index or extent updates.
            meta, coords = header.meta, header.coords
            rkey = None if meta else (header.run, header.source, header.kind, coords,
                                      header.shape, header.dtype, header.rgb)
            with self._lock:
                known = self._routes.get(rkey) if rkey is not None else None
                if known is not None:
                    layer = self._layers.get(known[0])
                    if layer is not None and known[1] in layer.slots:
                        region = layer.stack[known[1]]
                        step = layer.group.step
                        item = header.shape if step == 1 else _reduced(header.shape,
                                                                        header.rgb, step)
                        if region.shape == item:  # items have not grown since
                            self._handoff = (header, layer, known[1], region, False)
                            return region if step == 1 else self._scratch_for(header)
            while True:
                with self._lock:
                    route = self._route(header, create=True)
                    assert route is not None
                    group, key, idx, fresh = route
                    item = _reduced(header.shape, header.rgb, group.step)
                    layer = self._layers.get(key)
                    coords = header.coords
                    if layer is not None and self._fits(layer, idx, item):
                        for component, value in fresh:
                            self._index[component][value] = len(self._values[component])
                            self._values[component].append(value)
                        for pos, component in enumerate(STACK_AXES):
                            if idx[pos] >= layer.used[pos]:
                                layer.used[pos] = idx[pos] + 1
                                layer.view = None
                            if not group.layer_mask[pos] and coords.get(component) is not None:
                                layer.has.add(component)
                        slot_index = tuple(idx)
                        new_slot = slot_index not in layer.slots
                        layer.slots.add(slot_index)
                        slot = layer.stack[slot_index]
                        if rkey is not None and slot.shape == item:
                            if len(self._routes) >= _ROUTES_CAP:
                                self._routes.clear()
                            self._routes[rkey] = (key, slot_index)
                        break
                    coarser = None
                    try:
                        new_shape = self._grown_shape(layer, idx, header, item)
                    except AssemblerFull:
                        if not (self._coarsen and group.step * 2 <= COARSEST):
                            raise
                        coarser = self._coarsening_plan(group)
                    old = layer.stack if layer is not None else None
                    slots = list(layer.slots) if layer is not None else []
                    used = list(layer.used) if layer is not None else []
                    generation = self._generation
                    reserve = self._max_bytes
                    outer = layer.outer if layer is not None else 0
                if coarser is not None:  # lower the group's resolution, then route again
                    self._coarsen_group(group, coarser)
                    continue
                # Growth along the axis outermost in memory (the wells, to begin with): the
                # same memory, longer, every slot already in place. Anything else: new memory
                # (lazy pages: no RSS until written) laid out with the axis that grew outermost,
                # so that its next growths are in place, and a copy.
                grown = None
                if old is not None:
                    axes = [p for p in range(_N) if new_shape[p] != old.shape[p]]
                    if new_shape[_N:] == old.shape[_N:] and axes == [outer]:
                        grown = _stackmem.grow_in_place(old, new_shape, outer)
                    elif axes:
                        outer = axes[0]
                if grown is not None:
                    stack = grown
                    self.grown_in_place += 1
                else:
                    stack = _stackmem.zeros(new_shape, header.dtype, reserve, outer)
                    if old is not None:  # into the corner of each larger item
                        _copy_written(stack, old, slots, used,
                                      into=tuple(slice(0, n) for n in old.shape[_N:]))
                with self._lock:
                    if generation != self._generation or self._layers.get(key) is not layer:
                        continue  # cleared meanwhile: route again
                    if layer is None:
                        self._add_layer(key, group, header, stack)
                    else:
                        self._nbytes -= layer.stack.nbytes
                        layer.stack, layer.item_shape, layer.view = stack, stack.shape[_N:], None
                        layer.memory, layer.outer = _stackmem.memory(stack), outer
                    self._nbytes += stack.nbytes
                    self.allocations += 1
            region = tuple(slice(0, n) for n in item)
            if slot.shape != item:
                slot[...] = 0  # a smaller item: never show an earlier, larger one around it
            view = slot[region]
            with self._lock:
                self._handoff = (header, layer, slot_index, view, new_slot)
            return view if group.step == 1 else self._scratch_for(header)

    def _coarsening_plan(self, group: _Group) -> list[tuple[_Layer, np.ndarray]]:
        """The group's layers and their stacks (``_lock`` held): what :meth:`_coarsen_group`
        lowers."""
        return [(layer, layer.stack) for layer in self._layers.values() if layer.group is group]

    def _coarsen_group(self, group: _Group, plan: list[tuple[_Layer, np.ndarray]]) -> None:
        """Halve the resolution of every layer of ``group`` (``_write_lock`` held): each
        stack is replaced by one keeping every other row and column of it, a quarter of its
        size, so the group keeps streaming under the memory cap instead of rejecting frames.
        The copies run outside ``_lock``, as growth copies do."""
        stacks = []
        for layer, old in plan:
            shape = old.shape[:_N] + _reduced(old.shape[_N:], layer.rgb, 2)
            every = _every(2, old.ndim, layer.rgb)
            # In the stack's own memory where it can be: no fresh memory to touch. The layer
            # napari shows reads the moved bytes until the next render tick reassigns it.
            stack = _stackmem.shrink_in_place(old, shape, layer.outer, every[_N:], layer.slots)
            if stack is None:
                stack = _stackmem.zeros(shape, old.dtype, self._max_bytes, layer.outer)
                _copy_written(stack, old, list(layer.slots), layer.used, keep=every[_N:])
            stacks.append(stack)
        with self._lock:
            group.step *= 2
            group.lowered = True
            for (layer, old), stack in zip(plan, stacks, strict=True):
                if self._layers.get(layer.key) is not layer:
                    continue  # its run was cleared meanwhile (only this thread adds layers)
                self._nbytes += stack.nbytes - old.nbytes
                layer.stack, layer.item_shape, layer.view = stack, stack.shape[_N:], None
                layer.memory = _stackmem.memory(stack)
                layer.scale = _scale(group.step, len(layer.item_shape), layer.rgb)
                layer.dirty_steps = None  # every plane changed
                self._dirty[layer.key] = layer
            self._handoff = None
            self.coarsenings += 1
            cap, held = self._max_bytes, self._nbytes
        log.warning("run %r, %s: resolution lowered to 1/%d to stay under the memory cap of %s "
                    "(%s held)", group.run, group.source, group.step, _gib(cap), _gib(held))

    def _scratch_for(self, header: FrameHeader) -> np.ndarray:
        """A full-size buffer for a downsampled layer's frame (``_write_lock`` held): the
        receiver copies the frame here, :meth:`commit` keeps every n-th pixel of it."""
        key = (header.shape, header.dtype)
        buf = self._scratch.get(key)
        if buf is None:
            if len(self._scratch) >= _SCRATCH_CAP:
                self._scratch.clear()
            buf = self._scratch[key] = np.empty(header.shape, np.dtype(header.dtype))
        return buf

    @staticmethod
    def _fits(layer: _Layer, idx: list[int], shape: tuple[int, ...]) -> bool:
        cap = layer.stack.shape
        return all(i < c for i, c in zip(idx, cap[:_N], strict=True)) and all(
            n <= c for n, c in zip(shape, layer.item_shape, strict=True)
        )

    def _add_layer(self, key: tuple[Any, ...], group: _Group, header: FrameHeader,
                   stack: np.ndarray) -> None:
        layer_values = key[3]
        words: list[str] = []  # what tells this layer from its siblings: shown first
        for component, value in zip(
            (c for c, m in zip(STACK_AXES, group.layer_mask, strict=True) if m),
            layer_values,
            strict=True,
        ):
            if value is None:
                continue
            if component == "channel":
                words.append(group.channel_name(value))
            elif component == "well":
                words.append(str(value))
            else:
                words.append(f"{component} {value}")
        base_key = key[:4]
        first = group.first_signature.setdefault(base_key, key[4])
        if key[4] != first:  # a different dtype/ndim/rgb than the group's first layer
            ndim, rgb, dtype, colours = key[4]
            shape_word = ("rgba" if colours == 4 else "rgb") if rgb else f"{ndim}-D"
            words.append(f"({dtype} {shape_word})" if rgb or ndim != 2 else f"({dtype})")
        # napari elides long names in the middle: the distinguishing words lead, the run ends
        lead = " ".join(words) + " · " if words else ""
        run = f" [{run_label(header.run)}]" if header.run else ""
        suffixes = ["", " labels"] if header.kind == "labels" else [""]
        names = (f"{lead}{header.source}{sfx}{run}" for sfx in suffixes)
        numbered = (f"{lead}{header.source} #{n}{run}" for n in itertools.count(2))
        name = next(n for n in itertools.chain(names, numbered) if n not in self._by_name)
        layer = _Layer(key, name, group, header, layer_values, stack)
        self._layers[key] = layer
        self._by_name[name] = layer

    def _locate(self, header: FrameHeader) -> tuple[_Layer, tuple[int, ...]] | None:
        route = self._route(header, create=False)
        if route is None:
            return None
        layer = self._layers.get(route[1])
        return None if layer is None else (layer, tuple(route[2]))

    def commit(self, header: FrameHeader, array: np.ndarray) -> None:
        """The item's pixels are in place: count it, mark it dirty, feed the contrast.

        ``array`` is normally the view :meth:`destination` returned; any other array (the
        receiver allocated it, or the stack grew meanwhile) is copied into place first.
        An item whose layer was cleared meanwhile is ignored.
        """
        with self._write_lock:
            with self._lock:
                handoff, self._handoff = self._handoff, None
                if (handoff is not None and handoff[0] is header
                        and self._layers.get(handoff[1].key) is handoff[1]
                        and handoff[3].base is handoff[1].memory):
                    layer, idx, region, new_slot = handoff[1:]
                else:  # not what destination() just handed out: route it again
                    new_slot = True  # unknown: let the prefaulter decide
                    found = self._locate(header)
                    if found is None:
                        return
                    layer, idx = found
                    item = _reduced(header.shape, header.rgb, layer.group.step)
                    region = layer.stack[idx + tuple(slice(0, n) for n in item)]
                now = self._clock()
                sample_due = layer.kind == "image" and not layer.rgb and (
                    layer.sampled < _CONTRAST_FIRST
                    or now - layer.contrast_time >= self._contrast_interval
                )
                if sample_due:
                    layer.contrast_time = now
            if array.base is not layer.memory:  # a scratch buffer, or the receiver's own
                step = layer.group.step
                region[...] = array if step == 1 else array[_every(step, array.ndim, layer.rgb)]
            # Estimate before marking dirty, so a new layer's first update carries its limits.
            limits = self._refine_contrast(layer, region) if sample_due else None
            with self._lock:
                if self._layers.get(layer.key) is not layer:
                    return
                layer.frames += 1
                layer.newest = idx
                layer.group.last_seen = now
                well = header.coords.well
                if well is not None:
                    tally = self._wells.get((header.run, well))
                    if tally is None:
                        self._wells[(header.run, well)] = [1, now]
                    else:
                        tally[0] += 1
                        tally[1] = now
                if limits is not None and limits != layer.contrast:
                    layer.contrast = layer.contrast_pending = limits
                self._mark_dirty(layer, idx)
                stack, memory = layer.stack, layer.memory
            if self.prefaulter is not None and new_slot:  # frames now reach further
                # byte offsets within the stack's memory, whatever order its axes are laid in
                end = sum(i * s for i, s in zip(idx, stack.strides, strict=False)) + region.nbytes
                self.prefaulter.advance(memory, end)

    @staticmethod
    def _refine_contrast(layer: _Layer, region: np.ndarray) -> tuple[float, float] | None:
        """Pool a subsample into the layer's reservoir and re-estimate. Runs outside
        ``_lock``: only writers touch the reservoir, and ``_write_lock`` serialises them."""
        sample = _subsample(region)
        layer.sampled += 1
        if len(layer.samples) < _CONTRAST_POOL:
            layer.samples.append(sample)
        else:
            j = layer.rng.randrange(layer.sampled)
            if j < _CONTRAST_POOL:
                layer.samples[j] = sample
        return _percentiles(layer.samples)

    def discard(self, header: FrameHeader, array: np.ndarray) -> None:
        """A torn copy: blank the item's slot (never show garbage); not counted as a frame."""
        with self._write_lock:
            with self._lock:
                self._handoff = None  # never keep a stack alive past its frame
                found = self._locate(header)
                if found is None:
                    return
                layer, idx = found
                slot = layer.stack[idx]
            slot[...] = 0
            with self._lock:
                if self._layers.get(layer.key) is layer:
                    self._mark_dirty(layer, idx)

    def _mark_dirty(self, layer: _Layer, idx: tuple[int, ...]) -> None:
        steps = layer.dirty_steps
        if steps is not None:
            steps.add(idx)
            if len(steps) > DIRTY_STEPS_CAP:
                layer.dirty_steps = None
        self._dirty[layer.key] = layer

    # -- main thread ----------------------------------------------------------------------

    def take_updates(self) -> list[LayerUpdate]:
        """One update per layer changed since the last call, removals first. Cheap: no copies."""
        with self._lock:
            if self._keep_runs:
                self._drop_old_runs()
            updates, self._removed = self._removed, []
            dirty, self._dirty = self._dirty, {}
            for layer in dirty.values():
                if layer.frames == 0:
                    continue  # nothing to show yet; the first commit marks it dirty again
                data = layer.trimmed()
                new = not layer.announced
                steps = layer.dirty_steps
                updates.append(LayerUpdate(
                    name=layer.name, key=layer.key, kind=layer.kind, data=data, new=new,
                    grew=not new and data is not layer.announced_view,
                    axis_labels=layer.axis_labels, rgb=layer.rgb, colormap=layer.colormap,
                    blending=layer.blending, contrast_limits=layer.contrast_pending,
                    newest=layer.newest, previous_newest=layer.announced_newest,
                    scale=layer.scale,
                    dirty_steps=None if steps is None else frozenset(steps),
                    frames=layer.frames, metadata=self._metadata(layer),
                ))
                layer.announced, layer.announced_view = True, data
                layer.announced_newest, layer.contrast_pending = layer.newest, None
                layer.dirty_steps = set()
            return updates

    @staticmethod
    def _metadata(layer: _Layer) -> dict[str, Any]:
        return {"run": layer.group.run, "source": layer.group.source,
                "channel": layer.channel, "kind": layer.kind}

    def layers(self) -> list[LayerInfo]:
        """Every layer held now, in creation order."""
        with self._lock:
            return [
                LayerInfo(name=layer.name, run=layer.group.run, source=layer.group.source,
                          channel=layer.channel, kind=layer.kind,
                          shape=tuple(layer.trimmed().shape), dtype=str(layer.stack.dtype),
                          frames=layer.frames, nbytes=layer.stack.nbytes,
                          downsample=layer.group.step)
                for layer in self._layers.values()
            ]

    def view(self, layer_name: str) -> np.ndarray | None:
        """The layer's stack as it is now, cut to the used extent (``None``: no such layer).

        For readers on another thread than the listener's (the plate overview): every frame
        committed so far is in it, including those committed after the last
        :meth:`take_updates`, whose announced data may be an older, smaller stack.
        """
        with self._lock:
            layer = self._by_name.get(layer_name)
            return None if layer is None else layer.trimmed()

    def state(self) -> dict[str, Any]:
        """JSON-able summary for the control ``state`` command."""
        infos = self.layers()
        with self._lock:
            runs = list(dict.fromkeys(group.run for group in self._groups.values()))
            plates = dict(self._plates)
            nbytes, cap = self._nbytes, self._max_bytes
            lowered = list(dict.fromkeys(g.run for g in self._groups.values() if g.lowered))
        layers = [{**asdict(info), "shape": list(info.shape)} for info in infos]
        return {"layers": layers, "frames": sum(i.frames for i in infos), "nbytes": nbytes,
                "max_bytes": cap, "runs": runs, "plates": plates,
                "keep_runs": self._keep_runs, "runs_dropped": self.runs_dropped,
                "downsample": self._downsample, "coarsen": self._coarsen, "lowered": lowered}

    def clear(self, run: str | None = None) -> int:
        """Drop one run's layers (or all, and the index maps); returns how many were dropped.

        Announced layers get a ``removed`` update. Memory is freed once napari lets go of
        the arrays too.
        """
        with self._lock:
            if run is not None:
                return self._drop_run(run)
            victims = list(self._layers.values())
            self._announce_removal(victims)
            removed = self._removed
            self._reset()
            self._removed = removed
            return len(victims)

    def _announce_removal(self, victims: list[_Layer]) -> None:
        for layer in victims:
            if layer.announced:
                self._removed.append(LayerUpdate(
                    name=layer.name, key=layer.key, kind=layer.kind, data=None,
                    removed=True, metadata=self._metadata(layer)))

    def _drop_run(self, run: str) -> int:
        """Forget one run's layers, groups and tallies (``_lock`` held)."""
        victims = [layer for layer in self._layers.values() if layer.group.run == run]
        self._announce_removal(victims)
        for layer in victims:
            del self._layers[layer.key]
            del self._by_name[layer.name]
            self._dirty.pop(layer.key, None)
            self._nbytes -= layer.stack.nbytes
        for group_key in [k for k in self._groups if k[0] == run]:
            del self._groups[group_key]
        self._handoff = None
        self._plates.pop(run, None)
        for tally_key in [k for k in self._wells if k[0] == run]:
            del self._wells[tally_key]
        self._generation += 1
        return len(victims)

    def _drop_old_runs(self) -> None:
        """Drop the runs older than the newest ``keep_runs`` once quiet (``_lock`` held)."""
        keep = self._keep_runs
        if not keep:
            return
        seen: dict[str, float] = {}  # run -> its newest frame, runs in order of appearance
        for group in self._groups.values():
            seen[group.run] = max(seen.get(group.run, 0.0), group.last_seen)
        if len(seen) <= keep:
            return
        now = self._clock()
        for run in list(seen)[:-keep]:
            if now - seen[run] >= RUN_QUIET_S:
                dropped = self._drop_run(run)
                self.runs_dropped += 1
                log.info("dropped run %r (%d layers): keeping the newest %d run(s)",
                         run, dropped, keep)

    def label_text(self, layer_name: str, stack_step: tuple[int, ...],
                   skip: tuple[str, ...] = ()) -> str:
        """Overlay text for a layer at the given stack indices: ``Well B03 | Site 2 | DAPI``.

        ``stack_step`` holds the layer's own indices for ``STACK_AXES`` (longer tuples are
        cut). Site, z and t appear only when the layer has them (z and t: more than one);
        an index past the known values leaves that component out, and so does ``skip``
        (the plate overview shows every well). ``""`` for unknown layers.
        """
        with self._lock:
            layer = self._by_name.get(layer_name)
            if layer is None:
                return ""
            pairs = [(component, layer.group.channel_name(value) if component == "channel"
                      and value is not None else value)
                     for component, value in self._shown(layer, stack_step)
                     if component not in skip]
        return format_labels(pairs)

    def well_at(self, layer_name: str, stack_step: tuple[int, ...]) -> str | None:
        """The well a layer shows at the given stack indices (its own well when wells are
        separate layers); ``None`` for unknown layers, layers without wells and indices past
        the known wells."""
        with self._lock:
            layer = self._by_name.get(layer_name)
            if layer is None:
                return None
            for component, value in self._shown(layer, stack_step):
                if component == "well":
                    return None if value is None else str(value)
        return None

    def _shown(self, layer: _Layer, stack_step: tuple[int, ...]) -> list[tuple[str, Any]]:
        """``(component, value)`` a layer shows at ``stack_step``, as :meth:`label_text`
        describes; call with the lock held."""
        group = layer.group
        own = iter(layer.layer_values)
        pairs: list[tuple[str, Any]] = []
        for pos, component in enumerate(STACK_AXES):
            if group.layer_mask[pos]:
                value = next(own)
            else:
                if component not in layer.has or pos >= len(stack_step):
                    continue
                if component in ("z", "t") and layer.used[pos] < 2:
                    continue
                i = int(stack_step[pos])
                values = self._values[component]
                if not 0 <= i < len(values):
                    continue
                value = values[i]
            pairs.append((component, value))
        return pairs

    def announced_newest(self, layer_name: str) -> tuple[int, ...] | None:
        """Stack indices of the layer's newest frame as of the last :meth:`take_updates`
        (what the viewer follows from); ``None`` for unknown or unannounced layers."""
        with self._lock:
            layer = self._by_name.get(layer_name)
            return None if layer is None else layer.announced_newest

    def well_index(self, well: str) -> int | None:
        """The well's index on the well slider (``None``: never stacked on one)."""
        with self._lock:
            return self._index["well"].get(well)

    def plate_map(self, run: str | None = None) -> PlateMap | None:
        """The wells with frames (one run's, or every run's) placed on their plate, for the
        widget's plate map; ``None`` before any frame named a well. A run's layout is its
        ``meta["plate"]``; for every run, the largest one declared."""
        with self._lock:  # copies only: commit() waits for this lock on every frame
            index = self._index["well"]
            tallies = [(well, frames, seen, index.get(well))
                       for (r, well), (frames, seen) in self._wells.items()
                       if run is None or r == run]
            if run is None:
                plates = list(self._plates.values())
            else:
                plates = [self._plates[run]] if run in self._plates else []
        merged: dict[str, WellStatus] = {}
        for well, frames, seen, slider in tallies:
            before = merged.get(well)
            if before is not None:  # the same well in several runs
                frames, seen = frames + before.frames, max(seen, before.last_seen)
            merged[well] = WellStatus(str(well), frames, seen, slider)
        declared = max((p for p in plates if isinstance(p, Mapping)), default=None,
                       key=lambda p: math.prod(plate_layout(p, ())[:2]))
        return build_plate_map(merged.values(), declared)
