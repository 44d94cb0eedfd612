"""The plate assembler, with plain numpy: routing, growth, modes, memory cap, updates, labels."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from napari_hcs_stream.assembler import (
    DEFAULT_MODES,
    DIRTY_STEPS_CAP,
    RUN_QUIET_S,
    STACK_AXES,
    AssemblerFull,
    LayerUpdate,
    Mode,
    PlateAssembler,
    default_max_bytes,
)
from napari_hcs_stream.labels import well_name
from napari_hcs_stream.protocol import Coords, FrameHeader, FrameRef

WELL, SITE, CHANNEL, T, Z = range(5)
NAMES = {"channel_names": {"0": "DAPI", "1": "GFP", "2": "Cy5"}}


def item(well: str | None = None, site: int | None = None, channel: str | int | None = None,
         z: int | None = None, t: int | None = None, *, run: str = "r1", source: str = "out",
         kind: str = "image", dtype: str = "uint16", shape: tuple[int, ...] = (4, 4),
         rgb: bool = False, meta: dict | None = None) -> FrameHeader:
    return FrameHeader(producer="p1", seq=0, run=run, source=source, kind=kind,  # type: ignore[arg-type]
                       dtype=dtype, shape=shape, pixels=FrameRef(1),
                       coords=Coords(well, site, channel, z, t), rgb=rgb, meta=meta or {})


def put(asm: PlateAssembler, header: FrameHeader, value: object) -> np.ndarray:
    """What the receiver does: copy pixels into the destination, then commit."""
    dest = asm.destination(header)
    assert dest.shape == header.shape and dest.dtype == np.dtype(header.dtype)
    dest[...] = value
    asm.commit(header, dest)
    return dest


def by_name(updates: list[LayerUpdate]) -> dict[str, LayerUpdate]:
    return {u.name: u for u in updates}


@pytest.fixture
def asm() -> PlateAssembler:
    return PlateAssembler(max_bytes=1 << 30)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- routing ---------------------------------------------------------------------------------


def test_sparse_24_well_plate_routes_channels_to_layers_and_wells_sites_to_sliders(asm):
    wells = [well_name(r, c) for r in range(4) for c in range(6)]
    present = wells[::2]  # a sparse plate: every other well
    missing = {("A03", 2, 1), ("B01", 1, 2)}  # planes a pipeline never sent
    sent = {}
    for w in present:
        for site in (1, 2):
            for ch in range(3):
                if (w, site, ch) in missing:
                    continue
                value = 1000 * ch + 10 * present.index(w) + site
                put(asm, item(w, site, ch, meta=NAMES), value)
                sent[(w, site, ch)] = value

    updates = by_name(asm.take_updates())
    assert set(updates) == {"DAPI · out [r1]", "GFP · out [r1]", "Cy5 · out [r1]"}
    for ch, name in enumerate(["DAPI · out [r1]", "GFP · out [r1]", "Cy5 · out [r1]"]):
        u = updates[name]
        assert u.new and not u.grew and not u.removed
        assert u.kind == "image" and not u.rgb
        assert u.axis_labels == ("well", "site", "channel", "t", "z", "y", "x")
        assert u.data.shape == (12, 2, 1, 1, 1, 4, 4)
        assert u.blending == "additive"
        assert u.metadata == {"run": "r1", "source": "out", "channel": ch, "kind": "image"}
        assert u.frames == sum(1 for k in sent if k[2] == ch)
        for wi, w in enumerate(present):
            for si, site in enumerate((1, 2)):
                plane = u.data[wi, si, 0, 0, 0]
                expected = sent.get((w, site, ch), 0)  # blank where missing, never an error
                assert (plane == expected).all(), (w, site, ch)
    info = {i.name: i for i in asm.layers()}
    assert info["GFP · out [r1]"].shape == (12, 2, 1, 1, 1, 4, 4)
    assert info["GFP · out [r1]"].channel == 1


def test_indices_are_global_in_arrival_order_across_layers_and_runs(asm):
    put(asm, item("B01", source="a"), 1)
    put(asm, item("C01", source="a"), 2)
    put(asm, item("C01", source="b"), 3)
    put(asm, item("D01", source="b"), 4)
    put(asm, item("D01", run="r2"), 5)
    u = by_name(asm.take_updates())
    a, b, r2 = u["a [r1]"].data, u["b [r1]"].data, u["out [r2]"].data
    assert a.shape[WELL] == 2 and b.shape[WELL] == 3 and r2.shape[WELL] == 3
    assert (b[0] == 0).all()  # B01's slot in a layer that never got B01
    assert (a[1] == 2).all() and (b[1] == 3).all()  # C01 is index 1 everywhere
    assert (b[2] == 4).all() and (r2[2] == 5).all()
    assert asm.label_text("b [r1]", (1, 0, 0, 0, 0)) == "Well C01"
    assert asm.label_text("out [r2]", (2, 0, 0, 0, 0)) == "Well D01"


def test_items_without_components_make_a_single_plane_layer(asm):
    put(asm, item(), 7)
    (u,) = asm.take_updates()
    assert u.name == "out [r1]" and u.data.shape == (1, 1, 1, 1, 1, 4, 4)
    assert (u.data == 7).all()
    assert u.colormap == "gray" and u.blending == "translucent"
    assert asm.label_text(u.name, (0, 0, 0, 0, 0)) == ""


def test_destination_is_an_exact_writable_view_and_foreign_arrays_are_copied(asm):
    h = item("A01", dtype="float32", shape=(3, 5))
    dest = asm.destination(h)
    assert dest.shape == (3, 5) and dest.dtype == np.float32 and dest.flags.writeable
    asm.commit(h, np.full((3, 5), 2.5, np.float32))  # e.g. the receiver allocated it
    (u,) = asm.take_updates()
    assert (u.data[0, 0, 0, 0, 0] == 2.5).all()


# -- growth ----------------------------------------------------------------------------------


def test_growth_preserves_data_and_is_logarithmic_in_the_number_of_wells():
    asm = PlateAssembler(max_bytes=1 << 30)
    wells = [well_name(r, c) for r in range(32) for c in range(48)]  # a 1536-well plate
    grew_at = []
    for i, w in enumerate(wells):
        before = asm.allocations
        put(asm, item(w, shape=(2, 2)), i + 1)
        if asm.allocations != before:
            grew_at.append(i)
    # creation + one growth per doubling: 1, 2, 4, ..., 2048 -> 12 allocations, not 1536
    assert asm.allocations == len(grew_at) <= int(np.ceil(np.log2(len(wells)))) + 1
    assert grew_at == [0] + [2**k for k in range(11)]
    (u,) = asm.take_updates()
    assert u.data.shape == (1536, 1, 1, 1, 1, 2, 2)  # trimmed to use, not capacity (2048)
    assert (u.data[:, 0, 0, 0, 0, 0, 0] == np.arange(1, 1537)).all()
    assert asm.nbytes == 2048 * 2 * 2 * 2


def test_growth_and_used_extent_changes_report_grew(asm):
    put(asm, item("A01", site=1), 1)
    (u,) = asm.take_updates()
    assert u.new and not u.grew
    first = u.data

    put(asm, item("A01", site=1), 2)  # same slot, same array
    (u,) = asm.take_updates()
    assert not u.new and not u.grew and u.data is first

    put(asm, item("A02", site=1), 3)  # capacity 1 -> 2: a new array
    (u,) = asm.take_updates()
    assert u.grew and u.data.shape[WELL] == 2
    assert not np.shares_memory(u.data, first)
    assert (u.data[0] == 2).all() and (u.data[1] == 3).all()
    grown = u.data

    put(asm, item("A03", site=1), 4)  # capacity 2 -> 4
    put(asm, item("A03", site=2), 5)  # site capacity 1 -> 2
    (u,) = asm.take_updates()
    assert u.grew and u.data.shape[:2] == (3, 2)
    held = u.data

    put(asm, item("A04", site=1), 6)  # fits capacity 4: a new view of the same buffer
    (u,) = asm.take_updates()
    assert u.grew and u.data.shape[WELL] == 4
    assert np.shares_memory(u.data, held) and u.data.base is held.base
    assert (grown == u.data[:2, :1]).all()


def test_mixed_frame_sizes_pad_to_the_largest_and_write_top_left(asm):
    put(asm, item("A01", shape=(4, 4)), 1)
    put(asm, item("A02", shape=(6, 3)), 2)
    (u,) = asm.take_updates()
    assert u.data.shape == (2, 1, 1, 1, 1, 6, 4)
    a01, a02 = u.data[0, 0, 0, 0, 0], u.data[1, 0, 0, 0, 0]
    assert (a01[:4, :4] == 1).all() and (a01[4:] == 0).all()
    assert (a02[:6, :3] == 2).all() and (a02[:, 3] == 0).all()
    put(asm, item("A02", shape=(2, 2)), 9)  # a smaller item replaces a larger one: no leftovers
    (u,) = asm.take_updates()
    a02 = u.data[1, 0, 0, 0, 0]
    assert (a02[:2, :2] == 9).all() and a02.sum() == 4 * 9


def put_frame(asm: PlateAssembler, header: FrameHeader, frame: np.ndarray) -> np.ndarray:
    """The receiver's part for real pixels: whatever destination() hands out, it fills."""
    dest = asm.destination(header)
    assert dest.shape == header.shape and dest.flags.writeable
    dest[...] = frame
    asm.commit(header, dest)
    return dest


