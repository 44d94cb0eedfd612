"""The plate overview in napari: one mosaic layer per streamed layer, shown instead of it.

While the overview is on, every streamed layer that stacks wells on a slider gets a 2D layer
named ``"<layer> overview"`` holding all its wells on the plate's rows and columns (see
:mod:`napari_hcs_stream.overview`), at the site, channel, z and t the sliders show. The
streamed layers are hidden meanwhile (their visibility comes back when the overview ends), and
each overview layer is linked to its streamed layer (contrast, colormap, gamma, opacity,
blending: an edit on one is an edit on both). Double-clicking a well leaves the overview at that
well.

The mosaics are rebuilt on the main thread from the assembler's current stacks: at most twice a
second while frames arrive, and right after a slider moves. Only wells that received a frame
since their tile was drawn are copied again (all of them after a slider move), so the cost
follows what arrives, not the plate's size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer

from ..overview import Tiling, fill_tiles, tiling
from .overlay import STACK_NDIM, layer_step
from .render import OwnRemoval

log = logging.getLogger(__name__)

#: while frames arrive, the mosaics are rebuilt at most this often (ms).
REFRESH_MS = 500
#: after a slider move (ms): soon, but once for a burst of moves.
SLIDER_MS = 30
#: an overview layer's name is its streamed layer's name and this.
SUFFIX = " overview"
#: what an overview layer shares with its streamed layer (``napari.experimental.link_layers``)
_LINKED = {"image": ("contrast_limits", "colormap", "gamma", "opacity", "blending"),
           "labels": ("opacity", "blending")}


@dataclass
class _Entry:
    """One streamed layer's overview."""

    source: Any
    layer: Any
    layout: Tiling
    rest: tuple[int, ...]
    #: (row, col) -> well name as sent, for a double-click
    names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: (row, col) -> the well's ``last_seen`` when its tile was drawn
    drawn: dict[tuple[int, int], float] = field(default_factory=dict)
    linked: tuple[str, ...] = ()


