"""The plate map: every well of the plate, filled where frames arrived; click one to go there.

Wells that received a frame in the last :data:`RECENT_S` seconds are drawn in the accent
colour, so a glance shows where the pipeline is working; other wells with frames are fainter
the fewer frames they have next to the fullest well; the well the sliders show is ringed.
The grid is painted into a cached pixmap when the plate changes (a few times a second at
most); a slider move repaints only the ring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from qtpy.QtCore import QEvent, QPoint, QRect, QSize, Qt, QTimer, Signal
from qtpy.QtGui import (
    QColor,
    QFont,
    QFontMetrics,
    QHelpEvent,
    QMouseEvent,
    QPainter,
    QPen,
    QPixmap,
    QResizeEvent,
)
from qtpy.QtWidgets import QSizePolicy, QToolTip, QWidget

from ..labels import row_name
from ..platemap import PlateMap, WellStatus

#: a well that received a frame this recently (seconds) is drawn as "arriving now"
RECENT_S = 2.0
MAX_CELL = 24
#: below this cell size (px) row letters and column numbers are left out
LABELLED_CELL = 9

#: napari's default dark theme; the widget passes the viewer's theme in
DEFAULT_COLORS = {"empty": "#424a54", "data": "#4560c4", "recent": "#e3b617", "text": "#f0f1f2"}


class PlateMapView(QWidget):
    """Draws a :class:`~napari_hcs_stream.platemap.PlateMap`; emits ``well_clicked(name)``
    for a click on a well that sits on a slider position."""

    well_clicked = Signal(str)

    def __init__(self, parent: QWidget | None = None, *,
                 clock: Callable[[], float] = time.monotonic, recent_s: float = RECENT_S) -> None:
        super().__init__(parent)
        self._clock = clock
        self.recent_s = recent_s
        self._plate: PlateMap | None = None
        self._current: str | None = None
        self._colors = dict(DEFAULT_COLORS)
        self._pixmap: QPixmap | None = None
        self._expiry = QTimer(self)  # repaints when the newest "arriving now" well stops being
        self._expiry.setSingleShot(True)
        self._expiry.timeout.connect(self._invalidate)
        policy = QSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)
        self.setCursor(Qt.CursorShape.PointingHandCursor)

    # -- state -----------------------------------------------------------------------------
    @property
    def plate(self) -> PlateMap | None:
        return self._plate

    @property
    def current(self) -> str | None:
        return self._current

    def set_plate(self, plate: PlateMap | None) -> None:
        if plate == self._plate:
            return
        reshaped = plate is None or self._plate is None or (
            (plate.rows, plate.cols) != (self._plate.rows, self._plate.cols))
        self._plate = plate
        if reshaped:
            self.updateGeometry()
        self._invalidate()

    def set_current(self, well: str | None) -> None:
        if well != self._current:
            self._current = well
            self.update()

    @property
    def colors(self) -> dict[str, str]:
        """``empty``, ``data`` (frames arrived), ``recent`` (arriving now), ``text``."""
        return dict(self._colors)

    def set_colors(self, colors: Mapping[str, str]) -> None:
        self._colors = {**DEFAULT_COLORS, **colors}
        self._invalidate()

    def data_color(self, frames: int, most: int) -> QColor:
        """A well with frames: fainter the fewer it has next to the fullest well (a well
        still in progress, or one whose sites or channels partly failed)."""
        color = QColor(self._colors["data"])
        color.setAlphaF(0.4 + 0.6 * min(1.0, frames / max(most, 1)))
        return color

    def recent(self, status: WellStatus) -> bool:
        return self._clock() - status.last_seen < self.recent_s

    def _invalidate(self) -> None:
        self._pixmap = None
        self.update()

    # -- geometry --------------------------------------------------------------------------
    def _metrics(self, width: int, height: int | None = None) -> tuple[int, int, int]:
        """``(cell, left, top)``: cell size and where the grid starts (after the row and
        column labels, centred across the width)."""
        plate = self._plate
        if plate is None or not plate.rows or not plate.cols:
            return 0, 0, 0
        fm = QFontMetrics(self._label_font())
        left = fm.horizontalAdvance(row_name(plate.rows - 1)) + 6
        top = fm.height() + 1
        for labelled in (True, False):
            if not labelled:
                left = top = 0
            cell = (width - left) // plate.cols
            if height is not None:
                cell = min(cell, (height - top) // plate.rows)
            cell = max(1, min(cell, MAX_CELL))
            if cell >= LABELLED_CELL:
                break
        return cell, left + max(0, (width - left - cell * plate.cols) // 2), top

    def _label_font(self) -> QFont:
        font = QFont(self.font())
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.85))
        return font

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        cell, _, top = self._metrics(width)
        return top + cell * self._plate.rows + 1 if cell and self._plate is not None else 0

    def sizeHint(self) -> QSize:
        return QSize(320, self.heightForWidth(320))

    def minimumSizeHint(self) -> QSize:
        """Small: the map appears mid-run, and must not make napari's window grow."""
        return QSize(100, 24)

    def cell_rect(self, row: int, col: int) -> QRect:
        """Where the well at ``(row, col)`` is drawn, in widget coordinates."""
        cell, left, top = self._metrics(self.width(), self.height())
        return QRect(left + col * cell, top + row * cell, cell, cell)

    def cell_at(self, pos: QPoint) -> tuple[int, int] | None:
        plate = self._plate
        cell, left, top = self._metrics(self.width(), self.height())
        if plate is None or not cell or pos.x() < left or pos.y() < top:
            return None
        row, col = (pos.y() - top) // cell, (pos.x() - left) // cell
        return (row, col) if row < plate.rows and col < plate.cols else None

    def resizeEvent(self, event: QResizeEvent | None) -> None:
        self._pixmap = None
        super().resizeEvent(event)

    # -- painting ----------------------------------------------------------------------------
    def paintEvent(self, _event: object) -> None:
        plate = self._plate
        if plate is None or not plate.rows:
            return
        if self._pixmap is None or self._pixmap.size() != self.size():
            self._pixmap = self._paint_grid()
        painter = QPainter(self)
        painter.drawPixmap(0, 0, self._pixmap)
        position = plate.position(self._current) if self._current else None
        if position is not None:
            rect = self.cell_rect(*position)
            pen = QPen(QColor(self._colors["text"]))
            pen.setWidth(2 if rect.width() >= 8 else 1)
            painter.setPen(pen)
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRect(rect.adjusted(0, 0, -1, -1))
        painter.end()

    def _paint_grid(self) -> QPixmap:
        plate = self._plate
        assert plate is not None
        ratio = self.devicePixelRatioF()
        pixmap = QPixmap(self.size() * ratio)
        pixmap.setDevicePixelRatio(ratio)
        pixmap.fill(Qt.GlobalColor.transparent)
        cell, left, top = self._metrics(self.width(), self.height())
        painter = QPainter(pixmap)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, cell >= 8)
        if top:  # the grid left room for row and column labels
            self._paint_labels(painter, plate, cell, left, top)
        painter.setPen(Qt.PenStyle.NoPen)
        empty, recent_color = QColor(self._colors["empty"]), QColor(self._colors["recent"])
        most = max((w.frames for w in plate.cells.values()), default=1)
        inset = 1 if cell >= 4 else 0
        newest = None
        for row in range(plate.rows):
            for col in range(plate.cols):
                status = plate.at(row, col)
                if status is None:
                    brush = empty
                elif self.recent(status):
                    brush = recent_color
                    newest = max(newest or 0.0, status.last_seen)
                else:
                    brush = self.data_color(status.frames, most)
                painter.setBrush(brush)
                rect = QRect(left + col * cell, top + row * cell, cell, cell).adjusted(
                    inset, inset, -inset, -inset)
                if cell >= 8:
                    painter.drawEllipse(rect)
                else:
                    painter.drawRect(rect)
        painter.end()
        if newest is not None:  # redraw once the newest well is no longer "arriving now"
            self._expiry.start(max(50, int((newest + self.recent_s - self._clock()) * 1000) + 20))
        return pixmap

    def _paint_labels(self, painter: QPainter, plate: PlateMap, cell: int, left: int,
                      top: int) -> None:
        painter.setPen(QColor(self._colors["text"]))
        painter.setFont(self._label_font())
        every = 1 if cell >= painter.fontMetrics().horizontalAdvance(str(plate.cols)) + 4 else 2
        for col in range(0, plate.cols, every):
            rect = QRect(left + col * cell, 0, cell * every, top)
            if every > 1:
                rect = QRect(left + col * cell - cell, 0, cell * 3, top)
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, str(col + 1))
        for row in range(plate.rows):
            rect = QRect(0, top + row * cell, left - 4, cell)
            painter.drawText(rect, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                             row_name(row))

    # -- interaction -------------------------------------------------------------------------
    def describe(self, row: int, col: int) -> str:
        """Tooltip text for a position."""
        plate = self._plate
        assert plate is not None
        status = plate.at(row, col)
        name = plate.label(row, col)
        if status is None:
            return f"{name}: no frames yet"
        ago = max(0.0, self._clock() - status.last_seen)
        text = f"{status.name}: {status.frames} frame{'s' if status.frames != 1 else ''}, " \
               f"newest {_ago(ago)}"
        if status.index is None:
            text += " (wells are separate layers: select one in the layer list)"
        return text

    def event(self, e: QEvent | None) -> bool:
        if isinstance(e, QHelpEvent) and e.type() == QEvent.Type.ToolTip:
            found = self.cell_at(e.pos())
            if found is None:
                QToolTip.hideText()
            else:
                QToolTip.showText(e.globalPos(), self.describe(*found), self)
            return True
        return super().event(e)

    def mousePressEvent(self, event: QMouseEvent | None) -> None:
        if event is not None and event.button() == Qt.MouseButton.LeftButton:
            found = self.cell_at(event.position().toPoint())
            status = self._plate.at(*found) if found and self._plate is not None else None
            if status is not None and status.index is not None:
                self.well_clicked.emit(status.name)
        super().mousePressEvent(event)


def _ago(seconds: float) -> str:
    if seconds < 1:
        return "just now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"