def test_downsampled_layers_keep_every_nth_pixel_at_full_resolution_scale():
    asm = PlateAssembler(max_bytes=1 << 30, downsample=2)
    rng = np.random.default_rng(0)
    a01 = rng.integers(0, 4000, (9, 10), dtype=np.uint16)  # odd rows: ceil(9 / 2) = 5
    put_frame(asm, item("A01", shape=(9, 10)), a01)
    b02 = rng.integers(0, 4000, (9, 10), dtype=np.uint16)
    handed = put_frame(asm, item("B02", shape=(9, 10)), b02)
    again = put_frame(asm, item("B02", shape=(9, 10)), b02 + 1)  # the route cache's path
    assert again is handed  # one reused full-size buffer, not an allocation per frame
    (u,) = asm.take_updates()
    assert u.data.shape == (2, 1, 1, 1, 1, 5, 5)
    assert u.scale == (1, 1, 1, 1, 1, 2, 2)
    np.testing.assert_array_equal(u.data[0, 0, 0, 0, 0], a01[::2, ::2])
    np.testing.assert_array_equal(u.data[1, 0, 0, 0, 0], (b02 + 1)[::2, ::2])
    assert asm.nbytes < 2 * 9 * 10 * 2  # a quarter of the full frames, about
    (info,) = asm.layers()
    assert info.downsample == 2 and info.shape[-2:] == (5, 5)

    rgb = rng.integers(0, 255, (7, 6, 3), dtype=np.uint8)  # colours are never subsampled
    labels = rng.integers(0, 9, (6, 6), dtype=np.int32)
    put_frame(asm, item("A01", shape=(7, 6, 3), rgb=True, dtype="uint8", source="rgb"), rgb)
    put_frame(asm, item("A01", kind="labels", dtype="int32", shape=(6, 6), source="masks",
                        meta={"downsample": 3}), labels)  # the producer's choice wins
    u = by_name(asm.take_updates())
    assert u["rgb [r1]"].scale == (1, 1, 1, 1, 1, 2, 2, 1)
    np.testing.assert_array_equal(u["rgb [r1]"].data[0, 0, 0, 0, 0], rgb[::2, ::2])
    assert u["masks [r1]"].scale == (1, 1, 1, 1, 1, 3, 3)
    np.testing.assert_array_equal(u["masks [r1]"].data[0, 0, 0, 0, 0], labels[::3, ::3])

    asm.downsample = 1  # layers keep theirs; new groups are full resolution
    put_frame(asm, item("C03", shape=(9, 10)), a01)
    put_frame(asm, item("A01", shape=(9, 10), source="full"), a01)
    u = by_name(asm.take_updates())
    assert u["out [r1]"].data.shape[-2:] == (5, 5)
    assert u["full [r1]"].scale is None and u["full [r1]"].data.shape[-2:] == (9, 10)
    assert asm.state()["downsample"] == 1


def test_bad_downsample_is_rejected_with_a_clear_message():
    asm = PlateAssembler(max_bytes=1 << 30)
    for bad in (0, 65, 2.0, True, "2"):
        with pytest.raises(ValueError, match="downsample must be a whole number from 1"):
            asm.downsample = bad  # type: ignore[assignment]
        with pytest.raises(ValueError, match=r"meta\['downsample'\] must be a whole number"):
            asm.destination(item("A01", source=f"s{bad!r}", meta={"downsample": bad}))
    with pytest.raises(ValueError, match="downsample"):
        PlateAssembler(downsample=0)
    put(asm, item("A01", meta={"downsample": 4}), 1)  # and nothing else was lost
    assert asm.layers()[0].downsample == 4


