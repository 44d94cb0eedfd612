"""Which wells of a plate have arrived: the model behind the widget's plate map.

The assembler counts frames per ``(run, well)`` as they are committed; :func:`build_plate_map`
places those wells on the plate's rows and columns, so the viewer can show the run's progress
at a glance and jump to a well by clicking it. The layout is the producer's ``meta["plate"]``
(``{"rows": 16, "cols": 24}``) when it sent one, else the smallest standard plate that holds
every well name seen. Wells whose names are not plate positions (``"control-1"``), or lie
outside a declared layout, are listed as ``unplaced`` rather than dropped. Plain Python: no
numpy, no Qt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .labels import PLATE_FORMATS, parse_well, well_name

__all__ = ["MAX_COLS", "MAX_ROWS", "PlateMap", "WellStatus", "build_plate_map", "plate_layout"]

#: The largest layout drawn: a declared or inferred plate beyond it is not a plate map.
MAX_ROWS, MAX_COLS = 64, 96


@dataclass(frozen=True)
class WellStatus:
    """One well that has frames: its name as sent, how many, when the newest landed (the
    assembler's clock) and its index on the well slider (``None`` when wells are not stacked
    on a slider, e.g. shown as one layer each)."""

    name: str
    frames: int
    last_seen: float
    index: int | None


@dataclass(frozen=True)
class PlateMap:
    """Wells with frames, placed on a ``rows`` x ``cols`` plate (0 x 0: no name was a plate
    position). ``declared``: the layout came from the producer's ``meta["plate"]``."""

    rows: int
    cols: int
    cells: Mapping[tuple[int, int], WellStatus]
    unplaced: tuple[WellStatus, ...] = ()
    declared: bool = False

    @property
    def wells(self) -> int:
        """How many wells the plate has (``rows * cols``)."""
        return self.rows * self.cols

    @property
    def arrived(self) -> int:
        """How many wells have frames, placed or not."""
        return len(self.cells) + len(self.unplaced)

    def at(self, row: int, col: int) -> WellStatus | None:
        return self.cells.get((row, col))

    def position(self, name: str) -> tuple[int, int] | None:
        """``(row, col)`` of a placed well by name, any spelling (``"b3"`` finds ``B03``)."""
        pos = _position(name) if isinstance(name, str) else None
        return pos if pos in self.cells else None

    def has(self, name: str) -> bool:
        """Whether the well ``name`` (as sent) is on the map, placed or not."""
        pos = self.position(name)
        if pos is not None and self.cells[pos].name == name:
            return True
        return any(w.name == name for w in self.unplaced)

    def label(self, row: int, col: int) -> str:
        """The standard name of a position (``B03``), whether or not it has frames."""
        return well_name(row, col)


def plate_layout(declared: Any, positions: Iterable[tuple[int, int]]) -> tuple[int, int, bool]:
    """``(rows, cols, declared)``: a valid ``{"rows": R, "cols": C}`` wins; otherwise the
    smallest standard plate holding every position, or just enough rows and columns when no
    standard plate does (``(0, 0, False)`` without positions)."""
    if isinstance(declared, Mapping):
        rows, cols = declared.get("rows"), declared.get("cols")
        if (isinstance(rows, int) and isinstance(cols, int) and not isinstance(rows, bool)
                and not isinstance(cols, bool) and 0 < rows <= MAX_ROWS and 0 < cols <= MAX_COLS):
            return rows, cols, True
    positions = list(positions)
    if not positions:
        return 0, 0, False
    need_rows = max(r for r, _ in positions) + 1
    need_cols = max(c for _, c in positions) + 1
    for rows, cols in sorted(PLATE_FORMATS.values(), key=lambda rc: rc[0] * rc[1]):
        if rows >= need_rows and cols >= need_cols:
            return rows, cols, False
    return min(need_rows, MAX_ROWS), min(need_cols, MAX_COLS), False


def build_plate_map(wells: Iterable[WellStatus], declared: Any = None) -> PlateMap | None:
    """Place ``wells`` on the plate ``declared`` (a producer's ``meta["plate"]``) or on the
    one their names imply; ``None`` when there are no wells at all."""
    wells = list(wells)
    if not wells:
        return None
    parsed = [(_position(status.name), status) for status in wells]
    rows, cols, is_declared = plate_layout(declared, (p for p, _ in parsed if p is not None))
    cells: dict[tuple[int, int], WellStatus] = {}
    unplaced: list[WellStatus] = []
    for pos, status in parsed:
        if pos is None or pos[0] >= rows or pos[1] >= cols or pos in cells:
            unplaced.append(status)  # not a position, off this plate, or a second spelling
        else:
            cells[pos] = status
    return PlateMap(rows, cols, cells, tuple(unplaced), is_declared)


@lru_cache(maxsize=4096)
def _position(name: str) -> tuple[int, int] | None:
    """``parse_well`` or ``None``, remembered: the map is rebuilt a few times a second with
    the same names (a 1536-well plate's names cost about 2 ms to parse)."""
    try:
        return parse_well(name)
    except (TypeError, ValueError):
        return None
