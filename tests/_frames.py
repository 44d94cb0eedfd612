"""Put items into a real PlateAssembler the way the receiver does, without sockets.

The render and overlay tests need frames in stacks, not a transport: this writes into the
destination the assembler hands out and commits, exactly like the listener thread.
"""

from __future__ import annotations

import itertools

import numpy as np

from napari_hcs_stream.protocol import Coords, FrameHeader, FrameRef

_seq = itertools.count()


def header(
    array: np.ndarray,
    *,
    well: str | None = None,
    site: int | None = None,
    channel: str | int | None = None,
    z: int | None = None,
    t: int | None = None,
    run: str = "run1",
    source: str = "out",
    kind: str = "image",
    producer: str = "p1",
    meta: dict | None = None,
) -> FrameHeader:
    return FrameHeader(
        producer=producer,
        seq=next(_seq),
        run=run,
        source=source,
        kind=kind,  # type: ignore[arg-type]
        dtype=str(array.dtype),
        shape=tuple(array.shape),
        pixels=FrameRef(1),
        coords=Coords(well=well, site=site, channel=channel, z=z, t=t),
        meta=meta or {},
    )


def put(assembler, array: np.ndarray, **coords) -> FrameHeader:
    """Write ``array`` where the assembler wants it and commit it (the listener's two calls)."""
    h = header(array, **coords)
    dest = assembler.destination(h)
    dest[...] = array
    assembler.commit(h, dest)
    return h


def plane(value: int, shape: tuple[int, int] = (32, 48), dtype: str = "uint16") -> np.ndarray:
    return np.full(shape, value, dtype=dtype)