def test_dtype_rgb_and_ndim_differences_split_layers(asm):
    put(asm, item("A01", 1, 0, meta=NAMES), 1)
    put(asm, item("A02", 1, 0, dtype="uint8"), 2)
    put(asm, item("A03", 1, 0, dtype="uint8", shape=(4, 4, 3), rgb=True), 3)
    put(asm, item("A04", 1, 0, shape=(2, 4, 4)), 4)
    put(asm, item("A05", 1, 0, dtype="float32"), 5.5)
    u = by_name(asm.take_updates())
    assert set(u) == {"DAPI · out [r1]", "DAPI (uint8) · out [r1]", "DAPI (uint8 rgb) · out [r1]",
                      "DAPI (uint16 3-D) · out [r1]", "DAPI (float32) · out [r1]"}
    rgb = u["DAPI (uint8 rgb) · out [r1]"]
    assert rgb.rgb and rgb.data.shape == (3, 1, 1, 1, 1, 4, 4, 3)
    assert rgb.axis_labels == (*STACK_AXES, "y", "x") and rgb.colormap is None
    assert rgb.contrast_limits is None  # napari's rgb defaults are right
    vol = u["DAPI (uint16 3-D) · out [r1]"]
    assert vol.axis_labels == (*STACK_AXES, "plane", "y", "x")
    assert vol.data.shape == (4, 1, 1, 1, 1, 2, 4, 4) and (vol.data[3] == 4).all()
    assert u["DAPI (float32) · out [r1]"].data.dtype == np.float32
    assert len({x.colormap for x in u.values() if not x.rgb}) == 1  # one channel, one colour


def test_labels_layers(asm):
    put(asm, item("A01", source="cells"), 1)
    put(asm, item("A01", source="cells", kind="labels", dtype="int32"), 5)
    u = by_name(asm.take_updates())
    lab = u["cells labels [r1]"]
    assert lab.kind == "labels" and lab.colormap is None and lab.contrast_limits is None
    assert lab.blending == "translucent" and lab.data.dtype == np.int32
    assert (lab.data == 5).all()
    assert u["cells [r1]"].kind == "image"


def test_producer_meta_modes_stack_channels_for_that_group_only(asm):
    meta = {"modes": {"channel": "stack"}, **NAMES}
    for ch in range(3):
        put(asm, item("A01", 1, ch, source="stacked", meta=meta), ch + 1)
        put(asm, item("A01", 1, ch, source="layered", meta=NAMES), ch + 1)
    u = by_name(asm.take_updates())
    stacked = u["stacked [r1]"]
    assert stacked.data.shape == (1, 1, 3, 1, 1, 4, 4)
    assert stacked.colormap == "gray" and stacked.blending == "translucent"
    assert stacked.metadata["channel"] is None
    assert [int(stacked.data[0, 0, c, 0, 0, 0, 0]) for c in range(3)] == [1, 2, 3]
    assert asm.label_text("stacked [r1]", (0, 0, 2, 0, 0)) == "Well A01 | Site 1 | Cy5"
    assert {"DAPI · layered [r1]", "GFP · layered [r1]", "Cy5 · layered [r1]"} <= set(u)
    # later meta does not change a group that already exists
    put(asm, item("A01", 1, 0, source="layered", meta={"modes": {"channel": "stack"}}), 9)
    assert "layered [r1]" not in by_name(asm.take_updates())


def test_bad_modes_are_rejected_with_a_clear_message(asm):
    with pytest.raises(ValueError, match=r"meta\['modes'\]: unknown component 'plate'"):
        asm.destination(item("A01", meta={"modes": {"plate": "stack"}}))
    with pytest.raises(ValueError, match="must be 'stack' or 'layer', got 'slider'"):
        asm.destination(item("A01", source="x", meta={"modes": {"z": "slider"}}))
    with pytest.raises(ValueError, match="unknown component 'c'"):
        PlateAssembler(modes={"c": "layer"})
    assert put(asm, item("A01"), 1) is not None  # the assembler still works


def test_constructor_and_set_modes():
    asm = PlateAssembler(modes={"well": "layer", "channel": Mode.STACK}, max_bytes=1 << 20)
    assert asm.modes["well"] is Mode.LAYER and asm.modes["channel"] is Mode.STACK
    assert DEFAULT_MODES["channel"] is Mode.LAYER
    put(asm, item("B03", 1, 0), 1)
    put(asm, item("B04", 1, 1), 2)
    names = {u.name for u in asm.take_updates()}
    assert names == {"B03 · out [r1]", "B04 · out [r1]"}
    asm.set_modes({"well": "STACK"})  # applies to groups that appear from now on
    put(asm, item("B03", 1, 0, source="new"), 1)
    put(asm, item("B04", 1, 0, source="new"), 1)
    (u,) = asm.take_updates()
    assert u.name == "new [r1]" and u.data.shape[WELL] == 2


# -- memory cap ------------------------------------------------------------------------------


def test_memory_cap_rejects_growth_but_existing_slots_keep_working():
    plane = 64 * 64 * 2
    asm = PlateAssembler(max_bytes=5 * plane, coarsen=False)
    for i in range(5):
        put(asm, item(f"A0{i + 1}", shape=(64, 64)), i)
    # 4 wells' capacity + 1 more: doubling to 8 breaks the cap, so it grew to exactly 5
    assert asm.nbytes == 5 * plane
    with pytest.raises(AssemblerFull, match=r"memory cap of [\d.]+ MiB reached by streamed layers"):
        asm.destination(item("A06", shape=(64, 64)))
    with pytest.raises(AssemblerFull) as info:
        asm.destination(item("A06", shape=(64, 64)))
    assert isinstance(info.value, ValueError)
    assert "clear a run, raise the cap, or lower the resolution" in str(info.value)
    with pytest.raises(AssemblerFull):
        asm.destination(item("A01", source="other", shape=(64, 64)))  # a new layer too
    put(asm, item("A02", shape=(64, 64)), 42)  # an existing slot still works
    (u,) = asm.take_updates()
    assert (u.data[1] == 42).all() and u.data.shape[WELL] == 5
    asm.max_bytes = 100 * plane  # the widget raised the cap
    put(asm, item("A06", shape=(64, 64)), 6)
    assert asm.nbytes == 10 * plane
    assert asm.coarsenings == 0 and asm.state()["lowered"] == []


