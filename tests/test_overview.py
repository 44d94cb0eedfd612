"""The plate overview: the tiling (plain numpy) and its napari layers (a real viewer)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from _frames import plane, put
from napari_hcs_stream._qt._overview import REFRESH_MS, SUFFIX, PlateOverview
from napari_hcs_stream._qt.overlay import OVERLAY_KEY, DimsLabelOverlay
from napari_hcs_stream._qt.render import RenderTick
from napari_hcs_stream.assembler import PlateAssembler
from napari_hcs_stream.labels import parse_well
from napari_hcs_stream.overview import MAX_SIDE, Tiling, fill_tiles, tiling


# -- the tiling ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "cols", "side", "step", "tile"), [
    (8, 12, 512, 2, (256, 256)),  # 96 wells of 512x512: 3094 x 2062
    (4, 6, 32, 1, (32, 32)),  # small planes are never enlarged
    (16, 24, 2048, 13, (158, 158)),  # 384 wells of 2048x2048
    (32, 48, 2048, 25, (82, 82)),  # 1536 wells
    (2, 3, 5000, 4, (1250, 1250)),
])
def test_tiling_is_the_finest_that_fits(rows, cols, side, step, tile):
    layout = tiling(rows, cols, (side, side))
    assert (layout.step, layout.tile) == (step, tile)
    assert max(layout.shape) <= MAX_SIDE
    assert layout.gap == max(2, -(-max(tile) // 32))  # visible when the plate fits the canvas
    if step > 1:  # one step finer would not fit
        finer = Tiling(rows, cols, step - 1, (-(-side // (step - 1)),) * 2)
        assert max(finer.shape) > MAX_SIDE


def test_tiling_keeps_the_aspect_of_non_square_planes():
    layout = tiling(8, 12, (300, 1000))
    assert layout.tile == (-(-300 // layout.step), -(-1000 // layout.step))
    assert layout.shape[1] <= MAX_SIDE


@pytest.mark.parametrize(("args", "message"), [
    ((0, 12, (8, 8)), "at least one row"),
    ((8, 12, (0, 8)), "at least one pixel"),
    ((8, 2000, (8, 8)), "does not fit"),
])
def test_tiling_rejects_what_cannot_be_laid_out(args, message):
    with pytest.raises(ValueError, match=message):
        tiling(*args)


def test_cell_at_finds_each_tile_and_nothing_in_the_gaps():
    layout = Tiling(rows=3, cols=4, step=1, tile=(10, 20), gap=2)
    assert layout.shape == (34, 86)
    for row in range(3):
        for col in range(4):
            y, x = layout.origin(row, col)
            assert layout.cell_at(y, x) == (row, col)
            assert layout.cell_at(y + 9, x + 19) == (row, col)
            assert layout.cell_at(y + 9.4, x + 19.4) == (row, col)  # still inside the pixel
    assert layout.cell_at(10, 5) is None  # the gap below row 0
    assert layout.cell_at(5, 20) is None  # the gap right of column 0
    for y, x in ((-1, 0), (0, -1), (34, 0), (0, 86), (math.nan, 0), (0, math.inf)):
        assert layout.cell_at(y, x) is None


def test_fill_tiles_samples_each_well_into_its_tile():
    stack = np.zeros((3, 2, 1, 1, 1, 8, 6), np.uint16)  # well, site, channel, t, z, y, x
    for well in range(3):
        for site in range(2):
            stack[well, site] = 100 * (well + 1) + site
    stack[1, 0, 0, 0, 0, 0, 0] = 7  # the sampled corner of well 1
    layout = Tiling(rows=2, cols=2, step=2, tile=(4, 3), gap=1)
    out = np.zeros(layout.shape, np.uint16)
    cells = {(0, 0): 0, (1, 1): 1, (0, 1): 5}  # well index 5: not in this stack yet
    assert fill_tiles(out, layout, stack, cells, (1, 0, 0, 0)) == 2
    assert (out[0:4, 0:3] == 101).all()
    assert (out[5:9, 4:7] == 201).all()
    assert (out[0:4, 4:7] == 0).all() and (out[4, :] == 0).all()  # unplaced, and the gap
    fill_tiles(out, layout, stack, {(1, 1): 1}, (9, 0, 0, 0))  # past the last site: clipped
    assert out[5, 4] == 201
    fill_tiles(out, layout, stack, {(1, 1): 1}, (0, 0, 0, 0))
    assert out[5, 4] == 7 and out[5, 5] == 200


def test_fill_tiles_rgb_and_bad_rest():
    stack = np.zeros((1, 1, 1, 1, 1, 4, 4, 3), np.uint8)
    stack[0, 0, 0, 0, 0, :, :, 1] = 9
    layout = Tiling(rows=1, cols=2, step=1, tile=(4, 4), gap=2)
    out = np.zeros((*layout.shape, 3), np.uint8)
    assert fill_tiles(out, layout, stack, {(0, 1): 0}, (0, 0, 0, 0)) == 1
    assert (out[:, 6:, 1] == 9).all() and (out[:, 6:, 0] == 0).all() and (out[:, :6] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        fill_tiles(out, layout, stack, {(0, 0): 0}, (0,) * 6)


# -- in napari -------------------------------------------------------------------------------------
PLATE = {"rows": 4, "cols": 6}  # a 24-well plate
WELLS = ("A01", "B03", "D06")
CHANNELS = ("DAPI", "GFP")


def value(well: str, site: int, channel: str) -> int:
    row, col = parse_well(well)
    return 1000 * (row + 1) + 10 * (col + 1) + 100 * site + CHANNELS.index(channel) + 1


@pytest.fixture
def setup(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    assembler = PlateAssembler(max_bytes=1 << 28, contrast_interval=0.0)
    render = RenderTick(viewer, assembler)
    opened: list[str] = []
    overlay_box: list = []
    chosen: dict = {"run": None}
    overview = PlateOverview(viewer, assembler, render.streamed, open_well=opened.append,
                             on_hover=lambda: overlay_box[0].update(),
                             run=lambda: chosen["run"])
    overlay = DimsLabelOverlay(viewer, assembler, render.streamed, overview)
    overlay_box.append(overlay)
    render.applied.connect(overlay.update)
    overview.opened = opened  # type: ignore[attr-defined]
    yield SimpleNamespace(viewer=viewer, assembler=assembler, render=render, overview=overview,
                          overlay=overlay, opened=opened, chosen=chosen)
    overview.close()
    overlay.close()
    render.close()


def stream(s, wells=WELLS, sites=(1, 2), run="run1") -> None:
    for well in wells:
        for site in sites:
            for channel in CHANNELS:
                put(s.assembler, plane(value(well, site, channel)), well=well, site=site,
                    channel=channel, run=run, meta={"plate": PLATE})
    s.render.tick()


def tile_value(layer, layout: Tiling, well: str) -> np.ndarray:
    row, col = parse_well(well)
    y, x = layout.origin(row, col)
    th, tw = layout.tile
    return np.unique(layer.data[y:y + th, x:x + tw])


def site_axis(s) -> int:
    return s.viewer.dims.ndim - 7 + 1  # well, site, channel, t, z, y, x


@pytest.mark.gui
def test_overview_lays_every_well_out_on_the_plate(setup):
    s = setup
    stream(s)
    sources = s.render.streamed()
    s.viewer.dims.set_current_step(site_axis(s), 0)
    assert s.overview.set_active(True)
    shown = s.overview.layers()
    assert sorted(shown) == sorted(sources)
    for name, layer in shown.items():
        source = sources[name]
        assert layer.name == source.name + SUFFIX
        assert not source.visible and layer.visible
        assert layer.data.shape == tiling(4, 6, (32, 48)).shape  # 32x48 planes: full size
        channel = source.metadata["hcs_stream"]["channel"]
        layout = tiling(4, 6, (32, 48))
        for well in WELLS:
            assert tile_value(layer, layout, well).tolist() == [value(well, 1, channel)]
        assert tile_value(layer, layout, "C02").tolist() == [0]  # no frames: blank
        assert layer.colormap.name == source.colormap.name
        assert str(layer.blending) == str(source.blending)
    text = s.viewer.canvas.overlays[OVERLAY_KEY].text
    assert text.startswith("Plate overview | Site 1 |") and "Well" not in text


@pytest.mark.gui
def test_overview_follows_the_sliders_and_new_frames(setup, qtbot):
    s = setup
    stream(s)
    s.viewer.dims.set_current_step(site_axis(s), 0)
    s.overview.set_active(True)
    name, layer = next(iter(s.overview.layers().items()))
    channel = s.render.streamed()[name].metadata["hcs_stream"]["channel"]
    layout = tiling(4, 6, (32, 48))
    assert tile_value(layer, layout, "B03").tolist() == [value("B03", 1, channel)]
    timer = s.overview._timer
    s.viewer.dims.set_current_step(site_axis(s) - 1, 1)  # the well slider: nothing to redo
    assert not timer.isActive()
    s.viewer.dims.set_current_step(site_axis(s), 1)  # site 2: rebuilt soon after
    assert timer.isActive() and timer.remainingTime() < REFRESH_MS  # the fast one
    qtbot.waitUntil(lambda: tile_value(layer, layout, "B03").tolist()
                    == [value("B03", 2, channel)], timeout=5000)
    stream(s, wells=("C02",), sites=(2,))  # a new well: drawn with the next rebuild
    s.overview.schedule(0)
    qtbot.waitUntil(lambda: tile_value(layer, layout, "C02").tolist()
                    == [value("C02", 2, channel)], timeout=5000)
    assert tile_value(layer, layout, "A01").tolist() == [value("A01", 2, channel)]


@pytest.mark.gui
def test_overview_is_linked_to_its_layer_and_opens_a_well(setup):
    s = setup
    stream(s)
    s.overview.set_active(True)
    name, layer = next(iter(s.overview.layers().items()))
    source = s.render.streamed()[name]
    layer.contrast_limits = (5.0, 500.0)  # the user's edit: on both, and the stream keeps it
    assert tuple(source.contrast_limits) == (5.0, 500.0)
    assert s.render.user_set_contrast(name)
    s.viewer.layers.selection.active = layer
    assert "Plate overview" in s.overlay.text
    layout = tiling(4, 6, (32, 48))

    def at(y: float, x: float) -> SimpleNamespace:
        return SimpleNamespace(position=layer.data_to_world((y, x)))

    def ours(kind: str) -> list:
        """Our callbacks among the viewer's own (napari's zoom-on-double-click is there too)."""
        mine = (s.overview._on_mouse_move, s.overview._on_double_click)
        return [c for c in getattr(s.viewer, f"mouse_{kind}_callbacks") if c in mine]

    y, x = layout.origin(*parse_well("D06"))
    gy, gx = layout.origin(0, 1)
    # the viewer's own callbacks: whatever layer is selected (here none of ours)
    s.viewer.layers.selection.active = None
    assert len(ours("move")) == len(ours("double_click")) == 1
    ours("move")[0](s.viewer, at(y + 3, x + 3))
    assert s.overview.hovered == "D06"
    assert s.overlay.text.startswith("Plate overview | Well D06 | Site")
    ours("move")[0](s.viewer, at(gy + 3, gx - 1))  # in the gap between two wells: none
    assert s.overview.hovered is None and "Well" not in s.overlay.text
    ours("double_click")[0](s.viewer, at(gy + 3, gx - 1))  # nothing to open there
    assert s.opened == []
    ours("double_click")[0](s.viewer, at(y + 3, x + 3))
    assert s.opened == ["D06"]
    s.overview.set_active(False)  # the callbacks go with the overview
    assert ours("move") == ours("double_click") == []


@pytest.mark.gui
def test_leaving_the_overview_restores_the_layers_as_they_were(setup):
    s = setup
    stream(s)
    sources = s.render.streamed()
    hidden = next(iter(sources.values()))
    hidden.visible = False  # the user's choice before the overview: kept after it
    s.overview.set_active(True)
    assert len(s.viewer.layers) == 2 * len(sources)
    assert s.overview.set_active(False)
    assert list(s.viewer.layers) == list(sources.values())
    assert [layer.visible for layer in sources.values()] == [False, True]
    assert not s.overview.layers()
    assert "Plate overview" not in s.overlay.text


@pytest.mark.gui
def test_deleted_overview_layers_stay_away_and_cleared_runs_take_theirs(setup):
    s = setup
    stream(s)
    stream(s, run="run2")
    s.overview.set_active(True)
    shown = s.overview.layers()
    assert len(shown) == 4
    gone = next(name for name in shown if "run1" in name)
    s.viewer.layers.remove(shown[gone])  # the user deletes one
    s.overview.refresh()
    assert gone not in s.overview.layers() and len(s.overview.layers()) == 3
    s.assembler.clear("run2")
    s.render.tick()
    assert all("run2" not in layer.name for layer in s.viewer.layers)
    assert len(s.overview.layers()) == 1


@pytest.mark.gui
def test_no_plate_no_overview(setup):
    s = setup
    put(s.assembler, plane(3), channel="DAPI")  # no well at all
    s.render.tick()
    assert not s.overview.set_active(True)
    assert not s.overview.active and len(s.viewer.layers) == 1 and s.viewer.layers[0].visible
    s.assembler.set_modes({"well": "layer"})  # wells as layers: no well slider to lay out
    put(s.assembler, plane(4), well="A01", channel="DAPI", run="r2")
    s.render.tick()
    assert not s.overview.set_active(True)


@pytest.mark.gui
def test_labels_and_downsampled_layers(setup):
    s = setup
    s.assembler.downsample = 2
    for well, v in (("A01", 3), ("B02", 5)):
        put(s.assembler, plane(v, dtype="uint32"), well=well, kind="labels", source="masks",
            meta={"plate": PLATE})
    s.render.tick()
    assert s.overview.set_active(True)
    (layer,) = s.overview.layers().values()
    from napari.layers import Labels

    assert isinstance(layer, Labels)
    layout = tiling(4, 6, (16, 24))  # the stack holds every 2nd pixel
    assert tuple(layer.scale) == (2.0, 2.0)  # full-resolution coordinates, like its layer
    assert tile_value(layer, layout, "B02").tolist() == [5]


def test_a_layer_lowered_at_the_memory_cap_gets_a_new_overview(setup):
    s = setup
    stream(s, wells=("A01", "B02"), sites=(1,))
    assert s.overview.set_active(True)
    name = next(n for n in s.overview.layers() if n.startswith("DAPI"))
    assert tuple(s.overview.layers()[name].scale) == (1.0, 1.0)
    s.assembler.max_bytes = s.assembler.nbytes  # full: the next well lowers the run
    for channel in CHANNELS:
        put(s.assembler, plane(value("C03", 1, channel)), well="C03", site=1, channel=channel,
            meta={"plate": PLATE})
    assert s.assembler.coarsenings >= 1
    s.overview.refresh()  # before the render tick gave the layer its new scale
    s.render.tick()
    s.overview.refresh()
    layer = s.overview.layers()[name]
    layout = tiling(4, 6, (16, 24))  # the stack now holds every 2nd pixel
    assert tuple(layer.scale) == (2.0, 2.0) and layer.data.shape == layout.shape
    for well in ("A01", "B02", "C03"):
        assert tile_value(layer, layout, well).tolist() == [value(well, 1, "DAPI")]


@pytest.mark.gui
def test_overview_of_the_chosen_run_hides_the_others(setup):
    s = setup
    stream(s)
    stream(s, wells=("C02",), run="run2")
    s.chosen["run"] = "run2"
    assert s.overview.set_active(True)
    assert all("run2" in name for name in s.overview.layers())
    visible = [layer.name for layer in s.viewer.layers if layer.visible]
    assert visible and all(name.endswith(SUFFIX) and "run2" in name for name in visible)
    s.chosen["run"] = None  # all runs: both runs' overviews
    s.overview.refresh()
    assert len(s.overview.layers()) == 4
    s.chosen["run"] = "run1"
    s.overview.refresh()
    assert sorted(s.overview.layers()) == sorted(n for n in s.render.streamed() if "run1" in n)
    assert s.overview.set_active(False)
    assert all(layer.visible for layer in s.viewer.layers) and len(s.viewer.layers) == 4


@pytest.mark.gui
def test_volume_items_show_the_plane_the_sliders_point_at(setup):
    """A frame that is itself a z-stack (item axes z, y, x): its z is one more slider."""
    s = setup
    for well, base in (("A01", 10), ("B02", 20)):
        volume = np.stack([plane(base + k) for k in range(3)])
        put(s.assembler, volume, well=well, meta={"plate": PLATE})
    s.render.tick()
    s.viewer.dims.set_current_step(s.viewer.dims.ndim - 3, 2)  # the item's own z
    assert s.overview.set_active(True)
    (layer,) = s.overview.layers().values()
    layout = tiling(4, 6, (32, 48))
    assert tile_value(layer, layout, "A01").tolist() == [12]
    assert tile_value(layer, layout, "B02").tolist() == [22]


@pytest.mark.gui
def test_rgb_layers_get_an_rgb_overview(setup):
    s = setup
    from dataclasses import replace

    from _frames import header

    for well, colour in (("A01", (255, 0, 0)), ("C04", (0, 0, 255))):
        image = np.zeros((32, 48, 3), np.uint8)
        image[...] = colour
        h = replace(header(image, well=well, source="brightfield", meta={"plate": PLATE}),
                    rgb=True)
        dest = s.assembler.destination(h)  # what the listener does
        dest[...] = image
        s.assembler.commit(h, dest)
    s.render.tick()
    assert s.overview.set_active(True)
    (layer,) = s.overview.layers().values()
    assert layer.rgb and layer.data.shape == (*tiling(4, 6, (32, 48)).shape, 3)
    layout = tiling(4, 6, (32, 48))
    for well, colour in (("A01", [255, 0, 0]), ("C04", [0, 0, 255])):
        y, x = layout.origin(*parse_well(well))
        assert layer.data[y + 5, x + 5].tolist() == colour
