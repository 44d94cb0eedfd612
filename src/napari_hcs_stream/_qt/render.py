"""The render tick: a main-thread timer that turns assembler updates into napari layer changes.

The listener thread writes pixels straight into the assembler's stacks; napari only has to be
told. Each tick costs what changed, not what exists: a new layer is added once, ``layer.data`` is
reassigned only when a stack grew (new well, site or channel), and an in-place write is refreshed
only when it lands in the slice the user is looking at (moving a slider re-slices anyway).

The user's edits win: contrast limits the user set are never overwritten (assembler contrast
refinements apply only until the user touches them), and colormap, opacity, visibility and
blending are restored if a data reassignment ever resets them. The slider follows the newest
frame only while the user sits at the previous newest position, and moves at most every
:data:`FOLLOW_MS` while frames stream in: a slider move re-slices every layer (and repaints
the sliders, the layer list's thumbnails and the overlay), where a tick that does not move
it refreshes only the layers written where the user looks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from ._pacing import Pacer
from .overlay import STACK_NDIM, stack_step, with_stack_step

log = logging.getLogger(__name__)

#: layer properties a user may edit that a data reassignment must not lose.
_KEPT = ("colormap", "opacity", "visible", "blending", "gamma")
#: how often a refreshed layer's thumbnail is recomputed (it costs a downsampling pass).
_THUMBNAIL_EVERY_S = 0.5
#: the slider follows the stream at most this often (a new layer's first frame at once; a
#: follow held back is made by a later tick, with or without new frames). On the development
#: VM (2 cores, software OpenGL), 512x512 frames at 6000-8000 a second into a shown viewer:
#: publish-to-layer latency p99 median 79-83 against 101-121 ms for a follow every tick
#: (docs/benchmarks.md, eleventh session).
FOLLOW_MS = 100


class OwnRemoval:
    """Removes layers we made from the viewer; ``active`` is True meanwhile, so a handler of
    ``viewer.layers.events.removed`` can tell our removals from the user's deletions."""

    def __init__(self, viewer: Any) -> None:
        self._viewer = viewer
        self.active = False

    def remove(self, layer: Any) -> None:
        self.active = True
        try:
            with contextlib.suppress(ValueError, KeyError):  # already gone
                self._viewer.layers.remove(layer)
        finally:
            self.active = False


@dataclass
class _Streamed:
    """Book-keeping for one streamed layer."""

    layer: Any
    user_contrast: bool = False
    setting_contrast: bool = False
    thumbnail_at: float = 0.0
    #: the ``scale`` the stream gave the layer (``None``: full resolution)
    scale: tuple[float, ...] | None = None
    #: stack indices of the layer's newest frame (as of the last update)
    newest: tuple[int, ...] | None = None
    #: while the user follows the stream (was at the newest frame), where the slider showed
    #: this layer when last looked at: the user not having moved it since means they still
    #: follow, however far the stream has gone on meanwhile; None: the slider is the user's
    followed: tuple[int, ...] | None = None
    connections: list[tuple[Any, Callable[..., Any]]] = field(default_factory=list)