def test_at_the_memory_cap_a_run_halves_its_resolution_and_keeps_streaming():
    plane = 64 * 64 * 2
    asm = PlateAssembler(max_bytes=6 * plane)
    rng = np.random.default_rng(1)
    other = rng.integers(0, 4000, (64, 64), dtype=np.uint16)
    put(asm, item("A01", shape=(64, 64), run="old"), other)  # another run: left as it is
    sent: dict[tuple[str, int], np.ndarray] = {}
    wells = [well_name(r, c) for r in range(8) for c in range(12)]
    for i, well in enumerate(wells[:10]):
        for channel in (0, 1):  # two layers in the group: both are lowered together
            frame = rng.integers(0, 4000, (64, 64), dtype=np.uint16)
            sent[(well, channel)] = frame
            put(asm, item(well, channel=channel, shape=(64, 64), meta=NAMES if i == 0 else None),
                frame)
        assert asm.nbytes <= 6 * plane  # never past the cap, so never a rejected frame
    assert asm.coarsenings >= 2  # 20 planes in under 5 of memory: 1/4 at least
    u = by_name(asm.take_updates())
    layer = u["DAPI · out [r1]"]
    step = int(layer.scale[-1])
    assert step >= 4 and layer.scale == (1, 1, 1, 1, 1, step, step)
    assert layer.data.shape == (10, 1, 1, 1, 1, 64 // step, 64 // step)
    for (well, channel), frame in sent.items():  # the first wells too, at the new resolution
        data = u[("DAPI", "GFP")[channel] + " · out [r1]"].data
        np.testing.assert_array_equal(data[wells.index(well), 0, 0, 0, 0], frame[::step, ::step])
    assert u["out [old]"].scale is None and u["out [old]"].data.shape[-2:] == (64, 64)
    np.testing.assert_array_equal(u["out [old]"].data[0, 0, 0, 0, 0], other)
    assert {i.name: i.downsample for i in asm.layers()} == {
        "out [old]": 1, "DAPI · out [r1]": step, "GFP · out [r1]": step}
    assert asm.state()["lowered"] == ["r1"] and asm.state()["coarsen"] is True

    # A lowered layer keeps taking frames; a frame already announced updates in place.
    frame = rng.integers(0, 4000, (64, 64), dtype=np.uint16)
    put(asm, item("A01", channel=0, shape=(64, 64)), frame)
    (again,) = asm.take_updates()
    assert not again.grew
    np.testing.assert_array_equal(again.data[0, 0, 0, 0, 0], frame[::step, ::step])


def test_coarsening_stops_at_the_coarsest_step_and_then_rejects():
    asm = PlateAssembler(max_bytes=64 * 64 * 2)  # one full plane
    labels = np.arange(64 * 64, dtype=np.int32).reshape(64, 64)
    wells = [well_name(r, c) for r in range(32) for c in range(48)]
    with pytest.raises(AssemblerFull, match="memory cap"):
        for well in wells:  # 1/16 of a 64x64 int32 plane is 4x4: 128 wells in the cap
            put(asm, item(well, kind="labels", dtype="int32", shape=(64, 64)), labels)
    (u,) = asm.take_updates()
    assert u.scale == (1, 1, 1, 1, 1, 16, 16) and asm.coarsenings == 4
    assert u.data.shape[WELL] >= 100
    np.testing.assert_array_equal(u.data[0, 0, 0, 0, 0], labels[::16, ::16])  # labels, exactly


def test_default_cap_is_half_the_physical_memory():
    assert default_max_bytes() > 0
    assert PlateAssembler().max_bytes == default_max_bytes()


# -- torn copies and updates -----------------------------------------------------------------


def test_discard_blanks_the_slot_and_does_not_count(asm):
    put(asm, item("A01"), 5)
    put(asm, item("A02"), 6)
    asm.take_updates()
    dest = asm.destination(item("A01"))
    dest[...] = 999  # garbage from a torn shared-memory read
    asm.discard(item("A01"), dest)
    (u,) = asm.take_updates()
    assert (u.data[0] == 0).all() and (u.data[1] == 6).all()
    assert u.frames == 2 and u.dirty_steps == {(0, 0, 0, 0, 0)}


def test_updates_coalesce_and_carry_new_grew_removed(asm):
    assert asm.take_updates() == []
    for _ in range(50):
        put(asm, item("A01", 1, 0), 1)
        put(asm, item("A01", 1, 1), 1)
    updates = asm.take_updates()
    assert len(updates) == 2 and all(u.new for u in updates)
    assert all(u.frames == 50 for u in updates)
    assert asm.take_updates() == []  # nothing new, nothing to do

    asm.destination(item("A02", 1, 0))  # a destination alone is not shown yet
    assert asm.take_updates() == []

    asm.clear()
    removed = asm.take_updates()
    assert {u.name for u in removed} == {"Channel 0 · out [r1]", "Channel 1 · out [r1]"}
    assert all(u.removed and u.data is None for u in removed)
    assert asm.take_updates() == []


def test_dirty_steps_are_capped(asm):
    for i in range(DIRTY_STEPS_CAP + 1):
        put(asm, item("A01", z=i, shape=(1, 1)), 1)
    (u,) = asm.take_updates()
    assert u.dirty_steps is None  # "many": refresh whatever is shown
    put(asm, item("A01", z=3, shape=(1, 1)), 1)
    put(asm, item("A01", z=4, shape=(1, 1)), 1)
    (u,) = asm.take_updates()
    assert u.dirty_steps == {(0, 0, 0, 0, 3), (0, 0, 0, 0, 4)}


def test_newest_and_previous_newest_let_the_ui_follow(asm):
    put(asm, item("A01", 1), 1)
    (u,) = asm.take_updates()
    assert u.newest == (0, 0, 0, 0, 0) and u.previous_newest is None
    put(asm, item("A02", 1), 1)
    put(asm, item("A02", 2), 1)
    (u,) = asm.take_updates()
    assert u.previous_newest == (0, 0, 0, 0, 0) and u.newest == (1, 1, 0, 0, 0)
    put(asm, item("A01", 1), 1)  # a re-sent earlier plane becomes the newest
    (u,) = asm.take_updates()
    assert u.previous_newest == (1, 1, 0, 0, 0) and u.newest == (0, 0, 0, 0, 0)


def test_clear_one_run_leaves_the_other(asm):
    put(asm, item("A01", meta={"plate": {"rows": 8, "cols": 12}}), 1)
    put(asm, item("B01", run="r2"), 2)
    asm.take_updates()
    held = asm.nbytes
    state = json.loads(json.dumps(asm.state()))  # JSON-able for the control reply
    assert state["runs"] == ["r1", "r2"] and state["frames"] == 2 and state["nbytes"] == held
    assert state["plates"] == {"r1": {"rows": 8, "cols": 12}}
    assert [layer["name"] for layer in state["layers"]] == ["out [r1]", "out [r2]"]
    assert state["layers"][1]["shape"] == [2, 1, 1, 1, 1, 4, 4]

    assert asm.clear("r1") == 1
    (u,) = asm.take_updates()
    assert u.removed and u.name == "out [r1]"
    state = asm.state()
    assert state["runs"] == ["r2"] and state["frames"] == 1 and state["plates"] == {}
    assert asm.nbytes < held
    put(asm, item("B01", run="r2"), 3)  # the other run keeps streaming, same indices
    put(asm, item("C01", run="r1"), 4)  # the cleared run can come back
    u = by_name(asm.take_updates())
    assert u["out [r1]"].new and u["out [r1]"].data.shape[WELL] == 3  # well indices kept
    assert (u["out [r2]"].data[1] == 3).all()
    assert asm.clear("nope") == 0

    assert asm.clear() == 2
    assert asm.nbytes == 0 and asm.state()["layers"] == []
    put(asm, item("C01"), 5)  # index maps start again after clearing everything
    u = by_name(asm.take_updates())
    assert u["out [r1]"].removed is False and u["out [r1]"].data.shape[WELL] == 1


def test_keep_runs_drops_the_oldest_quiet_runs_and_never_a_streaming_one():
    clock = FakeClock()
    asm = PlateAssembler(max_bytes=1 << 30, clock=clock, keep_runs=2)
    for run in ("r1", "r2"):
        put(asm, item("A01", run=run), 1)
        put(asm, item("A01", channel=1, run=run, source="nuclei"), 1)  # a second group
    asm.take_updates()
    clock.now += 1.0
    put(asm, item("A01", run="r3"), 3)
    held = asm.nbytes
    assert [u.name for u in asm.take_updates()] == ["out [r3]"]  # r1 still streams: kept
    assert asm.state()["runs"] == ["r1", "r2", "r3"]

    clock.now += RUN_QUIET_S - 1.0 + 1e-6  # r1 quiet for RUN_QUIET_S now
    put(asm, item("B01", run="r3"), 3)
    updates = asm.take_updates()
    assert [(u.name, u.removed) for u in updates] == [  # removals first
        ("out [r1]", True), ("Channel 1 · nuclei [r1]", True), ("out [r3]", False)]
    state = asm.state()
    assert state["runs"] == ["r2", "r3"] and state["runs_dropped"] == 1
    assert state["keep_runs"] == 2 and asm.nbytes == sum(i.nbytes for i in asm.layers()) < held
    assert asm.plate_map("r1") is None and asm.plate_map("r2") is not None

    put(asm, item("C01", run="r1"), 5)  # a dropped run that sends again is the newest run,
    updates = asm.take_updates()  # and r2, quiet, is now the oldest of three
    assert [(u.name, u.removed, u.new) for u in updates] == [
        ("out [r2]", True, False), ("Channel 1 · nuclei [r2]", True, False),
        ("out [r1]", False, True)]
    assert asm.state()["runs"] == ["r3", "r1"] and asm.runs_dropped == 2


def test_keep_runs_applies_when_set_and_zero_keeps_everything():
    clock = FakeClock()
    asm = PlateAssembler(max_bytes=1 << 30, clock=clock)
    assert asm.keep_runs == 0
    for run in ("r1", "r2", "r3"):
        put(asm, item("A01", run=run), 1)
    asm.take_updates()
    clock.now += 60.0
    asm.take_updates()
    assert asm.state()["runs"] == ["r1", "r2", "r3"]  # 0: every run stays

    asm.keep_runs = 1  # takes effect at once: the tick that follows removes the layers
    assert asm.state()["runs"] == ["r3"] and asm.runs_dropped == 2
    assert sorted(u.name for u in asm.take_updates()) == ["out [r1]", "out [r2]"]
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="keep_runs must be a whole number"):
            asm.keep_runs = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match="keep_runs"):
        PlateAssembler(keep_runs=-2)
    assert asm.keep_runs == 1


