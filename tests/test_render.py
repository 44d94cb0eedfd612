"""The render tick against a real napari viewer and a real assembler (no sockets needed)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from _frames import plane, put
from napari_hcs_stream._qt.render import RenderTick
from napari_hcs_stream.assembler import STACK_AXES, PlateAssembler

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer(make_napari_viewer_proxy):
    return make_napari_viewer_proxy()


@pytest.fixture
def assembler():
    return PlateAssembler(max_bytes=1 << 30, contrast_interval=0.0)


@pytest.fixture
def tick(viewer, assembler):
    counter = {"n": 0}
    # follow_ms=0: these tests call tick() back to back and look at every follow
    render = RenderTick(viewer, assembler, generation=lambda: counter["n"], follow_ms=0)
    render.counter = counter  # type: ignore[attr-defined]
    yield render
    render.close()


def layer_named(viewer, name):
    return next(layer for layer in viewer.layers if layer.name == name)


def test_new_layers_have_shapes_labels_and_colours(viewer, assembler, tick):
    put(assembler, plane(10), well="A01", site=1, channel="DAPI")
    put(assembler, plane(20), well="B03", site=2, channel="DAPI")
    put(assembler, plane(30), well="A01", site=1, channel="GFP")
    tick.tick()
    assert sorted(tick.streamed()) == ["DAPI · out [run1]", "GFP · out [run1]"]
    dapi = layer_named(viewer, "DAPI · out [run1]")
    assert dapi.data.shape == (2, 2, 1, 1, 1, 32, 48)
    assert tuple(dapi.axis_labels) == (*STACK_AXES, "y", "x")
    assert tuple(viewer.dims.axis_labels) == (*STACK_AXES, "y", "x")
    assert dapi.colormap.name == "blue"
    assert str(dapi.blending) == "additive"
    assert dapi.metadata["hcs_stream"]["run"] == "run1"
    assert int(dapi.data[1, 1, 0, 0, 0, 0, 0]) == 20
    assert int(layer_named(viewer, "GFP · out [run1]").data[0, 0, 0, 0, 0, 5, 5]) == 30


def test_in_place_writes_refresh_only_the_visible_slice(viewer, assembler, tick):
    put(assembler, plane(1), well="A01")
    put(assembler, plane(2), well="A02")
    tick.tick()
    layer = layer_named(viewer, "out [run1]")
    assert viewer.dims.current_step[0] == 1  # followed the newest frame
    viewer.dims.set_current_step(0, 0)  # the user looks at A01
    calls = []
    layer.events.set_data.connect(lambda e: calls.append(e))
    put(assembler, plane(5), well="A02")  # not displayed: no refresh
    tick.tick()
    assert calls == []
    assert viewer.dims.current_step[0] == 0
    put(assembler, plane(7), well="A01")  # displayed: refreshed
    tick.tick()
    assert calls
    assert int(np.asarray(layer.data[0]).max()) == 7


def test_user_contrast_and_colormap_survive_updates(viewer, assembler, tick):
    put(assembler, plane(100), well="A01", channel="DAPI")
    tick.tick()
    layer = layer_named(viewer, "DAPI · out [run1]")
    layer.contrast_limits = (3, 4)  # the user
    layer.colormap = "magma"
    layer.opacity = 0.5
    for i, well in enumerate(["A02", "A03", "B01", "B02", "C01"]):  # growth and refinements
        put(assembler, plane(1000 * (i + 2)), well=well, channel="DAPI")
        tick.tick()
    assert tuple(layer.contrast_limits) == (3, 4)
    assert layer.colormap.name == "magma"
    assert layer.opacity == 0.5
    assert tick.user_set_contrast("DAPI · out [run1]")


def test_a_layer_lowered_at_the_memory_cap_keeps_its_place_and_the_users_edits(viewer):
    assembler = PlateAssembler(max_bytes=4 * 32 * 48 * 2, contrast_interval=0.0)
    render = RenderTick(viewer, assembler, generation=lambda: 0)
    try:
        put(assembler, plane(100), well="A01", channel="DAPI")
        render.tick()
        layer = layer_named(viewer, "DAPI · out [run1]")
        layer.colormap = "magma"  # the user
        layer.scale = (1, 1, 1, 1, 1, 0.5, 0.5)  # the user's own units
        extent = np.asarray(layer.extent.world)[:, -2:]
        for i, well in enumerate(["A02", "A03", "A04", "A05", "A06"]):  # past the cap
            put(assembler, plane(10 * (i + 2)), well=well, channel="DAPI")
        render.tick()
        assert assembler.coarsenings == 1
        assert layer.data.shape == (6, 1, 1, 1, 1, 16, 24)
        assert tuple(layer.scale[-2:]) == (1.0, 1.0)  # the user's 0.5, times the stream's 2
        np.testing.assert_allclose(np.asarray(layer.extent.world)[:, -2:], extent, atol=1)
        assert layer.colormap.name == "magma"
        assert int(layer.data[0, 0, 0, 0, 0, 3, 3]) == 100 and int(layer.data[5].max()) == 60
    finally:
        render.close()


def test_contrast_follows_the_assembler_until_the_user_touches_it(viewer, assembler, tick):
    put(assembler, plane(100), well="A01")
    tick.tick()
    layer = layer_named(viewer, "out [run1]")
    first = tuple(layer.contrast_limits)
    put(assembler, np.arange(32 * 48, dtype="uint16").reshape(32, 48) * 10, well="A02")
    tick.tick()
    assert tuple(layer.contrast_limits) != first
    assert not tick.user_set_contrast("out [run1]")


def test_slider_stays_where_the_user_put_it(viewer, assembler, tick):
    for well in ("A01", "A02", "A03"):
        put(assembler, plane(1), well=well)
    tick.tick()
    assert viewer.dims.current_step[0] == 2
    viewer.dims.set_current_step(0, 0)  # the user looks at A01
    put(assembler, plane(1), well="A04")
    tick.tick()
    assert viewer.dims.current_step[0] == 0
    viewer.dims.set_current_step(0, 3)  # back at the newest: follow again
    put(assembler, plane(1), well="A05")
    tick.tick()
    assert viewer.dims.current_step[0] == 4


def test_the_slider_follows_at_most_every_follow_ms(viewer, assembler, tick):
    """A follow held back while frames stream in is made by a later tick, new frames or not;
    meanwhile the slice the user sees is still refreshed, and a slider the user moved stays."""
    tick.follow_ms = 60_000  # every follow after the first is held back until the test says
    put(assembler, plane(1), well="A01")
    put(assembler, plane(2), well="A02")
    tick.tick()
    assert viewer.dims.current_step[0] == 1  # a new layer's newest frame: at once
    layer = layer_named(viewer, "out [run1]")
    calls = []
    layer.events.set_data.connect(lambda e: calls.append(e))
    put(assembler, plane(3), well="A03")
    tick.tick()
    assert viewer.dims.current_step[0] == 1  # held back
    calls.clear()  # (the new well grew the stack: new data for the layer)
    put(assembler, plane(4), well="A02")  # written where the user looks: refreshed
    put(assembler, plane(5), well="A03")  # (and the newest frame is still A03's)
    tick.tick()
    assert viewer.dims.current_step[0] == 1 and calls
    tick.follow_ms = 0
    applied = []
    tick.applied.connect(lambda: applied.append(1))
    tick.tick()  # no new frame: the follow held back is made now
    assert viewer.dims.current_step[0] == 2 and applied

    tick.follow_ms = 60_000  # the slider has just followed: the next follow is held back
    put(assembler, plane(6), well="A04")
    tick.tick()
    assert viewer.dims.current_step[0] == 2  # held back
    viewer.dims.set_current_step(0, 0)  # the user looks at A01 meanwhile
    tick.follow_ms = 0
    tick.tick()
    put(assembler, plane(7), well="A05")
    tick.tick()
    assert viewer.dims.current_step[0] == 0  # the slider is the user's


def test_clear_removes_layers_and_a_user_deleted_layer_stays_deleted(viewer, assembler, tick):
    put(assembler, plane(1), well="A01", run="a")
    put(assembler, plane(1), well="A01", run="b")
    tick.tick()
    assert len(viewer.layers) == 2
    assembler.clear("a")
    tick.tick()
    assert [layer.name for layer in viewer.layers] == ["out [b]"]
    viewer.layers.remove(layer_named(viewer, "out [b]"))  # the user deletes it
    put(assembler, plane(2), well="A02", run="b")
    tick.tick()
    assert len(viewer.layers) == 0
    assert tick.streamed() == {}


def test_generation_and_tick_times(viewer, assembler, tick):
    tick.counter["n"] = 5
    put(assembler, plane(1), well="A01")
    tick.tick()
    assert tick.rendered_generation == 5
    assert len(tick.tick_ms) == 1 and tick.tick_p99_ms > 0


def test_timer_applies_updates(qtbot, viewer, assembler, tick):
    tick.start()
    put(assembler, plane(3), well="A01")
    qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=5000)
    tick.stop()
    assert not tick.active


def test_pacer_spends_a_bounded_share_of_the_main_thread():
    from napari_hcs_stream._qt._pacing import Pacer

    load = {"v": 0.0}
    pacer = Pacer(min_ms=33, max_ms=250, duty=0.5, load=lambda: load["v"])
    assert pacer.interval_ms == 33
    pacer.record(40.0)  # an expensive redraw: wait 80 ms before the next
    assert pacer.interval_ms == 80
    load["v"] = 0.95  # the listener cannot keep up: redraw rarely, but within the max wait
    assert pacer.interval_ms == 250
    load["v"] = 0.0
    for _ in range(5):
        pacer.idle()
    assert pacer.interval_ms == 33


def test_timer_follows_the_listener_load_between_ticks(viewer, assembler):
    """The next tick starts the pacer's interval after this one started, and the interval
    moves with the listener's load even when the tick's cost does not."""
    from napari_hcs_stream._qt._pacing import Pacer

    load = {"v": 0.0}
    render = RenderTick(viewer, assembler, pacer=Pacer(duty=0.5, load=lambda: load["v"]))

    def next_tick_after(step: Callable[[], None]) -> tuple[int, int]:
        """(timer interval, what the tick itself took): they add up to the pacer's ask."""
        start = time.perf_counter()
        step()
        return render._timer.interval(), int((time.perf_counter() - start) * 1e3)

    try:
        render.start()
        assert render._timer.interval() == 33
        wait, spent = next_tick_after(render.tick)  # nothing to apply: the fastest
        assert 33 - spent - 1 <= wait <= 33
        put(assembler, plane(1), well="A01")
        render.tick()
        render.pacer.cost_ms = 100.0  # pretend ticks cost 100 ms
        load["v"] = 0.95  # the listener is saturated: redraw as rarely as the max wait allows
        wait, spent = next_tick_after(render.tick)  # the interval asked is the max either way
        assert render.pacer.interval_ms == 250 and 250 - spent - 1 <= wait <= 250
        load["v"] = 0.0
        wait, spent = next_tick_after(render.tick)
        assert render.pacer.interval_ms == 50 and 50 - spent - 1 <= wait <= 50
        render.stop()
        render.tick()  # a stopped timer is not restarted by a tick
        assert not render.active
    finally:
        render.close()


