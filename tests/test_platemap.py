"""The plate map's model: which wells arrived, where they sit on the plate (no Qt)."""

from __future__ import annotations

import pytest

from _frames import plane, put
from napari_hcs_stream.assembler import PlateAssembler
from napari_hcs_stream.platemap import WellStatus, build_plate_map, plate_layout


def status(name: str, frames: int = 1, index: int | None = 0) -> WellStatus:
    return WellStatus(name, frames, 0.0, index)


@pytest.mark.parametrize(("names", "layout"), [
    (["A01", "H12"], (8, 12)),
    (["B03"], (2, 3)),  # the smallest standard plate that holds it
    (["A13"], (16, 24)),  # 13 columns: past a 96-well plate
    (["I01"], (16, 24)),  # row I: past a 96-well plate
    (["AF48", "a1"], (32, 48)),
    (["AG01"], (33, 1)),  # no standard plate has 33 rows: just enough
])
def test_layout_is_inferred_from_well_names(names, layout):
    plate = build_plate_map([status(n) for n in names])
    assert (plate.rows, plate.cols) == layout
    assert not plate.declared
    assert plate.arrived == len(names) and not plate.unplaced


def test_declared_layout_wins_and_wells_off_it_or_not_positions_are_unplaced():
    wells = [status("B03"), status("P24"), status("control-1"), status("b3")]
    plate = build_plate_map(wells, {"rows": 8, "cols": 12})
    assert (plate.rows, plate.cols, plate.wells, plate.declared) == (8, 12, 96, True)
    assert plate.at(1, 2).name == "B03"
    assert plate.position("b03") == (1, 2) and plate.position("A01") is None
    assert [w.name for w in plate.unplaced] == ["P24", "control-1", "b3"]
    assert plate.arrived == 4
    assert plate.label(31, 47) == "AF48"


@pytest.mark.parametrize("declared", [None, {}, {"rows": 0, "cols": 12}, {"rows": "8"},
                                      {"rows": True, "cols": 12}, {"rows": 65, "cols": 12}, [8]])
def test_a_bad_declared_layout_is_ignored(declared):
    assert plate_layout(declared, [(1, 2)]) == (2, 3, False)


def test_no_wells_no_map_and_no_positions_an_empty_grid():
    assert build_plate_map([]) is None
    plate = build_plate_map([status("ctrl"), status("x")])
    assert (plate.rows, plate.cols) == (0, 0)
    assert [w.name for w in plate.unplaced] == ["ctrl", "x"]


def test_the_assembler_counts_frames_per_well_and_run_with_slider_indices():
    clock = iter(range(100, 200))
    asm = PlateAssembler(clock=lambda: float(next(clock)), prefault=False)
    assert asm.plate_map() is None
    meta = {"plate": {"rows": 16, "cols": 24}}
    for well in ("C05", "A01", "C05"):
        put(asm, plane(1), well=well, channel="DAPI", run="r1", meta=meta)
    put(asm, plane(2), well="A01", channel="DAPI", run="r2")
    put(asm, plane(3), channel="DAPI", run="r2")  # no well: not on the map

    r1 = asm.plate_map("r1")
    assert (r1.rows, r1.cols, r1.declared) == (16, 24, True)
    c05, a01 = r1.at(2, 4), r1.at(0, 0)
    assert (c05.name, c05.frames, c05.index) == ("C05", 2, 0)  # arrival order: C05 first
    assert (a01.frames, a01.index) == (1, 1)
    assert c05.last_seen > a01.last_seen

    r2 = asm.plate_map("r2")
    assert (r2.rows, r2.cols, r2.declared) == (2, 3, False)  # no plate declared: 6 wells
    everything = asm.plate_map()
    assert (everything.rows, everything.cols) == (16, 24)
    assert everything.at(0, 0).frames == 2  # A01 in both runs
    assert asm.well_index("A01") == 1 and asm.well_index("Z99") is None

    asm.clear("r1")
    assert asm.plate_map("r1") is None
    assert asm.plate_map().at(2, 4) is None and asm.plate_map().at(0, 0).frames == 1
    asm.clear()
    assert asm.plate_map() is None


def test_well_at_reads_the_slider_or_the_layers_own_well():
    asm = PlateAssembler(prefault=False)
    put(asm, plane(1), well="B02", site=1, channel="DAPI")
    put(asm, plane(1), well="D04", site=1, channel="DAPI")
    put(asm, plane(1), well="E05", source="each", channel="DAPI",
        meta={"modes": {"well": "layer"}})
    names = [info.name for info in asm.layers()]
    stacked, own = names[0], names[-1]
    assert asm.well_at(stacked, (1, 0, 0, 0, 0)) == "D04"
    assert asm.well_at(stacked, (0, 0, 0, 0, 0)) == "B02"
    assert asm.well_at(stacked, (7, 0, 0, 0, 0)) is None  # past the known wells
    assert asm.well_at(own, (0, 0, 0, 0, 0)) == "E05"
    assert asm.well_at("no such layer", (0, 0, 0, 0, 0)) is None
    assert asm.plate_map().at(4, 4).index is None  # E05 is a layer, not a slider position