class RenderTick(QObject):
    """Applies ``assembler.take_updates()`` to ``viewer`` about 30 times a second.

    ``generation`` returns how many frames the listener has committed so far; it is read before
    taking updates, so once a tick has applied, every frame counted by then is in its layer
    (``rendered_generation``; flush waits on it).
    """

    #: emitted after a tick that changed something (the overlay re-reads its text).
    applied = Signal()

    def __init__(
        self,
        viewer: Any,
        assembler: Any,
        *,
        generation: Callable[[], int] = lambda: 0,
        pacer: Pacer | None = None,
        follow_ms: float = FOLLOW_MS,
    ) -> None:
        super().__init__()
        self._viewer = viewer
        self._assembler = assembler
        self._generation = generation
        self._layers: dict[str, _Streamed] = {}
        self._dismissed: set[str] = set()
        self._own = OwnRemoval(viewer)
        self.rendered_generation = 0
        #: durations (ms) of ticks that applied something, and of those that added or
        #: removed no layer (creating a napari layer is a one-off that costs far more).
        self.tick_ms: deque[float] = deque(maxlen=4096)
        self.steady_tick_ms: deque[float] = deque(maxlen=4096)
        self.pacer = pacer or Pacer()
        #: least time between two slider follows while frames stream in (0: every tick)
        self.follow_ms = follow_ms
        self._followed_at = -float("inf")  # time.monotonic() of the last slider follow
        #: the layer whose newest frame the slider goes to (by name: once the layer is gone,
        #: or the user deleted it, it is simply not found)
        self._lead: str | None = None
        self._structural = False  # this tick added or removed a layer
        self._closed = False
        self._timer = QTimer()
        self._timer.setInterval(self.pacer.interval_ms)
        self._timer.timeout.connect(self.tick)
        self._connections: list[tuple[Any, Callable[..., Any]]] = [
            (viewer.layers.events.removed, self._on_layer_removed),
        ]
        for signal, slot in self._connections:
            signal.connect(slot)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    @property
    def active(self) -> bool:
        return self._timer.isActive()

    def close(self) -> None:
        """Stop ticking and disconnect everything (layers stay in the viewer for the user)."""
        self._closed = True
        with contextlib.suppress(RuntimeError, TypeError):  # RuntimeError: Qt already deleted it
            self._timer.stop()
            self._timer.timeout.disconnect(self.tick)
        for signal, slot in self._connections:
            with contextlib.suppress(RuntimeError, TypeError, ValueError):
                signal.disconnect(slot)
        self._connections.clear()
        for streamed in self._layers.values():
            self._disconnect(streamed)
        self._layers.clear()

    # -- what the widget and overlay read -------------------------------------------------------
    def streamed(self) -> dict[str, Any]:
        """``{assembler layer name: napari layer}`` in viewer stacking order (bottom first)."""
        order = {layer.unique_id: i for i, layer in enumerate(self._viewer.layers)}
        items = sorted(self._layers.items(), key=lambda kv: order.get(kv[1].layer.unique_id, -1))
        return {name: s.layer for name, s in items}

    def user_set_contrast(self, name: str) -> bool:
        s = self._layers.get(name)
        return bool(s and s.user_contrast)

    @property
    def tick_p99_ms(self) -> float:
        if not self.tick_ms:
            return 0.0
        return float(np.percentile(np.fromiter(self.tick_ms, float), 99))

    # -- the tick --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Apply every pending update; never raises into the Qt event loop."""
        start = time.perf_counter()
        generation = self._generation()
        try:
            updates = self._assembler.take_updates()
            changed = self._apply_all(updates)
        except Exception:  # a bug here must not kill the timer; it is logged with a traceback
            log.exception("applying streamed updates failed")
            changed = False
        self.rendered_generation = max(self.rendered_generation, generation)
        if changed:
            cost = (time.perf_counter() - start) * 1e3
            self.tick_ms.append(cost)
            if not self._structural:  # adding a layer is a one-off, not the streaming cost
                self.steady_tick_ms.append(cost)
                self._pace(lambda: self.pacer.record(cost), start)
            self.applied.emit()
        else:
            self._pace(self.pacer.idle, start)

    def _pace(self, update: Callable[[], None], start: float) -> None:
        """Let the pacer learn from this tick, then start the next one the interval it asks for
        now (which also moves with the listener's load) after this one *started*: ticks run
        at the pacer's rate, not at that rate slowed by their own cost."""
        if self._closed:
            return
        update()
        if self._timer.isActive():
            spent = int((time.perf_counter() - start) * 1e3)
            self._timer.start(max(1, self.pacer.interval_ms - spent))

    def _apply_all(self, updates: Sequence[Any]) -> bool:
        """Apply ``updates``, then move the slider to the newest frame if the user follows;
        True if anything changed (a follow held back by an earlier tick counts)."""
        self._structural = False
        refresh: list[tuple[_Streamed, Any]] = []
        now_new = False  # a layer appeared: show its first frame at once
        for update in updates:
            if update.removed:
                self._remove(update.name)
                self._structural = True
                continue
            if update.new or update.name not in self._layers:
                if update.name in self._dismissed and not update.new:
                    continue  # the user deleted this layer: do not bring it back
                self._dismissed.discard(update.name)
                self._add(update)
                self._structural = now_new = True
                self._track_newest(self._layers[update.name], update, new=True)
                continue
            streamed = self._layers[update.name]
            if update.grew:
                self._reassign(streamed, update.data, update.scale)
            self._refine_contrast(streamed, update.contrast_limits)
            self._track_newest(streamed, update, new=False)
            if not update.grew:
                refresh.append((streamed, update.dirty_steps))
        moved = self._follow(now=time.monotonic(), at_once=now_new)
        if not moved:  # a slider move re-slices every layer: nothing left to refresh
            for streamed, dirty in refresh:
                self._refresh_if_visible(streamed, dirty)
        return bool(updates) or moved

    # -- per-update steps -----------------------------------------------------------------------
    def _add(self, update: Any) -> None:
        if update.name in self._layers:  # re-created after a clear: replace the old one
            self._remove(update.name)
        kwargs: dict[str, Any] = {
            "name": update.name,
            "metadata": {"hcs_stream": dict(update.metadata or {})},
            "blending": update.blending or None,
        }
        labels = tuple(update.axis_labels or ())
        if labels:
            kwargs["axis_labels"] = labels
        if update.scale is not None:  # downsampled: full-resolution pixel coordinates
            kwargs["scale"] = tuple(update.scale)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if update.kind == "labels":
            layer = self._viewer.add_labels(update.data, **kwargs)
        else:
            if update.colormap:
                kwargs["colormap"] = update.colormap
            if update.contrast_limits is not None:
                kwargs["contrast_limits"] = tuple(update.contrast_limits)
            layer = self._viewer.add_image(update.data, rgb=bool(update.rgb), **kwargs)
        streamed = _Streamed(layer, scale=tuple(update.scale) if update.scale else None)
        if hasattr(layer.events, "contrast_limits"):
            slot = self._contrast_watcher(streamed)
            layer.events.contrast_limits.connect(slot)
            streamed.connections.append((layer.events.contrast_limits, slot))
        self._layers[update.name] = streamed

    def _contrast_watcher(self, streamed: _Streamed) -> Callable[[object], None]:
        def on_contrast(_event: object = None) -> None:
            if not streamed.setting_contrast:
                streamed.user_contrast = True

        return on_contrast

    def _reassign(self, streamed: _Streamed, data: Any,
                  scale: Sequence[float] | None = None) -> None:
        """New data for a layer (its stack grew, or its resolution was lowered at the memory
        cap, which also changes its ``scale``), keeping what the user set."""
        layer = streamed.layer
        kept = {k: getattr(layer, k) for k in _KEPT if hasattr(layer, k)}
        contrast = getattr(layer, "contrast_limits", None)
        streamed.setting_contrast = True
        try:
            scale = tuple(scale) if scale is not None else None
            if scale != streamed.scale and layer.ndim == data.ndim:
                # by the ratio of the stream's scales: a scale the user set (microns) stays
                before = streamed.scale or (1.0,) * data.ndim
                after = scale or (1.0,) * data.ndim
                layer.scale = tuple(u * a / b for u, a, b in
                                    zip(layer.scale, after, before, strict=True))
                streamed.scale = scale
            layer.data = data
            if contrast is not None and list(layer.contrast_limits) != list(contrast):
                layer.contrast_limits = contrast
        finally:
            streamed.setting_contrast = False
        for key, value in kept.items():
            if _differs(getattr(layer, key), value):
                setattr(layer, key, value)

    def _refine_contrast(self, streamed: _Streamed, limits: Sequence[float] | None) -> None:
        if limits is None or streamed.user_contrast:
            return
        layer = streamed.layer
        if not hasattr(layer, "contrast_limits") or list(layer.contrast_limits) == list(limits):
            return
        streamed.setting_contrast = True
        try:
            layer.contrast_limits = tuple(limits)
        finally:
            streamed.setting_contrast = False

    def _here(self, streamed: _Streamed) -> tuple[int, ...]:
        return stack_step(tuple(self._viewer.dims.current_step), streamed.layer.ndim)

    def _track_newest(self, streamed: _Streamed, update: Any, *, new: bool) -> None:
        """Note the layer's newest frame, and whether the user is at the newest position:
        at the previous newest (as the assembler announced it, or as the slider was last moved
        to), or the layer is new. Anywhere else, the slider is the user's."""
        if update.newest is None:
            return
        here = self._here(streamed)
        previous = update.previous_newest
        following = (new or previous is None or tuple(previous) == here
                     or streamed.followed == here)
        streamed.followed = here if following else None
        streamed.newest = tuple(update.newest)
        if following:
            self._lead = update.name

    def _follow(self, *, now: float, at_once: bool) -> bool:
        """Move the sliders to the lead layer's newest frame if the user follows it and it is
        not shown yet, at most every ``follow_ms`` (``at_once``: a new layer); True if moved."""
        streamed = self._layers.get(self._lead) if self._lead is not None else None
        if streamed is None or streamed.followed is None or streamed.newest is None:
            return False
        here = self._here(streamed)
        if streamed.followed != here:  # the user moved the slider since this tick's last look
            streamed.followed = None
            return False
        held = not at_once and (now - self._followed_at) * 1e3 < self.follow_ms
        if held or streamed.newest == here:
            return False  # held back (a later tick moves it), or shown already
        dims = self._viewer.dims
        current = tuple(dims.current_step)
        step = with_stack_step(current, streamed.layer.ndim, streamed.newest, dims.displayed)
        if step == current:
            return False
        dims.current_step = step
        self._followed_at = now
        for other in self._layers.values():  # where each following layer now stands
            if other.followed is not None:
                other.followed = self._here(other)
        return True

    def _refresh_if_visible(
        self, streamed: _Streamed, dirty: Iterable[Sequence[int]] | None
    ) -> None:
        layer = streamed.layer
        if not layer.visible:
            return  # napari re-slices when the layer is shown again
        if dirty is not None:
            here = stack_step(self._viewer.dims.current_step, layer.ndim)
            offset = max(0, self._viewer.dims.ndim - layer.ndim)
            free = [i for i in range(STACK_NDIM) if offset + i not in self._viewer.dims.displayed]
            if not any(all(int(d[i]) == here[i] for i in free) for d in dirty):
                return
        now = time.monotonic()
        thumbnail = now - streamed.thumbnail_at > _THUMBNAIL_EVERY_S
        if thumbnail:
            streamed.thumbnail_at = now
        layer.refresh(extent=False, thumbnail=thumbnail, highlight=False)

    def _remove(self, name: str) -> None:
        streamed = self._layers.pop(name, None)
        if streamed is None:
            return
        self._disconnect(streamed)
        self._own.remove(streamed.layer)

    def _on_layer_removed(self, event: Any) -> None:
        """The user deleted a streamed layer: forget it, and do not re-add it until it is new."""
        if self._own.active:
            return
        removed = getattr(event, "value", None)
        if removed is None:
            return
        for name, streamed in list(self._layers.items()):
            if streamed.layer.unique_id == removed.unique_id:
                self._disconnect(streamed)
                del self._layers[name]
                self._dismissed.add(name)

    @staticmethod
    def _disconnect(streamed: _Streamed) -> None:
        for signal, slot in streamed.connections:
            with contextlib.suppress(RuntimeError, TypeError, ValueError):
                signal.disconnect(slot)
        streamed.connections.clear()


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except ValueError:  # numpy arrays compare element-wise
        return not np.array_equal(np.asarray(a), np.asarray(b))
