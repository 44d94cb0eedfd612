"""Plate layout names and the dimension-label text shown as the user moves sliders.

People read positions on a plate as ``B03``, not as slider index 14, so everything the viewer
shows goes through here: row letters (``A`` .. ``Z``, then ``AA`` .. ``AF`` for 1536-well
plates), zero-padded columns, channel names from producer metadata, and the overlay text
``Well B03 | Site 2 | DAPI | Z 4``. Plain Python: no numpy, no Qt.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "LOWERED_NOTE",
    "PLATE_FORMATS",
    "channel_display_name",
    "format_labels",
    "human_bytes",
    "parse_well",
    "plate_format_for",
    "plate_shape",
    "row_name",
    "well_name",
    "well_sort_key",
]

#: Standard plate formats: number of wells -> (rows, columns).
PLATE_FORMATS: dict[int, tuple[int, int]] = {
    6: (2, 3),
    12: (3, 4),
    24: (4, 6),
    48: (6, 8),
    96: (8, 12),
    384: (16, 24),
    1536: (32, 48),
}

_WELL_RE = re.compile(r"^([A-Za-z]{1,3})0*([0-9]{1,4})$")

#: what the demo's summary and ``napari-hcs-stream status`` add to a run whose resolution was
#: lowered at the memory cap
LOWERED_NOTE = " (lowered to fit the memory cap)"

#: Overlay words per component; the channel is shown bare (``DAPI``, not ``Channel DAPI``).
_COMPONENT_WORDS = {"well": "Well", "site": "Site", "channel": "", "z": "Z", "t": "T"}


def row_name(i: int) -> str:
    """Row letters for a 0-based row: 0 -> ``A``, 25 -> ``Z``, 26 -> ``AA``, 31 -> ``AF``.

    Spreadsheet-style (bijective base 26), which is how 1536-well plates name rows 27..32.
    """
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise ValueError(f"a plate row index must be an integer >= 0, got {i!r}")
    letters = ""
    n = i + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def well_name(row: int, col: int, width: int = 2) -> str:
    """The well at 0-based ``(row, col)``: ``well_name(1, 2) == "B03"``.

    Columns are zero-padded to ``width`` digits so names sort and align in lists.
    """
    if not isinstance(col, int) or isinstance(col, bool) or col < 0:
        raise ValueError(f"a plate column index must be an integer >= 0, got {col!r}")
    return f"{row_name(row)}{col + 1:0{width}d}"


def parse_well(name: str) -> tuple[int, int]:
    """``"B3"``, ``"b03"`` or ``"AF48"`` -> 0-based ``(row, col)``.

    Accepts any case and any zero padding, because producers spell wells every way; rejects
    everything else with a message that says what a well name looks like.
    """
    if not isinstance(name, str):
        raise TypeError(f"a well name must be a string like 'B03', got {type(name).__name__}")
    match = _WELL_RE.match(name.strip())
    if match is None:
        raise ValueError(
            f"not a well name: {name!r} (expected row letters then a column number, "
            "like 'B03', 'b3' or 'AF48')"
        )
    letters, digits = match.groups()
    col = int(digits)
    if col < 1:
        raise ValueError(f"not a well name: {name!r} (columns are numbered from 1)")
    row = 0
    for ch in letters.upper():
        row = row * 26 + (ord(ch) - ord("A") + 1)
    return row - 1, col - 1


def well_sort_key(name: str) -> tuple[int, int, int, str]:
    """Sort wells in plate order (A01, A02, .., B01), not text order (A1, A10, A2).

    Names that are not wells sort after all wells, by text, so a mixed list never raises.
    """
    try:
        row, col = parse_well(name)
    except (ValueError, TypeError):
        return (1, 0, 0, str(name))
    return (0, row, col, "")


def plate_format_for(n_wells: int) -> int:
    """The smallest standard plate format holding ``n_wells`` wells (``plate_format_for(90)
    == 96``), to draw a plate layout from how many wells a run says it has."""
    if not isinstance(n_wells, int) or isinstance(n_wells, bool) or n_wells < 0:
        raise ValueError(f"a number of wells must be an integer >= 0, got {n_wells!r}")
    for fmt in sorted(PLATE_FORMATS):
        if n_wells <= fmt:
            return fmt
    raise ValueError(
        f"no standard plate holds {n_wells} wells (the largest format is 1536 wells, 32 x 48)"
    )


def plate_shape(n_wells: int) -> tuple[int, int]:
    """``(rows, cols)`` of the smallest standard plate holding ``n_wells`` wells."""
    return PLATE_FORMATS[plate_format_for(n_wells)]


def channel_display_name(channel: str | int | None, meta: Mapping[str, Any] | None = None) -> str:
    """A channel as people name it.

    Producers often send channels as integers and the names once, in
    ``meta["channel_names"]`` (a JSON object, so its keys are strings: ``{"0": "DAPI"}``; a
    list indexed by channel also works). Without a name an integer shows as ``Channel 2``; a
    string channel is already a name.
    """
    if channel is None:
        return ""
    if isinstance(channel, str):
        return channel
    names = (meta or {}).get("channel_names")
    if isinstance(names, Mapping):
        found = names.get(str(channel), names.get(channel))
        if found is not None:
            return str(found)
    elif isinstance(names, (list, tuple)) and 0 <= channel < len(names):
        return str(names[channel])
    return f"Channel {channel}"


def format_labels(pairs: Iterable[tuple[str, object]]) -> str:
    """``[("well", "B03"), ("site", 2), ("channel", "DAPI"), ("z", 4)]`` ->
    ``"Well B03 | Site 2 | DAPI | Z 4"``.

    Pairs with a ``None`` value are skipped, so callers can pass every component and let
    missing ones vanish. The caller passes the channel's display name
    (:func:`channel_display_name`); components not listed above show as ``Name value``.
    """
    parts = []
    for component, value in pairs:
        if value is None or value == "":
            continue
        word = _COMPONENT_WORDS.get(component, component.capitalize())
        parts.append(f"{word} {value}" if word else str(value))
    return " | ".join(parts)


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 MiB``, ``11.8 GiB``: memory as the widget and the status command say it."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