def test_commit_after_clear_is_ignored(asm):
    h = item("A01")
    dest = asm.destination(h)
    asm.clear()
    dest[...] = 1
    asm.commit(h, dest)
    asm.discard(h, dest)
    assert asm.take_updates() == [] and asm.layers() == []


# -- labels and display ----------------------------------------------------------------------


def test_label_text_at_several_positions(asm):
    for w in ("A01", "B03"):
        for site in (1, 2):
            for z in (3, 4):
                put(asm, item(w, site, 0, z=z, meta=NAMES), 1)
    put(asm, item("C05", source="nosite", meta=NAMES), 1)
    name = "DAPI · out [r1]"
    assert asm.label_text(name, (1, 1, 0, 0, 1)) == "Well B03 | Site 2 | DAPI | Z 4"
    assert asm.label_text(name, (0, 0, 0, 0, 0)) == "Well A01 | Site 1 | DAPI | Z 3"
    assert asm.label_text(name, (0, 0, 0, 0, 0, 17, 3)) == "Well A01 | Site 1 | DAPI | Z 3"
    assert asm.label_text(name, (2, 0, 0, 0, 0)) == "Well C05 | Site 1 | DAPI | Z 3"
    assert asm.label_text(name, (9, 5, 0, 0, 7)) == "DAPI"  # past the known values
    assert asm.label_text(name, (1,)) == "Well B03 | DAPI"
    # no site values, a single z: neither shown
    assert asm.label_text("nosite [r1]", (2, 0, 0, 0, 0)) == "Well C05"
    assert asm.label_text("gone", (0, 0, 0, 0, 0)) == ""


def test_label_text_for_stacked_t_and_layered_z():
    asm = PlateAssembler(modes={"z": "layer"}, max_bytes=1 << 20)
    for t in range(3):
        put(asm, item("A01", channel="GFP", z=2, t=t), 1)
    assert asm.label_text("GFP z 2 · out [r1]", (0, 0, 0, 2, 0)) == "Well A01 | GFP | T 2 | Z 2"


def test_colormaps_from_meta_names_and_cycle(asm):
    meta = {"channel_names": {"0": "Hoechst 33342", "1": "Alexa 488", "2": "mCherry",
                              "3": "Cy5", "4": "brightfield", "5": "mito", "6": "actin"},
            "colormaps": {"2": "I Orange"}}
    for ch in range(7):
        put(asm, item("A01", channel=ch, meta=meta), 1)
    put(asm, item("A01", channel="TRITC", source="b"), 1)
    put(asm, item("A01", channel="640 nm", source="b"), 1)
    cmaps = {u.name: u.colormap for u in asm.take_updates()}
    assert cmaps == {
        "Hoechst 33342 · out [r1]": "blue", "Alexa 488 · out [r1]": "green",
        "mCherry · out [r1]": "I Orange", "Cy5 · out [r1]": "red", "brightfield · out [r1]": "gray",
        "mito · out [r1]": "cyan", "actin · out [r1]": "magenta",
        "TRITC · b [r1]": "magenta", "640 nm · b [r1]": "red",
    }


