"""Checks of ``publish()`` arguments: the caller's own mistakes raise, with what to do.

Also builds the header members that come from the arguments, as compact JSON bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..protocol import DTYPES, LABEL_DTYPES, Limits

_WELL_RE = re.compile(r"^[A-Za-z]{1,2}[0-9]{1,3}$")
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def check_name(what: str, value: object, limits: Limits) -> str:
    """Run ids, producer ids, sources, channel names: what a viewer would reject anyway."""
    if not isinstance(value, str) or not 1 <= len(value) <= limits.max_string:
        raise ValueError(f"{what} must be a string of 1 to {limits.max_string} characters, "
                         f"got {value!r}")
    return value


def check_array(array: object, kind: str, rgb: bool, limits: Limits) -> np.ndarray:
    """Raise for an item no viewer can take, before anything is sent (a bug in the caller)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"publish() needs a numpy array, got {type(array).__name__} "
                        "(convert it with numpy.asarray first)")
    name = array.dtype.name
    if name not in DTYPES:
        raise TypeError(f"dtype {array.dtype} cannot be streamed; use one of "
                        f"{', '.join(sorted(DTYPES))}")
    if kind not in ("image", "labels"):
        raise ValueError(f"kind must be 'image' or 'labels', got {kind!r}")
    if kind == "labels" and name not in LABEL_DTYPES:
        raise TypeError(f"labels need an integer dtype, got {name}")
    shape = array.shape
    if not 2 <= len(shape) <= limits.max_ndim or not all(
            1 <= s <= limits.max_side for s in shape):
        raise ValueError(f"cannot stream shape {shape}: 2 to {limits.max_ndim} dimensions of "
                         f"1 to {limits.max_side} each")
    if rgb is not False and (rgb is not True or kind != "image" or len(shape) < 3
                             or shape[-1] not in (3, 4)):
        raise ValueError(f"rgb=True needs an image with a last axis of 3 or 4, got {shape}")
    if array.nbytes > limits.max_frame_bytes:
        raise ValueError(f"{array.nbytes} bytes is more than the {limits.max_frame_bytes}-byte "
                         "limit for one item")
    return array


def _index(what: str, value: object, limits: Limits) -> int:
    """A site, z, t or channel index: numpy integers are fine, bools are a mistake."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if not 0 <= value <= limits.max_index:
        raise ValueError(f"{what} must be 0 to {limits.max_index}, got {value}")
    return int(value)


def coords_meta(well: str | None, site: object, channel: object, z: object, t: object,
                 meta: Mapping[str, Any] | None, limits: Limits) -> bytes:
    """The per-frame header members: coordinates (checked here) and meta."""
    parts = []
    if well is not None:
        if type(well) is not str or not _WELL_RE.fullmatch(well):
            raise ValueError(f"well must be a name like 'B03', got {well!r}")
        parts.append(f'"well":"{well}"')  # letters and digits only: no escaping needed
    for key, value in (("site", site), ("z", z), ("t", t)):
        if value is not None:
            if type(value) is not int or not 0 <= value <= limits.max_index:
                value = _index(key, value, limits)
            parts.append(f'"{key}":{value}')
    if channel is not None:
        if isinstance(channel, str):
            parts.append(f'"channel":{dumps(check_name("channel", channel, limits))}')
        else:
            parts.append(f'"channel":{_index("channel", channel, limits)}')
    if meta:
        try:
            extra = dumps(dict(meta))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"meta must be a JSON-serialisable mapping: {exc}") from None
        if len(extra) > limits.max_header_bytes // 2:
            raise ValueError(f"meta is {len(extra)} characters; keep it under "
                             f"{limits.max_header_bytes // 2}")
    else:
        extra = "{}"
    return f'"coords":{{{",".join(parts)}}},"meta":{extra}'.encode()
