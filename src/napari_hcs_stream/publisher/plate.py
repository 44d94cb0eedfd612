"""Where a pipeline's images come from: a plate description a worker can read one site from.

A plate object travels to every worker with every task, so it is a small, picklable
description (layout, sites, channels, a seed or a folder), never pixels: each worker reads or
generates the one site it processes.

:class:`SyntheticPlate` makes a believable screen without any data: nuclei, cytoplasm,
puncta and membranes, a dose-response across columns, fewer cells where the dose is toxic,
dimmer edge wells and uneven illumination, all deterministic per (well, site) so a test and a
demo always see the same plate. It is vectorised numpy, fast enough (about 10 ms per 512x512x4
site) that generating never hides the pipeline's own cost.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..labels import PLATE_FORMATS, well_name
from .wells import parse_well


class Plate(ABC):
    """What the runner needs from a plate: its layout, its wells and sites, one site's image.

    Subclasses must stay cheap to pickle (they are sent with every task).
    """

    rows: int
    cols: int
    channels: tuple[str, ...]

    @abstractmethod
    def wells(self) -> list[str]:
        """The wells that have images, in plate order (row-major: A01, A02, ..., B01, ...)."""

    @abstractmethod
    def site_ids(self) -> list[int]:
        """The site numbers of each well (1-based, as microscopes name them)."""

    @abstractmethod
    def read(self, well: str, site: int) -> np.ndarray:
        """One site's image as (channels, y, x)."""

    def layout(self) -> dict[str, int]:
        """The plate's shape, as sent to the viewer so it can name wells."""
        return {"rows": self.rows, "cols": self.cols}


def plate_wells(n_wells: int) -> list[str]:
    """Every well of a standard plate, in plate order."""
    if n_wells not in PLATE_FORMATS:
        raise ValueError(f"a plate has one of {sorted(PLATE_FORMATS)} wells, got {n_wells!r}")
    rows, cols = PLATE_FORMATS[n_wells]
    return [well_name(r, c) for r in range(rows) for c in range(cols)]


_DTYPES = ("uint8", "uint16", "float32")