def test_contrast_from_robust_percentiles_refined_at_most_once_per_interval():
    clock = FakeClock()
    asm = PlateAssembler(max_bytes=1 << 30, clock=clock, contrast_interval=1.0)
    rng = np.random.default_rng(0)
    first = rng.integers(100, 1000, size=(64, 64), dtype=np.uint16)
    put(asm, item("A01", shape=(64, 64)), first)
    (u,) = asm.take_updates()
    expected = tuple(np.percentile(first, (0.5, 99.5)))  # 4096 px: the sample is every pixel
    assert u.contrast_limits == pytest.approx(expected)

    bright = rng.integers(5000, 6000, size=(64, 64), dtype=np.uint16)
    put(asm, item("A02", shape=(64, 64)), bright)  # still among the first frames: sampled
    (u,) = asm.take_updates()
    assert u.contrast_limits is not None and u.contrast_limits[1] > 5000

    for _ in range(3):
        put(asm, item("A03", shape=(64, 64)), bright)  # 3rd frame sampled, then throttled
    asm.take_updates()
    put(asm, item("A04", shape=(64, 64)), 60000)
    clock.now += 0.5
    put(asm, item("A04", shape=(64, 64)), 60000)
    (u,) = asm.take_updates()
    assert u.contrast_limits is None  # no new estimate: keep whatever the layer shows
    clock.now += 0.6
    put(asm, item("A04", shape=(64, 64)), 60000)
    (u,) = asm.take_updates()
    assert u.contrast_limits is not None and u.contrast_limits[1] == pytest.approx(60000)


def test_contrast_of_flat_nan_and_bool_images(asm):
    put(asm, item("A01", source="flat"), 7)
    nan = np.full((4, 4), np.nan, np.float32)
    nan[0, 0] = 2.0
    put(asm, item("A01", source="nan", dtype="float32"), nan)
    put(asm, item("A01", source="allnan", dtype="float32"), np.nan)
    put(asm, item("A01", source="mask", dtype="bool"), True)
    u = by_name(asm.take_updates())
    assert u["flat [r1]"].contrast_limits == (7.0, 8.0)  # napari needs lo < hi
    assert u["nan [r1]"].contrast_limits == (2.0, 3.0)
    assert u["allnan [r1]"].contrast_limits is None
    assert u["mask [r1]"].contrast_limits == (1.0, 2.0)


# -- threads ---------------------------------------------------------------------------------


def test_writer_thread_and_main_thread_updates_concurrently():
    asm = PlateAssembler(max_bytes=1 << 30)
    wells = [well_name(r, c) for r in range(8) for c in range(12)]
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for round_ in range(3):
                for i, w in enumerate(wells):
                    for ch in range(2):
                        h = item(w, 1 + round_ % 2, ch, shape=(8, 8))
                        dest = asm.destination(h)
                        dest[...] = i + 1
                        if (i + ch) % 17 == 0 and round_ == 2:
                            asm.discard(h, dest)
                        else:
                            asm.commit(h, dest)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    shown: dict[str, np.ndarray] = {}

    def apply(u: LayerUpdate) -> None:  # what the render tick does with the arrays
        assert u.new == (u.name not in shown)
        assert u.data is not None and u.data.shape[-2:] == (8, 8)
        if u.new or u.grew:
            shown[u.name] = u.data

    while not done.is_set():
        for u in asm.take_updates():
            apply(u)
        asm.label_text("Channel 0 · out [r1]", (5, 0, 0, 0, 0))
        asm.state()
    thread.join()
    assert not errors, errors
    for u in asm.take_updates():
        apply(u)
    assert set(shown) == {"Channel 0 · out [r1]", "Channel 1 · out [r1]"}
    for ch, name in enumerate(["Channel 0 · out [r1]", "Channel 1 · out [r1]"]):
        data = shown[name]
        assert data.shape == (96, 2, 1, 1, 1, 8, 8)
        for i in range(96):
            site1 = 0 if (i + ch) % 17 == 0 else i + 1  # round 2 (site 1) discarded these
            assert (data[i, 0] == site1).all() and (data[i, 1] == i + 1).all()


def test_a_view_handed_out_before_a_growth_is_still_committed():
    """A second writer (or a late commit) may hold a view into the stack a growth replaced."""
    asm = PlateAssembler(max_bytes=1 << 20)
    early = item("A01")
    stale = asm.destination(early)
    put(asm, item("A02"), 2)  # grows the well axis: `stale` now points into the old stack
    stale[...] = 1
    asm.commit(early, stale)
    (u,) = asm.take_updates()
    assert (u.data[0] == 1).all() and (u.data[1] == 2).all()


def test_sparse_growth_copies_every_written_slot():
    asm = PlateAssembler(max_bytes=1 << 24)
    wells = [well_name(0, c) for c in range(12)]
    for w in wells:  # another layer registers the well indices 0..11
        put(asm, item(w, source="dense", shape=(1, 1)), 1)
    written = {w: i + 10 for i, w in enumerate(wells) if i % 3 == 1}
    for w, value in written.items():  # a sparse layer: indices 1, 4, 7, 10, growing each time
        put(asm, item(w, source="sparse"), value)
    u = by_name(asm.take_updates())["sparse [r1]"]
    assert u.data.shape[WELL] == 11
    for i, w in enumerate(wells[:11]):
        assert (u.data[i] == written.get(w, 0)).all(), w


def test_generated_run_ids_show_as_name_and_time():
    from napari_hcs_stream.assembler import run_label

    assert run_label("demo-20261125-173422-2810ed") == "demo 17:34:22"
    assert run_label("run-20261125-090501-ab12") == "run 09:05:01"
    assert run_label("plate-7") == "plate-7"  # a user's own id is shown as given
    assert run_label("x-2026-1-2-ab") == "x-2026-1-2-ab"


# -- the steady state: repeated items skip routing, and nothing they skip can go stale ----------
def test_a_repeated_item_is_routed_once_and_lands_in_the_same_slot(asm: PlateAssembler) -> None:
    first = put(asm, item("A01", z=3), 1)
    assert len(asm._routes) == 1
    again = put(asm, item("A01", z=3), 2)
    assert again.base is first.base and np.shares_memory(first, again)
    (update,) = asm.take_updates()
    assert update.data[0, 0, 0, 0, 0].max() == 2 and update.frames == 2  # z: arrival order


