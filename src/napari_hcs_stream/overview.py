"""The plate overview: every well of a plate side by side in one image, at reduced resolution.

A plate streamed as a stack shows one well at a time; the overview lays each well's plane (at
the current site, channel, z and t) out on the plate's rows and columns, so a glance shows the
whole plate, like the montage of an HCS instrument's software. Planes are sampled (every
``step``-th pixel, no averaging: cheap enough to rebuild live) so that the mosaic stays within
:data:`MAX_SIDE` pixels on its longer side, whatever the plate: a 1536-well plate of 2048x2048
frames becomes 32 x 48 tiles of 82x82 pixels. A thin gap separates the wells.

Plain numpy; the viewer side (``_qt/_overview.py``) decides when to rebuild and where to show it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["GAP", "MAX_SIDE", "Tiling", "fill_tiles", "tiling"]

#: the mosaic's longer side stays within this many pixels (a 2D texture every OpenGL has).
MAX_SIDE = 4096
#: blank pixels between two wells' tiles: at least this, and a 32nd of a tile, so the gaps
#: stay visible when the whole plate fits the canvas.
GAP = 2
GAP_FRACTION = 32


@dataclass(frozen=True)
class Tiling:
    """Where each well's plane goes in the mosaic: ``rows`` x ``cols`` tiles of ``tile``
    pixels (a plane sampled every ``step``-th pixel), ``gap`` pixels apart."""

    rows: int
    cols: int
    step: int
    tile: tuple[int, int]
    gap: int = GAP

    @property
    def shape(self) -> tuple[int, int]:
        """The mosaic's height and width in pixels."""
        th, tw = self.tile
        return (self.rows * (th + self.gap) - self.gap, self.cols * (tw + self.gap) - self.gap)

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel of the tile of the well at ``row``, ``col`` (0-based)."""
        th, tw = self.tile
        return row * (th + self.gap), col * (tw + self.gap)

    def cell_at(self, y: float, x: float) -> tuple[int, int] | None:
        """The (row, col) whose tile holds mosaic pixel ``(y, x)``; None in a gap or outside."""
        th, tw = self.tile
        if not (math.isfinite(y) and math.isfinite(x)):
            return None
        # napari's pixel i spans [i - 0.5, i + 0.5) in data coordinates
        yi, xi = math.floor(y + 0.5), math.floor(x + 0.5)
        row, dy = divmod(yi, th + self.gap)
        col, dx = divmod(xi, tw + self.gap)
        if not (0 <= row < self.rows and 0 <= col < self.cols) or dy >= th or dx >= tw:
            return None
        return int(row), int(col)


def tiling(rows: int, cols: int, plane: tuple[int, int], max_side: int = MAX_SIDE,
           gap: int = GAP) -> Tiling:
    """The finest sampling of ``plane`` (height, width) whose mosaic fits in ``max_side``;
    tiles are at least ``gap`` pixels apart, and a 32nd of a tile's longer side."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a plate has at least one row and one column, got {rows} x {cols}")
    height, width = (int(n) for n in plane)
    if height < 1 or width < 1:
        raise ValueError(f"a plane has at least one pixel per side, got {plane}")
    if max(rows, cols) * (1 + gap) - gap > max_side:
        raise ValueError(f"a {rows} x {cols} plate does not fit in {max_side} pixels")
    step = max(1, math.ceil(max(rows * height, cols * width) / max_side))
    while True:
        tile = (-(-height // step), -(-width // step))
        found = Tiling(rows, cols, step, tile, max(gap, -(-max(tile) // GAP_FRACTION)))
        if max(found.shape) <= max_side:
            return found
        step += 1


def fill_tiles(out: np.ndarray, layout: Tiling, stack: np.ndarray,
               cells: Mapping[tuple[int, int], int], rest: tuple[int, ...]) -> int:
    """Write each placed well's plane into its tile of ``out``; returns how many were written.

    ``stack`` is a streamed layer's data: the well axis first, then the other axes, then the
    plane (two image axes, and colour last for RGB). ``cells`` maps (row, col) to the well's
    index on the well axis; ``rest`` holds the indices of the axes between the well axis and
    the plane (site, channel, t, z, ...), clipped to the stack here. A well past the stack's
    extent is left alone (its frames are not in this stack yet).
    """
    lead = 1 + len(rest)
    if stack.ndim < lead + 2:
        raise ValueError(f"rest {rest} does not fit a stack of shape {stack.shape}")
    index_rest = tuple(min(max(int(i), 0), n - 1)
                       for i, n in zip(rest, stack.shape[1:lead], strict=True))
    step = layout.step
    th, tw = layout.tile
    written = 0
    for (row, col), index in cells.items():
        if not (0 <= index < stack.shape[0] and 0 <= row < layout.rows
                and 0 <= col < layout.cols):
            continue
        tile = stack[(index, *index_rest)][::step, ::step]
        y, x = layout.origin(row, col)
        out[y:y + min(th, tile.shape[0]), x:x + min(tw, tile.shape[1])] = tile[:th, :tw]
        written += 1
    return written
