"""The dimension-label text in the canvas: ``Well B03 | Site 2 | DAPI | Z 4``.

Slider positions are bare integers; the user thinks in wells, sites and channel names. The text
follows the sliders and the active layer, and is visible only while streamed layers exist.

Which text overlay is ours: napari >= 0.9 keeps canvas overlays in an evented dict
(``viewer.canvas.overlays``) to which a plugin may add its own entry, so we add a private
``TextOverlay`` under :data:`OVERLAY_KEY` and never touch the user's ``text`` overlay. Older
napari has one shared ``viewer.text_overlay``; there we write to it only while it is empty or
still shows our own last text, so a user's own text is never overwritten, and we blank it again
when we hide.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from ..labels import format_labels

log = logging.getLogger(__name__)

#: key of our own entry in ``viewer.canvas.overlays`` (napari >= 0.9).
OVERLAY_KEY = "hcs_stream_labels"
#: the stack axes every streamed layer starts with.
STACK_NDIM = 5


class LabelSource(Protocol):
    """What the overlay needs from the assembler (kept narrow so tests can use a stand-in)."""

    def label_text(self, layer_name: str, stack_step: tuple[int, ...],
                   skip: tuple[str, ...] = ()) -> str: ...


class OverviewState(Protocol):
    """What the overlay needs from the plate overview."""

    @property
    def active(self) -> bool: ...

    #: the well under the mouse, if any
    hovered: str | None

    def source_of(self, layer: Any) -> str | None: ...


#: the overlay's words for the plate overview (every well, so no well in the text)
OVERVIEW_TEXT = "Plate overview"


class _OwnTextOverlay:
    """Our own entry in ``viewer.canvas.overlays`` (napari >= 0.9)."""

    def __init__(self, viewer: Any) -> None:
        from napari.components.overlays import TextOverlay

        self._overlays = viewer.canvas.overlays
        # no background box: napari resizes it on every text change, and vispy then rebuilds
        # its shader program on the next draw (about 20 ms per slider step with software
        # OpenGL, measured); a user may still turn it on (``.box = True``), we never reset it
        self._overlay = TextOverlay(visible=False, position="top_left", font_size=11, box=False)
        self._overlays[OVERLAY_KEY] = self._overlay

    def show(self, text: str) -> None:
        if self._overlay.text != text:
            self._overlay.text = text
        if not self._overlay.visible:
            self._overlay.visible = True

    def hide(self) -> None:
        if self._overlay.visible:
            self._overlay.visible = False

    def close(self) -> None:
        with contextlib.suppress(KeyError, RuntimeError, AttributeError):
            self._overlays.pop(OVERLAY_KEY)


class _SharedTextOverlay:
    """The single ``viewer.text_overlay`` of napari < 0.9, borrowed only while it is free."""

    def __init__(self, viewer: Any) -> None:
        self._overlay = viewer.text_overlay
        self._ours = ""

    def _free(self) -> bool:
        return self._overlay.text in ("", self._ours)

    def show(self, text: str) -> None:
        if not self._free():
            return  # the user wrote their own text: leave it alone
        self._overlay.text = text
        self._ours = text
        self._overlay.visible = True

    def hide(self) -> None:
        if self._ours and self._overlay.text == self._ours:
            self._overlay.text = ""
            self._overlay.visible = False
        self._ours = ""

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, AttributeError):
            self.hide()


def _make_backend(viewer: Any) -> _OwnTextOverlay | _SharedTextOverlay:
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and hasattr(overlays, "__setitem__"):
        return _OwnTextOverlay(viewer)
    return _SharedTextOverlay(viewer)


class DimsLabelOverlay:
    """Keeps the label text in step with the sliders, the active layer and streamed updates.

    ``streamed`` returns the streamed layers currently in the viewer, as ``{assembler layer
    name: napari layer}`` in stacking order (bottom first): the overlay labels the active layer
    when it is one of them, else the top-most visible one. While the plate ``overview`` is on,
    the text names the well under the mouse, if any (``Plate overview | Well B03 | Site 2 |
    DAPI``), and an active overview layer stands for the streamed layer it shows.
    """

    def __init__(
        self,
        viewer: Any,
        labels: LabelSource,
        streamed: Callable[[], Mapping[str, Any]],
        overview: OverviewState | None = None,
    ) -> None:
        self._viewer = viewer
        self._labels = labels
        self._streamed = streamed
        self._overview = overview
        self._backend = _make_backend(viewer)
        self._connections: list[tuple[Any, Callable[..., Any]]] = [
            (viewer.dims.events.current_step, self._on_change),
            (viewer.layers.selection.events.active, self._on_change),
            (viewer.layers.events.removed, self._on_change),
        ]
        for signal, slot in self._connections:
            signal.connect(slot)
        self.text = ""

    def _on_change(self, _event: object = None) -> None:
        self.update()

    def target(self) -> tuple[str, Any] | None:
        """``(assembler layer name, napari layer)`` the text describes, or ``None``."""
        layers = self._streamed()
        if not layers:
            return None
        active = self._viewer.layers.selection.active
        if active is not None:
            for name, layer in layers.items():
                if layer.unique_id == active.unique_id:
                    return name, layer
            source = self._overview.source_of(active) if self._overview is not None else None
            if source is not None and source in layers:
                return source, layers[source]
        for name, layer in reversed(list(layers.items())):
            if layer.visible:
                return name, layer
        return next(reversed(list(layers.items())))

    def update(self) -> None:
        """Recompute the text (cheap: a few dict look-ups and one format)."""
        target = self.target()
        if target is None:
            self.text = ""
            self._backend.hide()
            return
        name, layer = target
        step = stack_step(self._viewer.dims.current_step, layer.ndim)
        overview = self._overview if self._overview is not None and self._overview.active else None
        try:
            if overview is not None:
                rest = self._labels.label_text(name, step, skip=("well",))
                self.text = " | ".join(filter(None, (
                    OVERVIEW_TEXT, format_labels([("well", overview.hovered)]), rest)))
            else:
                self.text = self._labels.label_text(name, step)
        except (KeyError, IndexError, ValueError) as exc:  # layer cleared under our feet
            log.debug("no label for %s at %s: %s", name, step, exc)
            self.text = ""
        if self.text:
            self._backend.show(self.text)
        else:
            self._backend.hide()

    def close(self) -> None:
        """Disconnect everything we connected, and take our text off the canvas."""
        for signal, slot in self._connections:
            with contextlib.suppress(RuntimeError, TypeError, ValueError):
                signal.disconnect(slot)
        self._connections.clear()
        self._backend.close()


def layer_step(current_step: Sequence[int], layer_ndim: int) -> tuple[int, ...]:
    """The layer's own indices (one per layer axis) from the viewer-wide slider position.

    napari aligns layers on their trailing axes: a layer with fewer axes than the viewer (another
    user layer may have more) starts ``viewer ndim - layer ndim`` axes in.
    """
    offset = max(0, len(current_step) - layer_ndim)
    return tuple(int(i) for i in current_step[offset : offset + layer_ndim])


def stack_step(current_step: Sequence[int], layer_ndim: int) -> tuple[int, ...]:
    """The layer's five stack indices from the viewer-wide slider position."""
    step = layer_step(current_step, layer_ndim)[:STACK_NDIM]
    return step + (0,) * (STACK_NDIM - len(step))


def with_stack_step(current_step: Sequence[int], layer_ndim: int, stack: Sequence[int],
                    displayed: Iterable[int] = ()) -> tuple[int, ...]:
    """The viewer-wide slider position with a layer's stack indices set to ``stack`` (the
    inverse of :func:`stack_step`); ``displayed`` axes (the canvas's own) are left alone."""
    step = [int(i) for i in current_step]
    offset = max(0, len(step) - layer_ndim)
    shown = set(displayed)
    for i, index in enumerate(stack[:STACK_NDIM]):
        if offset + i < len(step) and offset + i not in shown:
            step[offset + i] = int(index)
    return tuple(step)
