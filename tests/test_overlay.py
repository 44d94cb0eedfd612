"""The dimension-label overlay: our own canvas overlay, following sliders and the active layer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from _frames import plane, put
from napari_hcs_stream._qt.overlay import (
    OVERLAY_KEY,
    DimsLabelOverlay,
    _SharedTextOverlay,
    stack_step,
)
from napari_hcs_stream._qt.render import RenderTick
from napari_hcs_stream.assembler import PlateAssembler


@pytest.fixture
def setup(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    assembler = PlateAssembler(max_bytes=1 << 28)
    render = RenderTick(viewer, assembler)
    overlay = DimsLabelOverlay(viewer, assembler, render.streamed)
    render.applied.connect(overlay.update)
    yield viewer, assembler, render, overlay
    overlay.close()
    render.close()


@pytest.mark.gui
def test_text_follows_sliders_and_active_layer(setup):
    viewer, assembler, render, overlay = setup
    ours = viewer.canvas.overlays[OVERLAY_KEY]
    assert not ours.visible
    for well in ("A01", "B03"):
        for site in (1, 2):
            for channel in ("DAPI", "GFP"):
                put(assembler, plane(1), well=well, site=site, channel=channel)
    render.tick()
    assert ours.visible
    assert overlay.text == ours.text == "Well B03 | Site 2 | GFP"  # newest, top layer active
    viewer.dims.set_current_step(0, 0)
    assert ours.text == "Well A01 | Site 2 | GFP"
    viewer.dims.set_current_step(1, 0)
    viewer.layers.selection.active = next(
        layer for layer in viewer.layers if "DAPI" in layer.name)
    assert ours.text == "Well A01 | Site 1 | DAPI"
    assert viewer.canvas.overlays["text"].text == ""  # the user's own overlay is left alone


@pytest.mark.gui
def test_hidden_without_streamed_layers_and_removed_on_close(setup):
    viewer, assembler, render, overlay = setup
    put(assembler, plane(1), well="A01")
    render.tick()
    assert viewer.canvas.overlays[OVERLAY_KEY].visible
    assembler.clear()
    render.tick()
    assert not viewer.canvas.overlays[OVERLAY_KEY].visible
    overlay.close()
    assert OVERLAY_KEY not in viewer.canvas.overlays


def test_stack_step_aligns_on_trailing_axes():
    assert stack_step((1, 2, 3, 4, 5, 0, 0), 7) == (1, 2, 3, 4, 5)
    assert stack_step((9, 1, 2, 3, 4, 5, 0, 0), 7) == (1, 2, 3, 4, 5)  # a 4-D user layer
    assert stack_step((0, 0), 2) == (0, 0, 0, 0, 0)


def test_shared_text_overlay_never_overwrites_user_text():
    viewer = SimpleNamespace(text_overlay=SimpleNamespace(text="", visible=False))
    shared = _SharedTextOverlay(viewer)
    shared.show("Well A01")
    assert viewer.text_overlay.text == "Well A01" and viewer.text_overlay.visible
    shared.show("Well A02")
    assert viewer.text_overlay.text == "Well A02"
    viewer.text_overlay.text = "my note"  # the user takes the overlay
    shared.show("Well A03")
    assert viewer.text_overlay.text == "my note"
    shared.hide()
    assert viewer.text_overlay.text == "my note"