class PlateOverview:
    """Turns the plate overview on and off and keeps its layers in step with the stream.

    ``streamed`` returns the streamed layers as ``{assembler layer name: napari layer}``;
    ``open_well`` is called with a well's name when the user double-clicks it, and
    ``on_hover`` when the well under the mouse changes (:attr:`hovered`). ``run`` returns the
    run to lay out (None: every run); other runs' layers are hidden meanwhile. ``settle`` runs
    after each rebuild, in the same pass (the widget's item-view layouts, :mod:`._settle`:
    napari's layer list would otherwise repaint the window a second time).
    """

    def __init__(self, viewer: Any, assembler: Any, streamed: Callable[[], Mapping[str, Any]],
                 open_well: Callable[[str], object] = lambda _well: None,
                 on_hover: Callable[[], object] = lambda: None,
                 run: Callable[[], str | None] = lambda: None,
                 settle: Callable[[], object] = lambda: None) -> None:
        self._viewer = viewer
        self._run = run
        self._assembler = assembler
        self._streamed = streamed
        self._open_well = open_well
        self._on_hover = on_hover
        self._settle = settle
        #: the well under the mouse while the overview is on (its name as sent), else None
        self.hovered: str | None = None
        #: the viewer's own mouse callbacks (any layer may be the active one)
        self._mouse = ((viewer.mouse_double_click_callbacks, self._on_double_click),
                       (viewer.mouse_move_callbacks, self._on_mouse_move))
        self._entries: dict[str, _Entry] = {}
        #: streamed layers we hid: name -> (napari layer, its visibility before)
        self._hidden: dict[str, tuple[Any, bool]] = {}
        #: overview layers the user deleted: not brought back until the overview restarts
        self._dismissed: set[str] = set()
        self._own = OwnRemoval(viewer)
        self._active = False
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.refresh)
        self._connections: list[tuple[Any, Callable[..., Any]]] = [
            (viewer.dims.events.current_step, self._on_slider),
            (viewer.layers.events.removed, self._on_layer_removed),
        ]
        for signal, slot in self._connections:
            signal.connect(slot)

    # -- what the widget and the overlay use -----------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    def layers(self) -> dict[str, Any]:
        """``{assembler layer name: overview layer}`` shown now."""
        return {name: entry.layer for name, entry in self._entries.items()}

    def source_of(self, layer: Any) -> str | None:
        """The assembler name of the streamed layer an overview layer shows, else ``None``."""
        for name, entry in self._entries.items():
            if _same(entry.layer, layer):
                return name
        return None

    def set_active(self, on: bool) -> bool:
        """Show the overview (True) or end it; False if no streamed layer stacks wells of a
        plate on a slider, so there is nothing to lay out (the overview stays off)."""
        if on == self._active:
            return True
        if on:
            self._active = True
            self.refresh()
            if not self._entries:
                self._active = False
                self._restore_hidden()
                return False
            for callbacks, callback in self._mouse:
                callbacks.append(callback)
        else:
            self._end()
        self._viewer.reset_view()  # the plate, or the well, fills the canvas
        return True

    def _end(self) -> None:
        self._active = False
        self._timer.stop()
        for callbacks, callback in self._mouse:
            with contextlib.suppress(ValueError):  # not added: the overview was off
                callbacks.remove(callback)
        self.hovered = None
        for name in list(self._entries):
            self._drop(name)
        self._restore_hidden()
        self._dismissed.clear()

    def schedule(self, delay_ms: int = REFRESH_MS) -> None:
        """Rebuild within ``delay_ms`` (several requests meanwhile: one rebuild)."""
        if not self._active:
            return
        if not self._timer.isActive() or self._timer.remainingTime() > delay_ms:
            self._timer.start(delay_ms)

    def close(self) -> None:
        """End the overview (its layers go, hidden layers come back) and disconnect."""
        with contextlib.suppress(RuntimeError, ValueError, KeyError):  # Qt may be gone
            self._end()
        for signal, slot in self._connections:
            with contextlib.suppress(RuntimeError, TypeError, ValueError):
                signal.disconnect(slot)
        self._connections.clear()

    # -- building ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring every overview layer up to date now; never raises into the Qt event loop."""
        if not self._active:
            return
        run = self._run()
        streamed = {name: source for name, source in self._streamed().items()
                    if run is None or _run_of(source) == run}
        for name in list(self._entries):
            if name not in streamed:  # its run was cleared, or another run was chosen
                self._drop(name)
        plates: dict[Any, Any] = {}
        for name, source in streamed.items():
            if name in self._dismissed:
                continue
            try:
                self._refresh_one(name, source, plates)
            except Exception:
                log.exception("the plate overview of %s failed", name)
        if self._entries:  # other runs, and layers with no plate, would cover the mosaic
            for name, source in self._streamed().items():
                if name not in self._entries:
                    self._hide(name, source)
        self._settle()

    def _refresh_one(self, name: str, source: Any, plates: dict[Any, Any]) -> None:
        run = _run_of(source)
        if run not in plates:
            plates[run] = self._assembler.plate_map(run)
        plate = plates[run]
        stack = self._assembler.view(name)
        if plate is None or not plate.rows or stack is None:
            return
        cells = {pos: status for pos, status in plate.cells.items() if status.index is not None}
        rgb = bool(getattr(source, "rgb", False))
        image_ndim = 3 if rgb else 2
        if not cells or stack.ndim < STACK_NDIM + 2:
            return
        layout = tiling(plate.rows, plate.cols, stack.shape[stack.ndim - image_ndim:][:2])
        rest = self._rest(source)
        shape = layout.shape + stack.shape[stack.ndim - 1:] if rgb else layout.shape
        entry = self._entries.get(name)
        scale = _scale(source, layout.step, rgb)  # the layer's own changes at the memory cap
        if (entry is not None and entry.layout == layout and entry.layer.data.shape == shape
                and entry.layer.data.dtype == stack.dtype
                and tuple(entry.layer.scale[-2:]) == scale):  # draw into the mosaic shown
            fresh, data = False, entry.layer.data
            drawn = entry.drawn if entry.rest == rest else {}  # another plane: every well
        else:
            fresh, data, drawn = True, np.zeros(shape, stack.dtype), {}
        todo = {pos: status.index for pos, status in cells.items()
                if drawn.get(pos) != status.last_seen}
        written = fill_tiles(data, layout, stack, todo, rest)
        for pos in todo:  # a well past this stack's extent is drawn next time
            if cells[pos].index < stack.shape[0]:
                drawn[pos] = cells[pos].last_seen
        if entry is None:
            entry = self._add(name, source, data, layout, rest)
        elif fresh:
            entry.layer.scale = scale
            entry.layer.data = data
        elif written:
            entry.layer.refresh()
        entry.layout, entry.rest, entry.drawn = layout, rest, drawn
        entry.names = {pos: status.name for pos, status in cells.items()}

    def _add(self, name: str, source: Any, data: np.ndarray, layout: Tiling,
             rest: tuple[int, ...]) -> _Entry:
        kind = "labels" if _is_labels(source) else "image"
        common: dict[str, Any] = {
            "name": f"{source.name}{SUFFIX}",
            "scale": _scale(source, layout.step, bool(getattr(source, "rgb", False))),
            "opacity": source.opacity,
            "blending": source.blending,
            "metadata": {"hcs_stream_overview": name},
        }
        if kind == "labels":
            layer = self._viewer.add_labels(data, **common)
        else:
            layer = self._viewer.add_image(
                data, rgb=bool(source.rgb), colormap=source.colormap,
                contrast_limits=tuple(source.contrast_limits), gamma=source.gamma, **common)
        entry = _Entry(source, layer, layout, rest)
        self._hide(name, source)
        linked = _LINKED[kind]
        try:
            from napari.experimental import link_layers

            link_layers([source, layer], linked)
            entry.linked = linked
        except Exception:  # an older napari: the overview still shows, unlinked
            log.debug("cannot link %s to its overview", source.name, exc_info=True)
        self._entries[name] = entry
        return entry

    def _hide(self, name: str, source: Any) -> None:
        """Hide a streamed layer for the overview, once (a layer the user shows again stays
        shown), remembering whether it was visible."""
        if name not in self._hidden:
            self._hidden[name] = (source, bool(source.visible))
            source.visible = False

    # -- the mouse ---------------------------------------------------------------------------------
    def well_at(self, position: Any) -> str | None:
        """The well whose tile is under world ``position`` (the top-most overview that has one
        there), else None."""
        for entry in reversed(list(self._entries.values())):
            y, x = (float(v) for v in entry.layer.world_to_data(position)[-2:])
            cell = entry.layout.cell_at(y, x)
            well = entry.names.get(cell) if cell is not None else None
            if well is not None:
                return well
        return None

    def _on_double_click(self, _viewer: Any, event: Any) -> None:
        well = self.well_at(event.position)
        if well is not None:
            self._open_well(well)

    def _on_mouse_move(self, _viewer: Any, event: Any) -> None:
        well = self.well_at(event.position)
        if well != self.hovered:
            self.hovered = well
            self._on_hover()

    # -- taking it down ----------------------------------------------------------------------------
    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        _unlink(entry)
        self._own.remove(entry.layer)

    def _restore_hidden(self) -> None:
        present = {layer.unique_id for layer in self._viewer.layers}
        for source, was_visible in self._hidden.values():
            if source.unique_id in present and was_visible and not source.visible:
                source.visible = True
        self._hidden.clear()

    def _on_layer_removed(self, event: Any) -> None:
        """A streamed layer went (its run was cleared): its overview goes with it. The user
        deleted an overview layer: let it go for as long as the overview is on."""
        if self._own.active:
            return
        removed = getattr(event, "value", None)
        for name, entry in list(self._entries.items()):
            if _same(entry.source, removed):
                self._drop(name)
                self._hidden.pop(name, None)
            elif _same(entry.layer, removed):
                _unlink(entry)
                del self._entries[name]
                self._dismissed.add(name)

    def _rest(self, source: Any) -> tuple[int, ...]:
        """The slider positions of a streamed layer's axes between the well axis and the plane
        (site, channel, t, z, ...): napari aligns layers on their trailing axes, and an RGB
        layer's colour axis is not a slider."""
        return layer_step(self._viewer.dims.current_step, source.ndim)[1:-2]

    def _on_slider(self, _event: object = None) -> None:
        """Another site, channel, z or t: rebuild soon. The well slider alone (which follows
        the newest frame on every render tick) changes nothing here."""
        if any(self._rest(entry.source) != entry.rest for entry in self._entries.values()):
            self.schedule(SLIDER_MS)


def _run_of(layer: Any) -> Any:
    """The run a streamed layer belongs to (from the metadata the render tick gives it)."""
    return (getattr(layer, "metadata", None) or {}).get("hcs_stream", {}).get("run")


def _same(a: Any, b: Any) -> bool:
    """The same napari layer (compared by id: napari may hand out proxies of layers)."""
    return a is not None and b is not None and a.unique_id == b.unique_id


def _is_labels(layer: Any) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels)


def _scale(source: Any, step: int, rgb: bool) -> tuple[float, float]:
    """An overview pixel covers ``step`` pixels of the streamed layer's plane (in its own
    scale, which is above 1 when the layer itself was downsampled)."""
    scale = tuple(float(s) for s in source.scale)
    return scale[-2] * step, scale[-1] * step


def _unlink(entry: _Entry) -> None:
    if not entry.linked:
        return
    with contextlib.suppress(Exception):
        from napari.experimental import unlink_layers

        unlink_layers([entry.source, entry.layer], entry.linked)
    entry.linked = ()
