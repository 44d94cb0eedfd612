"""The per-producer counts table: frames/s, held back, received, dropped, torn, rejected, and a
totals row.

Rates are computed here, on the main thread, from successive status snapshots (the listener
only counts), smoothed over about a second so the numbers are readable while they change.
"held back" is the share of that time a producer spent waiting for a free slot in its
shared-memory ring (``waited_s``, which the producer itself adds up in the ring's header):
the viewer taking frames in more slowly than the pipeline sends them. Remote producers have
no ring and show 0 %; their frames queue in ZeroMQ or are counted as dropped. The totals row
shows the most held back producer. The column appears once a producer has waited at all: while
the viewer keeps up, the table stays narrow enough for the producer ids in a docked widget.

The number columns have fixed widths that only ever grow, measured from the text once. With
Qt's ``ResizeToContents`` every changed cell made the view measure whole columns (font metrics
of every row and the header): about 7 ms per status update, main-thread time taken from
napari's redraws and, through the GIL, from the listener.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
)

COLUMNS = ("producer", "frames/s", "held back", "received", "dropped", "torn", "rejected")
COUNTS = ("received", "dropped", "torn", "rejected")
HELD_BACK = COLUMNS.index("held back")
TOTALS = "total"
#: pixels around a cell's text (margins, grid line, the header's sort-indicator room).
_PADDING = 18
#: rows the table is tall enough for (two producers and the totals, up to seven and the
#: totals); more producers scroll, and the plate map below keeps its room.
_ROWS_SHOWN = (3, 8)
#: exponential smoothing of the rate (per second of elapsed time).
_RATE_WINDOW_S = 1.0


class CountsTable(QTableWidget):
    """One row per producer, sorted by id, then the totals row."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels(list(COLUMNS))
        vertical = self.verticalHeader()
        if vertical is not None:
            vertical.setVisible(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        header = self.horizontalHeader()
        if header is not None:
            header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
            for col in range(1, len(COLUMNS)):
                header.setSectionResizeMode(col, QHeaderView.ResizeMode.Fixed)
                header.resizeSection(col, self._text_width(COLUMNS[col]))
        self._set_header_tips()
        self.setColumnHidden(HELD_BACK, True)  # until a producer waits for the viewer
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Maximum)
        self._last: dict[tuple[str, str], tuple[float, float]] = {}
        self._longest: dict[int, int] = {}
        #: smoothed ``(column, producer)`` rates: frames/s, and held back as a share (0-1).
        self.rates: dict[tuple[str, str], float] = {}
        self.rows: dict[str, dict[str, Any]] = {}

    def show_counts(
        self, producers: Mapping[str, Mapping[str, Any]], totals: Mapping[str, Any],
        now: float | None = None,
    ) -> None:
        """Show a status snapshot's counts; ``now`` (``time.monotonic()`` when not given)
        is when it was taken, for the rates."""
        if now is None:
            now = time.monotonic()
        rows = {p: dict(c) for p, c in sorted(producers.items())}
        rows[TOTALS] = dict(totals)
        for name, counts in rows.items():
            counts["frames/s"] = self._rate("frames/s", name, counts.get("received"), now)
            if name != TOTALS:
                counts["held back"] = self._rate("held back", name, counts.get("waited_s"), now)
        rows[TOTALS]["held back"] = max(
            (c["held back"] for n, c in rows.items() if n != TOTALS), default=0.0)
        if self.isColumnHidden(HELD_BACK) and any(
                float(c.get("waited_s") or 0) > 0 for c in producers.values()):
            self.setColumnHidden(HELD_BACK, False)
        self.rows = rows
        if self.rowCount() != len(rows):
            self.setRowCount(len(rows))
            self.updateGeometry()
        for r, (name, counts) in enumerate(rows.items()):
            self._set(r, 0, name, bold=name == TOTALS)
            self._set(r, 1, f"{counts['frames/s']:.1f}")
            self._set(r, HELD_BACK, f"{counts['held back']:.0%}")
            for c, key in enumerate(COUNTS, start=3):
                self._set(r, c, str(int(counts.get(key, 0) or 0)))

    def sizeHint(self) -> QSize:
        """As tall as its rows, up to ``_ROWS_SHOWN[1]`` (more scroll)."""
        return QSize(super().sizeHint().width(), self._height_for(self.rowCount()))

    def minimumSizeHint(self) -> QSize:
        """Never shorter than ``_ROWS_SHOWN[0]`` rows: two producers and the totals show
        without scrolling, whatever is below the table."""
        return QSize(super().minimumSizeHint().width(), self._height_for(_ROWS_SHOWN[0]))

    def _height_for(self, rows: int) -> int:
        low, high = _ROWS_SHOWN
        rows = min(max(rows, low), high)
        header = self.horizontalHeader()
        height = (header.sizeHint().height() if header is not None else 0) + 2 * self.frameWidth()
        vertical = self.verticalHeader()
        height += rows * (vertical.defaultSectionSize() if vertical is not None else 30)
        viewport, scrollbar = self.viewport(), self.horizontalScrollBar()
        if (header is not None and viewport is not None and scrollbar is not None
                and header.length() > viewport.width()):
            height += scrollbar.sizeHint().height()
        return height

    def _rate(self, column: str, name: str, total: Any, now: float) -> float:
        """Growth per second of the running ``total``, smoothed over about a second."""
        key = (column, name)
        value = float(total or 0)
        before = self._last.get(key)
        self._last[key] = (now, value)
        if before is None:
            return self.rates.setdefault(key, 0.0)
        dt = now - before[0]
        if dt <= 0:
            return self.rates.get(key, 0.0)
        instant = max(0.0, value - before[1]) / dt
        alpha = min(1.0, dt / _RATE_WINDOW_S)
        rate = self.rates.get(key, instant) * (1 - alpha) + instant * alpha
        self.rates[key] = rate
        return rate

    def _set_header_tips(self) -> None:
        tips = {
            "frames/s": "frames received per second (about the last second)",
            "held back": "share of the last second the producer waited for this viewer to "
                         "free a shared-memory slot: the viewer is slowing it down "
                         "(local producers only)",
            "dropped": "sequence numbers that never arrived",
            "torn": "frames overwritten while they were copied (never shown)",
            "rejected": "messages refused; the reason is shown below",
        }
        for col, name in enumerate(COLUMNS):
            item = self.horizontalHeaderItem(col)
            if item is not None and name in tips:
                item.setToolTip(tips[name])

    def _set(self, row: int, col: int, text: str, *, bold: bool = False) -> None:
        item = self.item(row, col)
        if item is None:
            item = QTableWidgetItem()
            if col:
                item.setTextAlignment(
                    Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                )
            self.setItem(row, col, item)
        if item.text() != text:
            item.setText(text)
            if col:
                self._fit(col, text)
        if bold != item.font().bold():
            font = item.font()
            font.setBold(bold)
            item.setFont(font)

    def _text_width(self, text: str) -> int:
        return self.fontMetrics().horizontalAdvance(text) + _PADDING

    def _fit(self, col: int, text: str) -> None:
        """Widen a number column when a value outgrows it (never narrow it: no jitter)."""
        header = self.horizontalHeader()
        if header is None:
            return
        # only texts longer than any seen can be wider: measure only those
        if len(text) <= self._longest.get(col, 0):
            return
        self._longest[col] = len(text)
        width = self._text_width(text)
        if width > header.sectionSize(col):
            header.resizeSection(col, width)