def test_a_cached_route_survives_item_growth_and_a_smaller_item_is_padded(
        asm: PlateAssembler) -> None:
    put(asm, item("A01", z=0), 1)
    put(asm, item("A01", z=0), 2)  # cached now
    put(asm, item("A01", z=1, shape=(6, 6)), 9)  # the items grow: a new stack
    dest = put(asm, item("A01", z=0), 3)
    assert dest.shape == (4, 4)
    (update,) = asm.take_updates()
    plane = np.asarray(update.data)[0, 0, 0, 0, 0]
    assert plane.shape == (6, 6) and (plane[:4, :4] == 3).all() and (plane[4:, :] == 0).all()


def test_cached_routes_do_not_outlive_a_clear(asm: PlateAssembler) -> None:
    put(asm, item("A01", z=2, run="r1"), 1)
    put(asm, item("A01", z=2, run="r1"), 1)
    asm.take_updates()  # announced: its clear is reported
    asm.clear("r1")
    dest = put(asm, item("A01", z=2, run="r1"), 5)  # the same item, a new layer
    (removed, update) = asm.take_updates()
    assert removed.removed and update.new and np.asarray(update.data).max() == 5
    assert update.frames == 1 and dest.base is not None
    asm.clear()
    assert not asm._routes


def test_items_with_meta_are_routed_in_full(asm: PlateAssembler) -> None:
    put(asm, item("A01", channel=0, meta=NAMES), 1)
    put(asm, item("A01", channel=0, meta=NAMES), 2)
    assert not asm._routes  # meta may carry modes, names, a plate: never skipped
    put(asm, item("A01", channel=0), 3)
    assert len(asm._routes) == 1


def test_commit_of_another_array_or_header_still_lands(asm: PlateAssembler) -> None:
    header = item("B02", site=1)
    asm.destination(header)
    elsewhere = np.full((4, 4), 7, np.uint16)
    asm.commit(item("B02", site=1), elsewhere)  # an equal header, a different object
    (update,) = asm.take_updates()
    assert np.asarray(update.data).max() == 7 and update.frames == 1


def test_commit_for_another_item_lands_in_that_items_slot(asm: PlateAssembler) -> None:
    put(asm, item("B03", site=2), 1)
    asm.destination(item("B02", site=1))  # handed out, then another item is committed
    asm.commit(item("B03", site=2), np.full((4, 4), 7, np.uint16))
    data = np.asarray(asm.take_updates()[0].data)
    b03 = data[asm._index["well"]["B03"], asm._index["site"][2], 0, 0, 0]
    b02 = data[asm._index["well"]["B02"], asm._index["site"][1], 0, 0, 0]
    assert (b03 == 7).all() and (b02 == 0).all()


BIG = (256, 512)  # 256 KiB per uint16 frame: stacks this size may grow in place


def _stack(asm: PlateAssembler) -> np.ndarray:
    (layer,) = asm._layers.values()
    return layer.stack


