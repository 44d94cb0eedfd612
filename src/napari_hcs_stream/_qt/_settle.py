"""Lay out the window's item views in the repaint of the render tick, not in one of their own.

A tick that re-slices a streamed layer leaves napari's layer list with a *delayed* layout
pending (an item view lays its rows out again on a zero-time timer), which Qt runs after it
has repainted the window for the tick. The layout then repaints the list, and Qt repaints the
window a second time. With software OpenGL every window repaint composes the whole window,
about 12 ms here, inside napari's Python ``_QtMainWindow.event`` and so holding the GIL that
the listener needs to take frames in.
Running the pending layout right after the tick puts both in one repaint: 1.0-1.1 window
repaints per tick instead of 1.6-1.9 (``docs/benchmarks.md``, ninth session). The plate
overview's rebuilds change layers too, outside the tick, and settle the same way.

``QAbstractItemView.executeDelayedItemsLayout`` is protected: PyQt lets Python call it only on
views created from Python (napari's layer list, the widget's counts table), which is all this
needs; views Qt made for itself (a combo box's popup list, table headers) are left alone.
Nothing here depends on napari's attribute names: the views are found among the children of
the application's visible windows (napari's, and the widget's own when it floats).
"""

from __future__ import annotations

import time
import weakref

from qtpy.QtWidgets import QAbstractItemView, QApplication

#: how often the windows are searched again for item views (a new dock, a view shown)
RESCAN_S = 2.0


class ItemViewSettler:
    """Runs the delayed layouts of the visible item views of the visible windows, now.

    It keeps only weak references to the views: napari's own widgets must be free to go when
    the viewer closes, whatever becomes of this object. Views that appear later (a window
    shown, a dock floated) are found at the next scan, at most :data:`RESCAN_S` later.
    """

    def __init__(self, rescan_s: float = RESCAN_S) -> None:
        self._rescan_s = rescan_s
        self._views: list[weakref.ref[QAbstractItemView]] = []
        self._scanned_at = float("-inf")

    def settle(self) -> int:
        """Lay out every pending view; returns how many views were looked at."""
        now = time.monotonic()
        if now - self._scanned_at >= self._rescan_s:
            self._scan(now)
        kept = []
        for ref in self._views:
            view = ref()
            if view is not None and _lay_out(view):  # else deleted since the scan
                kept.append(ref)
        self._views = kept
        return len(kept)

    def _scan(self, now: float) -> None:
        self._scanned_at = now
        found: dict[int, QAbstractItemView] = {}  # a floating dock's views are found twice
        for window in QApplication.topLevelWidgets():
            if window.isVisible():
                for view in window.findChildren(QAbstractItemView):
                    if id(view) not in found and view.isVisible() and _lay_out(view):
                        found[id(view)] = view
        self._views = [weakref.ref(view) for view in found.values()]


def _lay_out(view: QAbstractItemView) -> bool:
    """The view's pending layout, done now (a no-op without one); False where Python may not
    call it (a view Qt created, PyQt's rule for protected methods) or the view is gone."""
    try:
        view.executeDelayedItemsLayout()
    except (RuntimeError, AttributeError, TypeError):
        return False
    return True