@dataclass(frozen=True)
class SyntheticPlate(Plate):
    """A deterministic synthetic screen: ``n_wells`` wells x ``sites`` sites x channels.

    ``wells`` restricts the plate to some wells (a sparse plate); by default every well of the
    format has images. The first four channels are nuclei (DAPI-like), cytoplasm (GFP-like,
    its intensity follows a dose-response across columns), puncta (RFP-like) and membranes
    (Cy5-like); further channels repeat these patterns.
    """

    n_wells: int = 96
    sites: int = 4
    channels: tuple[str, ...] = ("DAPI", "GFP", "RFP", "Cy5")
    size: int = 512
    dtype: str = "uint16"
    seed: int = 0
    only_wells: tuple[str, ...] | None = None
    rows: int = field(init=False)
    cols: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.n_wells, bool) or self.n_wells not in PLATE_FORMATS:
            raise ValueError(f"SyntheticPlate.n_wells must be one of {sorted(PLATE_FORMATS)}, "
                             f"got {self.n_wells!r}")
        if isinstance(self.sites, bool) or not isinstance(self.sites, int) or self.sites < 1:
            raise ValueError(f"SyntheticPlate.sites must be a positive int, got {self.sites!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"SyntheticPlate.size must be an int >= 16, got {self.size!r}")
        channels = tuple(self.channels)
        if not channels or not all(isinstance(c, str) and c for c in channels) or len(
                set(channels)) != len(channels):
            raise ValueError("SyntheticPlate.channels must be distinct, non-empty names, "
                             f"got {self.channels!r}")
        object.__setattr__(self, "channels", channels)
        dtype = np.dtype(self.dtype).name
        if dtype not in _DTYPES:
            raise ValueError(f"SyntheticPlate.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        rows, cols = PLATE_FORMATS[self.n_wells]
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "cols", cols)
        if self.only_wells is not None:
            keep = {parse_well(w) for w in self.only_wells}
            outside = [well_name(r, c) for r, c in sorted(keep) if r >= rows or c >= cols]
            if outside:
                raise ValueError(f"wells {outside} are not on a {self.n_wells}-well plate")
            object.__setattr__(self, "only_wells", tuple(
                w for w in plate_wells(self.n_wells) if parse_well(w) in keep))

    def wells(self) -> list[str]:
        return list(self.only_wells) if self.only_wells is not None else plate_wells(self.n_wells)

    def site_ids(self) -> list[int]:
        return list(range(1, self.sites + 1))

    def read(self, well: str, site: int) -> np.ndarray:
        row, col = parse_well(well)
        if row >= self.rows or col >= self.cols or not 1 <= site <= self.sites:
            raise ValueError(f"well {well!r} site {site} is not on this plate")
        return _render(self, row, col, site)

    def dose(self, well: str) -> float:
        """The well's relative dose in [0, 1]: a sigmoid across the plate's columns."""
        _, col = parse_well(well)
        return _dose(col, self.cols)


def _dose(col: int, n_cols: int) -> float:
    x = col / max(n_cols - 1, 1)
    return 1.0 / (1.0 + math.exp(-10.0 * (x - 0.5)))


# -- rendering -------------------------------------------------------------------------------
# Cells are stamped with precomputed kernels: the offsets and weights of every pixel of every
# stamp are laid out at once and summed with one np.bincount, which is far faster than a loop
# over cells or evaluating a Gaussian per cell.

_RADII = (0.75, 0.9, 1.05, 1.2)  # nucleus size classes, relative to the plate's base radius


@functools.lru_cache(maxsize=8)
def _kernels(size: int) -> dict[str, Any]:
    """Stamp kernels (flat offsets and weights) for a canvas of side ``size``; cached per worker."""
    base = max(size / 512 * 7.0, 1.5)  # nucleus radius at 512 px
    half = math.ceil(base * _RADII[-1] * 3.2)
    side = size + 2 * half
    oy, ox = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    r2 = oy**2 + ox**2
    flat = (oy * side + ox).astype(np.int64).ravel()

    def stamp(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = weights.ravel() > 1e-3
        return flat[keep], weights.ravel()[keep].astype(np.float32)

    nuclei = [stamp(np.exp(-((r2 / (base * k) ** 2) ** 2))) for k in _RADII]  # flat-topped
    cyto = [stamp(np.exp(-r2 / (2 * (base * k * 1.6) ** 2))) for k in _RADII]
    membrane = [stamp(np.exp(-((np.sqrt(r2) - base * k * 2.4) ** 2) / (2 * (base * 0.35) ** 2)))
                for k in _RADII]
    pr = max(base * 0.25, 0.7)
    p = math.ceil(pr * 3)
    py, px = np.mgrid[-p:p + 1, -p:p + 1].astype(np.float32)
    punct = np.exp(-(py**2 + px**2) / (2 * pr**2))
    keep = punct.ravel() > 1e-3
    puncta = ((py * side + px).astype(np.int64).ravel()[keep], punct.ravel()[keep])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    vignette = (1.0 - 0.35 * (yy**2 + xx**2) * 2).astype(np.float32)  # uneven illumination
    return {"base": base, "half": half, "side": side, "nuclei": nuclei, "cyto": cyto,
            "membrane": membrane, "puncta": puncta, "vignette": vignette}


@functools.lru_cache(maxsize=4)
def _noise_tile(size: int, seed: int) -> np.ndarray:
    """A noise texture generated once per worker; each site reads a window at a random offset."""
    rng = np.random.default_rng((seed, 7919))
    return rng.standard_normal((2 * size, 2 * size), dtype=np.float32)


def _stamp_all(index_parts: list[np.ndarray], weight_parts: list[np.ndarray], length: int
               ) -> np.ndarray:
    idx = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
    w = np.concatenate(weight_parts) if weight_parts else np.zeros(0, np.float32)
    return np.bincount(idx, weights=w, minlength=length)


def _render(plate: SyntheticPlate, row: int, col: int, site: int) -> np.ndarray:
    size, n_ch = plate.size, len(plate.channels)
    k = _kernels(size)
    half, side = k["half"], k["side"]
    rng = np.random.default_rng((plate.seed, row, col, site))
    dose = _dose(col, plate.cols)
    edge = row in (0, plate.rows - 1) or col in (0, plate.cols - 1)
    # fewer cells where the dose is toxic, a slow drift down the rows, site-to-site scatter
    density = 60.0 * (size / 512) ** 2 * (1.0 - 0.55 * dose**3) * (1.0 - 0.15 * row / plate.rows)
    n = int(rng.poisson(max(density, 1.0)))
    cy = rng.integers(0, size, n) + half
    cx = rng.integers(0, size, n) + half
    centre = cy * side + cx
    cls = rng.integers(0, len(_RADII), n)
    amp = rng.uniform(0.7, 1.3, n).astype(np.float32)
    plane = side * side

    parts_i: list[np.ndarray] = []
    parts_w: list[np.ndarray] = []
    for c in range(n_ch):
        pattern = c % 4
        offset = c * plane
        if pattern == 3:  # membranes: rings, slightly off the nucleus
            kern = k["membrane"]
            scale = 500.0
        elif pattern == 1:  # cytoplasm: the dose-response readout
            kern = k["cyto"]
            scale = 300.0 + 2200.0 * dose
        else:
            kern = k["nuclei"]
            scale = 3000.0
        if pattern == 2:  # puncta: a few spots per cell around its centre
            per = rng.integers(2, 8, n)
            owner = np.repeat(np.arange(n), per)
            spread = k["base"] * 2.0
            sy = np.clip(np.rint(rng.normal(0, spread, owner.size)), -half, half).astype(np.int64)
            sx = np.clip(np.rint(rng.normal(0, spread, owner.size)), -half, half).astype(np.int64)
            spot = centre[owner] + sy * side + sx
            off, w = k["puncta"]
            parts_i.append((spot[:, None] + off[None, :] + offset).ravel())
            parts_w.append((np.float32(1800.0) * amp[owner][:, None] * w[None, :]).ravel())
            continue
        for j in range(len(_RADII)):
            sel = cls == j
            if not sel.any():
                continue
            off, w = kern[j]
            parts_i.append((centre[sel][:, None] + off[None, :] + offset).ravel())
            parts_w.append((np.float32(scale) * amp[sel][:, None] * w[None, :]).ravel())
    canvas = _stamp_all(parts_i, parts_w, n_ch * plane).astype(np.float32)
    canvas = canvas.reshape(n_ch, side, side)[:, half:half + size, half:half + size]

    tile = _noise_tile(size, plate.seed)
    oy, ox = rng.integers(0, size, 2)
    noise = tile[oy:oy + size, ox:ox + size]
    gain = np.float32(0.85 if edge else 1.0)
    out = np.empty((n_ch, size, size), np.float32)
    for c in range(n_ch):
        img = out[c]
        np.multiply(canvas[c], k["vignette"], out=img)
        img += np.float32(100.0 + 10 * c)  # camera offset
        img *= gain
        img += noise * np.float32(12.0 + 3 * c)
    if plate.dtype == "float32":
        np.maximum(out, 0, out=out)
        return out
    top = np.iinfo(plate.dtype).max
    if plate.dtype == "uint8":
        out *= np.float32(1 / 16)
    np.clip(out, 0, top, out=out)
    return out.astype(plate.dtype)