def _wells(n: int) -> list[str]:
    return [well_name(i // 12, i % 12) for i in range(n)]


def test_more_wells_grow_the_same_memory_without_copying(asm):
    """Along the first (well) axis a C-ordered stack keeps every byte where it was."""
    first = None
    for i, well in enumerate(_wells(9)):
        put(asm, item(well, site=1, shape=BIG), i + 1)
        first = _stack(asm) if first is None else first
    stack = _stack(asm)
    assert stack.shape[WELL] == 16 and asm.allocations == 5  # 1 -> 2 -> 4 -> 8 -> 16
    assert asm.grown_in_place == 4
    assert np.shares_memory(stack, first) and stack.ctypes.data == first.ctypes.data
    for i in range(9):
        assert (stack[i, 0] == i + 1).all()
    assert not stack[9:].any()  # capacity not yet written is blank


def test_growth_along_other_axes_or_of_the_item_still_copies(asm):
    put(asm, item("A01", site=1, shape=BIG), 1)
    before = _stack(asm)
    put(asm, item("A01", site=2, shape=BIG), 2)  # the site axis: the layout changes
    after = _stack(asm)
    assert asm.grown_in_place == 0 and not np.shares_memory(before, after)
    assert (after[0, 0] == 1).all() and (after[0, 1] == 2).all()
    put(asm, item("A02", site=1, shape=(300, 512)), 3)  # a larger item: padded, copied
    padded = _stack(asm)
    assert padded.shape[-2:] == (300, 512) and not np.shares_memory(after, padded)
    assert (padded[0, 0, 0, 0, 0, :256] == 1).all() and not padded[0, 0, 0, 0, 0, 256:].any()
    assert (padded[1, 0, 0, 0, 0] == 3).all()


def test_without_reserved_address_space_stacks_are_plain_and_copied(asm, monkeypatch):
    from napari_hcs_stream import _stackmem

    monkeypatch.setattr(_stackmem, "_reserve", lambda nbytes: None)
    for i, well in enumerate(_wells(5)):
        put(asm, item(well, site=1, shape=BIG), i + 1)
    stack = _stack(asm)
    assert asm.grown_in_place == 0 and _stackmem.reserved(stack) == 0
    assert [int(stack[i, 0, 0, 0, 0, 0, 0]) for i in range(5)] == [1, 2, 3, 4, 5]


def test_growth_past_the_reservation_copies_after_the_cap_is_raised():
    from napari_hcs_stream import _stackmem

    frame = 256 * 512 * 2
    asm = PlateAssembler(max_bytes=4 * frame)  # reserves room for 4 wells
    for i, well in enumerate(_wells(4)):
        put(asm, item(well, site=1, shape=BIG), i + 1)
    small = _stack(asm)
    assert _stackmem.reserved(small) == 4 * frame and asm.grown_in_place == 2
    asm.max_bytes = 64 * frame
    put(asm, item("A05", site=1, shape=BIG), 5)  # capacity 8 does not fit 4 wells' room
    big = _stack(asm)
    assert not np.shares_memory(small, big) and big.shape[WELL] == 8
    assert [int(big[i, 0, 0, 0, 0, 0, 0]) for i in range(5)] == [1, 2, 3, 4, 5]
    put(asm, item("A06", site=1, shape=BIG), 6)  # and the new stack grows in place again
    assert np.shares_memory(_stack(asm), big)


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="Linux /proc")
def test_reserved_address_space_is_not_memory():
    from napari_hcs_stream import _stackmem

    asm = PlateAssembler(max_bytes=64 << 30)  # 64 GiB of address space per stack
    before = _rss()
    put(asm, item("A01", site=1, shape=BIG), 1)
    assert _stackmem.reserved(_stack(asm)) == 64 << 30
    assert _rss() - before < 32 << 20  # the frame and the process's own noise, not 64 GiB


def test_a_time_lapse_copies_once_then_grows_along_time_in_place(asm):
    """Every well's first timepoint, then the next ones: time becomes the outermost axis."""
    from napari_hcs_stream import _stackmem

    wells = _wells(4)
    for i, well in enumerate(wells):  # t = 0: the wells grow in place
        put(asm, item(well, site=1, t=0, shape=BIG), 100 + i)
    assert asm.grown_in_place == 2  # 1 -> 2 -> 4 wells
    before = _stack(asm)
    put(asm, item("A01", site=1, t=1, shape=BIG), 200)  # time 1 -> 2: one copy, new layout
    relaid = _stack(asm)
    assert not np.shares_memory(before, relaid) and asm.grown_in_place == 2
    assert relaid.strides[T] > relaid.strides[WELL]  # time is now outermost in memory
    assert _stackmem.memory(relaid).flags.c_contiguous
    for t in range(1, 9):
        for i, well in enumerate(wells):
            put(asm, item(well, site=1, t=t, shape=BIG), 100 * (t + 1) + i)
    stack = _stack(asm)
    assert stack.shape[T] == 16 and asm.grown_in_place == 2 + 3  # 2 -> 4 -> 8 -> 16 in place
    assert np.shares_memory(stack, relaid)
    for t in range(9):
        for i in range(4):
            assert (stack[i, 0, 0, t, 0] == 100 * (t + 1) + i).all()
    # the steady state still hands out views whose base is the layer's memory (no copy back)
    (layer,) = asm._layers.values()
    dest = asm.destination(item("A02", site=1, t=3, shape=BIG))
    assert dest.base is layer.memory and dest.flags.c_contiguous
    asm.commit(item("A02", site=1, t=3, shape=BIG), dest)


@pytest.mark.parametrize(("outer", "item_shape", "rgb"), [
    (0, (256, 512), False),  # wells outermost, as a stack starts
    (3, (255, 511), False),  # time outermost (a time-lapse), odd sizes round up
    (0, (128, 170, 3), True),  # colours are kept
])
def test_lowering_a_stack_moves_its_items_within_its_own_memory(outer, item_shape, rgb):
    from napari_hcs_stream import _stackmem
    from napari_hcs_stream.assembler import _every, _reduced

    lead = (6, 2, 1, 3, 1)
    old = _stackmem.zeros(lead + item_shape, np.uint16, 1 << 30, outer)
    rng = np.random.default_rng(outer)
    slots = {(w, s, 0, t, 0) for w in range(5) for s in range(2) for t in range(3)
             if (w + s + t) % 3}  # sparse, and the first item is not written
    items = {}
    for slot in slots:
        items[slot] = rng.integers(1, 60000, item_shape, dtype=np.uint16)
        old[slot] = items[slot]
    keep = _every(2, len(item_shape), rgb)
    shape = lead + _reduced(item_shape, rgb, 2)
    new = _stackmem.shrink_in_place(old, shape, outer, keep, slots)
    assert new is not None and np.shares_memory(new, old) and new.shape == shape
    assert new.ctypes.data == _stackmem.memory(old).ctypes.data  # the same memory, from its start
    for slot in np.ndindex(*lead):
        if slot in items:
            np.testing.assert_array_equal(new[slot], items[slot][keep])
        else:
            assert not new[slot].any(), slot  # blank, though other items' bytes were there
    mm = _stackmem.memory(new).base
    past = np.frombuffer(mm, np.uint8, old.nbytes - new.nbytes, new.nbytes)
    assert not past.any()  # given back: blank for a growth in place along the outer axis
    bigger = list(shape)
    bigger[outer] *= 2
    grown = _stackmem.grow_in_place(new, tuple(bigger), outer)
    fresh = (slice(None),) * outer + (slice(lead[outer], None),)
    assert grown is not None and not grown[fresh].any()
    assert _stackmem.shrink_in_place(np.zeros(lead + item_shape, np.uint16), shape, 0, keep,
                                     slots) is None  # a plain array: the caller copies


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="Linux /proc")
def test_lowering_a_run_at_the_cap_gives_its_memory_back():
    frame = 256 * 512 * 2
    asm = PlateAssembler(max_bytes=48 * frame, prefault=False)
    for i, well in enumerate(_wells(48)):
        put(asm, item(well, shape=BIG), i + 1)
    assert asm.coarsenings == 0
    before = _rss()
    put(asm, item("E01", shape=BIG), 49)  # past the cap: 49 wells at a quarter of the size
    assert asm.coarsenings == 1 and _stack(asm).shape[-2:] == (128, 256)
    assert before - _rss() > 20 * frame  # about 36 frames' worth is freed
    assert [int(_stack(asm)[i, 0, 0, 0, 0, 5, 5]) for i in (0, 47, 48)] == [1, 48, 49]


def test_any_arrival_order_keeps_every_frame_where_it_belongs():
    """Random arrival orders over wells, sites, time and z, with frames big enough for the
    reserved (in-place and relaid-out) stacks: every slot holds its latest frame."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    coords = st.tuples(st.integers(0, 5), st.integers(1, 3), st.integers(0, 4),
                       st.integers(0, 3))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(coords, min_size=1, max_size=24))
    def check(order: list[tuple[int, int, int, int]]) -> None:
        asm = PlateAssembler(max_bytes=1 << 30, prefault=False)
        latest: dict[tuple[int, int, int, int], int] = {}
        for n, (w, site, t, z) in enumerate(order, start=1):
            put(asm, item(_wells(6)[w], site=site, t=t, z=z, shape=BIG), n)
            latest[(w, site, t, z)] = n
        for (w, site, t, z), value in latest.items():
            found = asm._locate(item(_wells(6)[w], site=site, t=t, z=z, shape=BIG))
            assert found is not None
            layer, idx = found
            assert (layer.stack[idx] == value).all()
            assert (layer.trimmed()[idx] == value).all()
        (layer,) = asm._layers.values()
        written = {asm._locate(item(_wells(6)[w], site=s, t=t, z=z, shape=BIG))[1]
                   for w, s, t, z in latest}
        blank = [i for i in np.ndindex(*layer.stack.shape[:5]) if i not in written]
        assert all(not layer.stack[i].any() for i in blank[:50])

    check()
