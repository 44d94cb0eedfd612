"""The per-producer counts table: frames/s, received, dropped, torn, rejected, and a totals row.

Rates are computed here, on the main thread, from successive status snapshots (the listener
only counts), smoothed over about a second so the numbers are readable while they change.

The number columns have fixed widths that only ever grow, measured from the text once. With
Qt's ``ResizeToContents`` every changed cell made the view measure whole columns (font metrics
of every row and the header): about 7 ms per status update, main-thread time taken from
napari's redraws and, through the GIL, from the listener.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

COLUMNS = ("producer", "frames/s", "received", "dropped", "torn", "rejected")
COUNTS = ("received", "dropped", "torn", "rejected")
TOTALS = "total"
#: pixels around a cell's text (margins, grid line, the header's sort-indicator room).
_PADDING = 18
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
        self._last: dict[str, tuple[float, int]] = {}
        self._longest: dict[int, int] = {}
        self.rates: dict[str, float] = {}
        self.rows: dict[str, dict[str, Any]] = {}

    def show_counts(
        self, producers: Mapping[str, Mapping[str, Any]], totals: Mapping[str, Any]
    ) -> None:
        now = time.monotonic()
        rows = {p: dict(c) for p, c in sorted(producers.items())}
        rows[TOTALS] = dict(totals)
        for name, counts in rows.items():
            counts["frames/s"] = self._rate(name, int(counts.get("received", 0) or 0), now)
        self.rows = rows
        self.setRowCount(len(rows))
        for r, (name, counts) in enumerate(rows.items()):
            self._set(r, 0, name, bold=name == TOTALS)
            self._set(r, 1, f"{counts['frames/s']:.1f}")
            for c, key in enumerate(COUNTS, start=2):
                self._set(r, c, str(int(counts.get(key, 0) or 0)))

    def _rate(self, name: str, received: int, now: float) -> float:
        before = self._last.get(name)
        self._last[name] = (now, received)
        if before is None:
            return self.rates.setdefault(name, 0.0)
        dt = now - before[0]
        if dt <= 0:
            return self.rates.get(name, 0.0)
        instant = max(0, received - before[1]) / dt
        alpha = min(1.0, dt / _RATE_WINDOW_S)
        rate = self.rates.get(name, instant) * (1 - alpha) + instant * alpha
        self.rates[name] = rate
        return rate

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
