"""Plate names and overlay text: every plate format, round trips, and names that are not wells."""

from __future__ import annotations

import random

import pytest

from napari_hcs_stream.labels import (
    PLATE_FORMATS,
    channel_display_name,
    format_labels,
    parse_well,
    plate_format_for,
    plate_shape,
    row_name,
    well_name,
    well_sort_key,
)


@pytest.mark.parametrize(
    ("index", "name"), [(0, "A"), (1, "B"), (7, "H"), (15, "P"), (25, "Z"), (26, "AA"),
                        (27, "AB"), (31, "AF"), (51, "AZ"), (52, "BA"), (701, "ZZ"), (702, "AAA")]
)
def test_row_name(index: int, name: str) -> None:
    assert row_name(index) == name


@pytest.mark.parametrize("bad", [-1, 1.5, "A", None, True])
def test_row_name_rejects_non_indices(bad: object) -> None:
    with pytest.raises(ValueError, match="row index"):
        row_name(bad)  # type: ignore[arg-type]


def test_well_name_pads_columns() -> None:
    assert well_name(1, 2) == "B03"
    assert well_name(0, 0) == "A01"
    assert well_name(31, 47) == "AF48"
    assert well_name(7, 11, width=3) == "H012"
    with pytest.raises(ValueError, match="column index"):
        well_name(0, -1)


@pytest.mark.parametrize("fmt", sorted(PLATE_FORMATS))
def test_every_plate_format_round_trips(fmt: int) -> None:
    rows, cols = PLATE_FORMATS[fmt]
    assert rows * cols == fmt
    names = [well_name(r, c) for r in range(rows) for c in range(cols)]
    assert len(set(names)) == fmt
    for r in range(rows):
        for c in range(cols):
            name = well_name(r, c)
            assert parse_well(name) == (r, c)
            assert parse_well(name.lower()) == (r, c)
            assert parse_well(f"{row_name(r)}{c + 1}") == (r, c)  # unpadded
    # plate order, whatever order the names come in (text order puts AA01 before B01)
    shuffled = names[:]
    random.Random(fmt).shuffle(shuffled)
    assert sorted(shuffled, key=well_sort_key) == names
    assert plate_format_for(fmt) == fmt
    assert plate_shape(fmt) == (rows, cols)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("B3", (1, 2)), ("b03", (1, 2)), ("B003", (1, 2)), (" C12 ", (2, 11)), ("AF48", (31, 47)),
     ("af1", (31, 0)), ("P24", (15, 23))],
)
def test_parse_well_spellings(name: str, expected: tuple[int, int]) -> None:
    assert parse_well(name) == expected


@pytest.mark.parametrize("bad", ["", "B", "3", "3B", "B-03", "B03x", "A0", "A00", "ABCD1",
                                 "B 03", "well B03", "Ä1"])
def test_parse_well_rejects_non_wells(bad: str) -> None:
    with pytest.raises(ValueError, match="not a well name") as info:
        parse_well(bad)
    assert repr(bad) in str(info.value)


def test_parse_well_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="string like 'B03'"):
        parse_well(3)  # type: ignore[arg-type]


def test_well_sort_key_puts_non_wells_last() -> None:
    names = ["zeta", "B1", "A10", "control", "A2", "AA1", "A01"]
    assert sorted(names, key=well_sort_key) == ["A01", "A2", "A10", "B1", "AA1", "control", "zeta"]


@pytest.mark.parametrize(("n", "fmt"), [(0, 6), (1, 6), (6, 6), (7, 12), (13, 24), (90, 96),
                                        (96, 96), (97, 384), (1000, 1536), (1536, 1536)])
def test_plate_format_for(n: int, fmt: int) -> None:
    assert plate_format_for(n) == fmt
    assert plate_shape(n) == PLATE_FORMATS[fmt]


def test_plate_format_for_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="largest format is 1536"):
        plate_format_for(1537)
    with pytest.raises(ValueError, match=">= 0"):
        plate_format_for(-1)


def test_channel_display_name() -> None:
    meta = {"channel_names": {"0": "DAPI", "1": "GFP"}}
    assert channel_display_name(0, meta) == "DAPI"
    assert channel_display_name(1, meta) == "GFP"
    assert channel_display_name(2, meta) == "Channel 2"
    assert channel_display_name(3, None) == "Channel 3"
    assert channel_display_name("Cy5", meta) == "Cy5"
    assert channel_display_name(None, meta) == ""
    assert channel_display_name(1, {"channel_names": ["DAPI", "GFP"]}) == "GFP"
    assert channel_display_name(5, {"channel_names": ["DAPI"]}) == "Channel 5"
    assert channel_display_name(0, {"channel_names": {0: "Hoechst"}}) == "Hoechst"
    assert channel_display_name(0, {"channel_names": "junk"}) == "Channel 0"


def test_format_labels() -> None:
    pairs = [("well", "B03"), ("site", 2), ("channel", "DAPI"), ("z", 4)]
    assert format_labels(pairs) == "Well B03 | Site 2 | DAPI | Z 4"
    assert format_labels([("well", "A01"), ("site", None), ("t", 0)]) == "Well A01 | T 0"
    assert format_labels([("plate", "P1"), ("channel", "")]) == "Plate P1"
    assert format_labels([]) == ""