def test_a_time_lapse_stack_laid_out_time_first_shows_the_right_planes(viewer, assembler, tick):
    """After a time-lapse relayout the stack's axes are strided out of order: napari still
    gets the right plane for every slider position."""
    from napari_hcs_stream import _stackmem

    big = (256, 512)
    for t in range(3):
        for w, well in enumerate(("A01", "A02")):
            put(assembler, plane(10 * t + w + 1, big), well=well, site=1, t=t)
        tick.tick()
    layer = layer_named(viewer, "out [run1]")
    memory = _stackmem.memory(layer.data)
    assert not layer.data.flags.c_contiguous and memory.flags.c_contiguous
    t_axis = STACK_AXES.index("t")
    for t in range(3):
        for w in range(2):
            step = [0] * layer.ndim
            step[0], step[t_axis] = w, t
            viewer.dims.current_step = tuple(step)
            shown = np.asarray(layer._slice.image.view)
            assert shown.shape == big and (shown == 10 * t + w + 1).all()


def test_close_survives_qt_having_deleted_the_timer(viewer, assembler):
    """At interpreter exit Qt may delete the timer before our teardown runs."""
    from qtpy import sip

    render = RenderTick(viewer, assembler)
    render.start()
    sip.delete(render._timer)
    render.close()  # no "wrapped C/C++ object has been deleted"
    render.tick()  # a late tick is a no-op, not an error
