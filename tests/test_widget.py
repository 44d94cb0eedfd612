"""The dock widget end to end: producer processes -> listener -> assembler -> napari layers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication

from _producers import CHANNELS, plane_for, start_producers, value_of
from napari_hcs_stream._qt.widget import StreamWidget
from napari_hcs_stream.assembler import default_max_bytes
from napari_hcs_stream.control import ControlClient
from napari_hcs_stream.endpoints import lookup_endpoint
from napari_hcs_stream.publisher import Publisher

pytestmark = pytest.mark.gui

#: a sparse 24-well plate (4 x 6): five wells, split over two producers.
PLAN = {"prod-a": ["A01", "B03", "D06"], "prod-b": ["A03", "C02"]}


@pytest.fixture(autouse=True)
def private_plugin_settings(tmp_path, monkeypatch):
    """The widget remembers endpoints in napari's plugin settings: keep tests off the user's."""
    from napari import settings

    monkeypatch.setattr(settings, "_CFG_PATH", str(tmp_path / "settings.yaml"))
    settings._clear_plugin_settings_cache()
    yield tmp_path
    settings._clear_plugin_settings_cache()


@pytest.fixture
def docked(make_napari_viewer_proxy, qtbot, runtime_dir, request):
    """A shown viewer with the widget docked (not listening yet)."""

    def make(show: bool = False) -> tuple[object, StreamWidget]:
        viewer = make_napari_viewer_proxy(show=show)
        widget = StreamWidget(viewer)
        viewer.window.add_dock_widget(widget, name="HCS Stream")
        return viewer, widget

    return make


def listen(qtbot, widget: StreamWidget, name: str) -> None:
    widget.start(name)
    qtbot.waitUntil(lambda: bool(widget.listener and widget.listener.address), timeout=10000)


def in_thread(func) -> dict:
    """Run a blocking call (a control request) off the main thread; the GUI keeps ticking."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = func()
        except Exception as exc:  # reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"] = thread
    return out


def wait_result(qtbot, out: dict, timeout: int = 20000):
    qtbot.waitUntil(lambda: not out["thread"].is_alive(), timeout=timeout)
    if "error" in out:
        raise out["error"]
    return out["value"]


def layer_named(viewer, name):
    return next(layer for layer in viewer.layers if layer.name == name)


def test_plate_from_two_producer_processes(docked, qtbot, runtime_dir):
    viewer, widget = docked(show=True)
    listen(qtbot, widget, "plate")
    procs, results = start_producers("plate", str(runtime_dir), PLAN)
    qtbot.waitUntil(lambda: results.qsize() == len(PLAN), timeout=60000)
    done = [results.get() for _ in PLAN]
    for proc in procs:
        proc.join(10)
    assert all(sent == len(PLAN[p]) * 2 * len(CHANNELS) for p, _, sent in done)
    client = ControlClient(widget.listener.control_address)
    reply = wait_result(qtbot, in_thread(lambda: client.request(
        "flush", timeout=20, until={p: seq for p, seq, _ in done}, timeout_s=15)))
    assert reply["ok"], reply

    names = [f"{c} · plate [plate1]" for c in CHANNELS]
    assert sorted(layer.name for layer in viewer.layers) == sorted(names)
    assert tuple(viewer.dims.axis_labels) == ("well", "site", "channel", "t", "z", "y", "x")
    assembler = widget.assembler
    for channel, name in zip(CHANNELS, names, strict=True):
        layer = layer_named(viewer, name)
        assert layer.data.shape == (5, 2, 1, 1, 1, 64, 64)
        for w in range(5):
            for s in range(2):
                well = assembler.label_text(name, (w, s, 0, 0, 0)).split(" | ")[0].split()[1]
                assert int(layer.data[w, s, 0, 0, 0, 32, 32]) == value_of(well, s + 1, channel)

    # the overlay names the slider position of the active layer
    viewer.layers.selection.active = layer_named(viewer, names[1])
    viewer.dims.set_current_step(0, 2)
    viewer.dims.set_current_step(1, 1)
    well = assembler.label_text(names[1], (2, 1, 0, 0, 0)).split(" | ")[0]
    assert widget.overlay.text == f"{well} | Site 2 | GFP"

    # pixels on screen where data arrived
    QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    h, w = shot.shape[:2]
    assert shot[h // 2 - 20 : h // 2 + 20, w // 2 - 20 : w // 2 + 20, :3].max() > 0

    # the status table counted both producers
    qtbot.waitUntil(lambda: widget.counts.rows.get("total", {}).get("received") == 30,
                    timeout=5000)
    assert {"prod-a", "prod-b"} <= set(widget.counts.rows)
    assert all("held back" in widget.counts.rows[p] for p in ("prod-a", "prod-b", "total"))

    # the plate overview: every well where it sits on the (inferred 24-well) plate
    from napari_hcs_stream.labels import parse_well
    from napari_hcs_stream.overview import tiling

    widget.overview_button.click()
    assert widget.overview_button.isChecked()
    shown = widget._res.overview.layers()
    assert sorted(layer.name for layer in shown.values()) == sorted(f"{n} overview"
                                                                    for n in names)
    assert not any(layer_named(viewer, n).visible for n in names)
    active = viewer.layers.selection.active  # the overview layer added last
    assert widget.overlay.text == f"Plate overview | Site 2 | {active.name.split(' · ')[0]}"
    layout = tiling(4, 6, (64, 64))
    for name, layer in shown.items():
        channel = name.split(" · ")[0]
        for well in (w for wells in PLAN.values() for w in wells):
            y, x = layout.origin(*parse_well(well))
            assert int(layer.data[y + 32, x + 32]) == value_of(well, 2, channel)
        y, x = layout.origin(*parse_well("D01"))
        assert int(layer.data[y + 32, x + 32]) == 0  # no frames there
    QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].max() > 0
    assert widget.open_well("B03")  # as a double-click on it does
    assert not widget.overview_button.isChecked() and not widget._res.overview.layers()
    assert all(layer_named(viewer, n).visible for n in names)
    assert viewer.dims.current_step[0] == assembler.well_index("B03")
    assert widget.overlay.text.startswith("Well B03 | Site 2")


def test_user_contrast_survives_later_frames(docked, qtbot, runtime_dir):
    viewer, widget = docked()
    listen(qtbot, widget, "contrast")
    with Publisher("contrast", run="r", producer="p", connect_timeout=10) as pub:
        pub.publish(plane_for("A01", 1, "DAPI"), well="A01", site=1, channel="DAPI")
        qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=10000)
        layer = viewer.layers[0]
        layer.contrast_limits = (5, 6)
        layer.colormap = "magma"
        for well in ("A02", "A03", "B01"):
            pub.publish(plane_for(well, 1, "DAPI") * 3, well=well, site=1, channel="DAPI")
        qtbot.waitUntil(lambda: layer.data.shape[0] == 4, timeout=10000)
    assert tuple(layer.contrast_limits) == (5, 6)
    assert layer.colormap.name == "magma"


def test_bad_message_is_shown_and_listening_goes_on(docked, qtbot, runtime_dir):
    viewer, widget = docked()
    listen(qtbot, widget, "bad")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.connect(widget.listener.address)
    try:
        qtbot.waitUntil(lambda: _send_garbage(sock, widget), timeout=10000)
    finally:
        sock.close(linger=0)
        ctx.term()
    assert widget.error_label.toolTip()  # the full reason
    assert widget.listener.isRunning()
    with Publisher("bad", run="r", producer="good", connect_timeout=10) as pub:
        assert pub.publish(np.ones((8, 8), np.uint8), well="A01")
        qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=10000)


def _send_garbage(sock, widget: StreamWidget) -> bool:
    sock.send_multipart([b"{not json", b"xx"])
    QApplication.processEvents()
    return bool(widget.counts.rows.get("total", {}).get("rejected"))


def test_stop_button_and_remove_dock_widget_end_the_thread(docked, qtbot, runtime_dir,
                                                           private_plugin_settings):
    viewer, widget = docked()
    listen(qtbot, widget, "stopme")
    listener = widget.listener
    assert lookup_endpoint("stopme") is not None
    widget.start_button.click()  # Stop
    assert not listener.isRunning() and not widget.is_listening
    assert lookup_endpoint("stopme") is None
    widget.start_button.click()  # Start again, same endpoint (remembered in plugin settings)
    qtbot.waitUntil(lambda: bool(widget.is_listening and widget.listener.address),
                    timeout=10000)
    assert "endpoint: stopme" in (private_plugin_settings / "napari-hcs-stream.yaml").read_text()
    listener = widget.listener
    viewer.window.remove_dock_widget(widget)
    assert not listener.isRunning()
    assert not (Path(runtime_dir) / "stopme.json").exists()


def test_deleting_the_widget_or_closing_napari_ends_the_thread(docked, qtbot, runtime_dir):
    _viewer, widget = docked()
    listen(qtbot, widget, "gone")
    listener = widget.listener
    widget.deleteLater()
    qtbot.waitUntil(lambda: not listener.isRunning(), timeout=5000)
    viewer2, widget2 = docked()
    listen(qtbot, widget2, "gone2")
    listener2 = widget2.listener
    viewer2.close()
    qtbot.waitUntil(lambda: not listener2.isRunning(), timeout=5000)
    assert lookup_endpoint("gone") is None and lookup_endpoint("gone2") is None


def test_keep_runs_clears_older_runs_once_quiet(docked, qtbot, runtime_dir, monkeypatch,
                                                private_plugin_settings):
    from napari_hcs_stream import assembler

    monkeypatch.setattr(assembler, "RUN_QUIET_S", 0.3)
    viewer, widget = docked()
    assert widget.keep_spin.value() == 0 and widget.keep_spin.text() == "all"
    listen(qtbot, widget, "keep")
    with Publisher("keep", run="old", producer="p1", connect_timeout=10) as pub:
        pub.publish(plane_for("A01", 1, "DAPI"), well="A01", site=1, channel="DAPI")
        pub.publish(plane_for("A01", 1, "GFP"), well="A01", site=1, channel="GFP")
        qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=10000)
    assert not widget.keep_spin.keyboardTracking()  # typing 12 never passes through 1
    widget.keep_spin.setValue(1)  # one run: nothing to drop yet
    assert widget.assembler.keep_runs == 1
    assert "keep_runs: 1" in (private_plugin_settings / "napari-hcs-stream.yaml").read_text()
    with Publisher("keep", run="new", producer="p2", connect_timeout=10) as pub:
        pub.publish(plane_for("B02", 1, "DAPI"), well="B02", site=1, channel="DAPI")
        qtbot.waitUntil(lambda: [layer.name for layer in viewer.layers]
                        == ["DAPI · output [new]"], timeout=10000)
    assert widget.assembler.state()["runs"] == ["new"]
    qtbot.waitUntil(lambda: "1 older run dropped" in widget.memory_label.text(), timeout=5000)
    qtbot.waitUntil(lambda: widget.run_combo.count() == 2, timeout=5000)  # (all runs), new
    _viewer2, widget2 = docked()  # the next widget starts from the remembered setting
    assert widget2.keep_spin.value() == 1 and widget2.assembler.keep_runs == 1
    widget.keep_spin.setValue(0)
    assert widget.assembler.keep_runs == 0


def test_resolution_downsamples_new_layers_in_full_resolution_coordinates(docked, qtbot,
                                                                          runtime_dir):
    viewer, widget = docked(show=True)
    assert widget.resolution_combo.currentText() == "full"
    widget.resolution_combo.setCurrentText("1/4")
    assert widget.assembler.downsample == 4
    listen(qtbot, widget, "coarse")
    frame = np.random.default_rng(1).integers(0, 4000, (64, 66), dtype=np.uint16)
    with Publisher("coarse", run="r", producer="p", connect_timeout=10) as pub:
        pub.publish(frame, well="A01", channel="DAPI")
        qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=10000)
    layer = viewer.layers[0]
    assert layer.data.shape[-2:] == (16, 17) and tuple(layer.scale[-2:]) == (4, 4)
    np.testing.assert_array_equal(layer.data[0, 0, 0, 0, 0], frame[::4, ::4])
    assert layer.extent.world[1][-1] >= 64  # where a full-resolution layer would end
    assert widget.assembler.layers()[0].downsample == 4


def test_a_run_past_the_memory_cap_is_lowered_and_nothing_is_rejected(docked, qtbot,
                                                                       runtime_dir):
    viewer, widget = docked()
    frame = np.random.default_rng(2).integers(0, 4000, (64, 64), dtype=np.uint16)
    widget.assembler.max_bytes = 6 * frame.nbytes  # six full planes; the run sends sixteen
    listen(qtbot, widget, "capped")
    wells = [f"{row}{col:02d}" for row in "AB" for col in range(1, 9)]
    with Publisher("capped", run="big", producer="p", connect_timeout=10) as pub:
        for well in wells:
            pub.publish(frame, well=well, channel="DAPI")
        qtbot.waitUntil(lambda: len(viewer.layers) == 1
                        and viewer.layers[0].data.shape[0] == len(wells), timeout=10000)
    layer = viewer.layers[0]
    step = int(layer.scale[-1])
    assert step == 2 and layer.data.shape[-2:] == (32, 32)  # 16 planes at 1/4 the size
    for i in (0, len(wells) - 1):  # the first well, lowered after it came, and the last
        np.testing.assert_array_equal(layer.data[i, 0, 0, 0, 0], frame[::step, ::step])
    qtbot.waitUntil(lambda: widget.counts.rows.get("total", {}).get("received") == len(wells),
                    timeout=5000)
    assert widget.counts.rows["total"]["rejected"] == 0 and widget.error_label.text() == ""
    widget.refresh_info()
    assert "lower resolution to fit the cap: big" in widget.memory_label.text()


def test_memory_cap_is_remembered_and_the_environment_wins(docked, monkeypatch, caplog,
                                                          private_plugin_settings):
    _viewer, widget = docked()
    assert widget.assembler.max_bytes == default_max_bytes()  # the setting's 0: the default
    assert not widget.cap_spin.keyboardTracking()
    widget.cap_spin.setValue(2.5)
    assert widget.assembler.max_bytes == 5 << 29
    assert "memory_cap_gib: 2.5" in (private_plugin_settings / "napari-hcs-stream.yaml").read_text()
    _viewer, widget = docked()  # the next widget starts from the remembered cap
    assert widget.assembler.max_bytes == 5 << 29 and widget.cap_spin.value() == 2.5
    monkeypatch.setenv("NAPARI_HCS_STREAM_MEMORY_CAP", "1")
    _viewer, widget = docked()
    assert widget.assembler.max_bytes == 1 << 30
    monkeypatch.setenv("NAPARI_HCS_STREAM_MEMORY_CAP", "a lot")
    _viewer, widget = docked()
    assert widget.assembler.max_bytes == default_max_bytes()
    assert "ignoring memory_cap_gib: expected 0 (half this machine's memory)" in caplog.text
    assert "got 'a lot'" in caplog.text


def test_keep_runs_from_the_environment_wins(docked, monkeypatch, caplog):
    monkeypatch.setenv("NAPARI_HCS_STREAM_KEEP_RUNS", "3")
    _viewer, widget = docked()
    assert widget.keep_spin.value() == 3 and widget.assembler.keep_runs == 3
    monkeypatch.setenv("NAPARI_HCS_STREAM_KEEP_RUNS", "lots")
    _viewer, widget = docked()
    assert widget.assembler.keep_runs == 0 and "ignoring keep_runs='lots'" in caplog.text


def test_late_viewer_assembles_what_it_gets(docked, qtbot, runtime_dir):
    viewer, widget = docked()
    pub = Publisher("late", run="r", producer="early", connect_timeout=0.0)
    try:
        assert not pub.publish(plane_for("A01", 1, "DAPI"), well="A01", site=1, channel="DAPI")
        listen(qtbot, widget, "late")
        qtbot.waitUntil(lambda: _publish_until_connected(pub), timeout=10000)
        for well in ("B02", "C03"):
            pub.publish(plane_for(well, 1, "DAPI"), well=well, site=1, channel="DAPI")
        qtbot.waitUntil(lambda: len(viewer.layers) == 1 and viewer.layers[0].data.shape[0] == 3,
                        timeout=10000)
    finally:
        pub.close()
    layer = viewer.layers[0]
    texts = [widget.assembler.label_text(layer.name, (i, 0, 0, 0, 0)) for i in range(3)]
    assert texts == ["Well A02 | Site 1 | DAPI", "Well B02 | Site 1 | DAPI",
                     "Well C03 | Site 1 | DAPI"]
    for i, well in enumerate(("A02", "B02", "C03")):
        assert int(layer.data[i, 0, 0, 0, 0, 32, 32]) == value_of(well, 1, "DAPI")


def _publish_until_connected(pub: Publisher) -> bool:
    QApplication.processEvents()
    return pub.connected and pub.publish(plane_for("A02", 1, "DAPI"), well="A02", site=1,
                                         channel="DAPI")


def test_control_clear_screenshot_overview_and_shutdown(docked, qtbot, runtime_dir, tmp_path):
    viewer, widget = docked()
    listen(qtbot, widget, "ctl")
    client = ControlClient(widget.listener.control_address)
    with Publisher("ctl", run="keep", producer="a", connect_timeout=10) as keep, \
            Publisher("ctl", run="drop", producer="b", connect_timeout=10) as drop:
        keep.publish(np.ones((8, 8), np.uint8), well="A01")
        drop.publish(np.ones((8, 8), np.uint8), well="A01")
        qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=10000)
    state = wait_result(qtbot, in_thread(lambda: client.request("state", timeout=5)))
    assert state["ok"] and sorted(state["runs"]) == ["drop", "keep"]
    reply = wait_result(qtbot, in_thread(lambda: client.request("clear", timeout=5, run="drop")))
    assert reply["ok"]
    assert [layer.name for layer in viewer.layers] == ["output [keep]"]
    assert widget.run_combo.findText("drop") == -1
    shot = tmp_path / "shot.png"
    reply = wait_result(qtbot, in_thread(lambda: client.request("screenshot", timeout=10,
                                                                path=str(shot))))
    assert reply["ok"] and shot.stat().st_size > 0
    reply = client.request("screenshot", timeout=5, path="relative.png")
    assert not reply["ok"] and "absolute" in reply["error"]
    reply = wait_result(qtbot, in_thread(lambda: client.request("overview", timeout=10)))
    assert reply == {**reply, "ok": True, "active": True}
    assert [layer.name for layer in viewer.layers] == ["output [keep]", "output [keep] overview"]
    reply = wait_result(qtbot, in_thread(lambda: client.request("overview", timeout=10,
                                                                on=False)))
    assert reply == {**reply, "ok": True, "active": False} and len(viewer.layers) == 1
    reply = client.request("overview", timeout=5, on="yes")
    assert not reply["ok"] and "true or false" in reply["error"]
    widget.clear(None)
    reply = wait_result(qtbot, in_thread(lambda: client.request("overview", timeout=10)))
    assert not reply["ok"] and "No plate" in reply["error"]
    publish_again = Publisher("ctl", run="keep", producer="c", connect_timeout=10)
    with publish_again as keep:
        keep.publish(np.ones((8, 8), np.uint8), well="A01")
        qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=10000)
    widget.owned = False
    widget.launched = False
    listener = widget.listener
    reply = wait_result(qtbot, in_thread(lambda: client.request("shutdown", timeout=5,
                                                                close=True)))
    assert reply == {**reply, "ok": True, "closing": False}
    qtbot.waitUntil(lambda: not listener.isRunning() and not widget.is_listening, timeout=5000)
    assert len(viewer.layers) == 1  # not ours to close: the user's napari stays


def test_plugin_menu_opens_the_widget_and_autostarts(make_napari_viewer_proxy, qtbot,
                                                     runtime_dir, monkeypatch):
    monkeypatch.setenv("NAPARI_HCS_STREAM_AUTOSTART", "1")
    monkeypatch.setenv("NAPARI_HCS_STREAM_ENDPOINT", "auto")
    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-hcs-stream", "HCS Stream")
    assert widget.is_listening and widget.endpoint == "auto"
    qtbot.waitUntil(lambda: lookup_endpoint("auto") is not None, timeout=10000)
    reply = ControlClient(lookup_endpoint("auto").control).ping(timeout=5)
    assert reply and reply["ready"] and reply["app"] == "napari-hcs-stream"
    widget.stop()


def test_memory_cap_and_modes_reach_the_assembler(docked):
    _viewer, widget = docked()
    widget.cap_spin.setValue(2.0)
    assert widget.assembler.max_bytes == 2 * 1024**3
    widget.mode_combos["channel"].setCurrentText("stack")
    assert widget.assembler.modes["channel"].value == "stack"


def test_listening_beyond_loopback_requires_curve_and_shows_the_viewer_key(docked, qtbot,
                                                                          runtime_dir):
    from napari_hcs_stream import auth

    viewer, widget = docked()
    listen(qtbot, widget, "tcp://0.0.0.0:0")
    key = auth.key_pair()[0].decode()
    assert widget.listener.viewer_key == key
    qtbot.waitUntil(lambda: "CURVE" in widget.state_label.text(), timeout=10000)  # queued
    assert key in widget.state_label.text()
    port = widget.listener.address.rpartition(":")[2]
    with Publisher(f"tcp://127.0.0.1:{port}", connect_timeout=0.5) as plain:
        assert not plain.publish(np.zeros((16, 16), np.uint16), well="A01")  # no key: refused
    with Publisher(f"tcp://127.0.0.1:{port}", server_key=key, connect_timeout=10) as pub:
        assert pub.publish(np.full((16, 16), 5, np.uint16), well="A01")
    qtbot.waitUntil(lambda: len(viewer.layers) == 1, timeout=20000)
    assert int(np.asarray(viewer.layers[0].data).max()) == 5


def test_counts_show_rates_and_how_much_each_producer_is_held_back(qtbot):
    from napari_hcs_stream._qt._counts import COLUMNS, CountsTable

    table = CountsTable()
    qtbot.addWidget(table)
    table.show_counts({"a": {"received": 0, "waited_s": 0.0}, "b": {"received": 0}},
                      {"received": 0}, now=100.0)
    col = COLUMNS.index("held back")
    assert table.isColumnHidden(col)  # nobody waited: the producer ids get the room
    table.show_counts({"a": {"received": 500, "waited_s": 0.5}, "b": {"received": 100}},
                      {"received": 600}, now=101.0)
    rows = table.rows
    assert (rows["a"]["frames/s"], rows["a"]["held back"]) == (500, 0.5)
    assert (rows["b"]["frames/s"], rows["b"]["held back"]) == (100, 0)
    assert (rows["total"]["frames/s"], rows["total"]["held back"]) == (600, 0.5)  # the most
    assert not table.isColumnHidden(col)
    assert [table.item(r, col).text() for r in range(3)] == ["50%", "0%", "50%"]
    assert "waited" in table.horizontalHeaderItem(col).toolTip()


def test_counts_are_repainted_with_the_layers_or_soon_after(docked, qtbot):
    """A status snapshot waits for the next render tick that applies something (one window
    repaint for both), at most STATUS_WAIT_MS; a final snapshot shows at once."""
    from _frames import plane, put
    from napari_hcs_stream._qt.widget import STATUS_WAIT_MS

    _viewer, widget = docked()
    widget.render_tick.stop()  # ticks only when the test says

    def snapshot(received: int, listening: bool = True) -> dict:
        return {"producers": {"p": {"received": received}}, "totals": {"received": received},
                "listening": listening}

    def shown() -> object:
        return widget.counts.rows.get("total", {}).get("received")

    widget._on_status(snapshot(3))
    assert shown() is None  # not on its own repaint
    put(widget.assembler, plane(1), well="A01")
    widget.render_tick.tick()  # applies a frame: the counts come along
    assert shown() == 3
    widget._on_status(snapshot(5))
    widget.render_tick.tick()  # nothing to apply: no repaint, the counts keep waiting
    assert shown() == 3
    qtbot.waitUntil(lambda: shown() == 5, timeout=STATUS_WAIT_MS + 2000)
    widget._on_status(snapshot(7, listening=False))  # the listener's last word
    assert shown() == 7


class _Repaints:
    """Counts the repaints (``UpdateRequest`` events) of a window while it is entered."""

    def __init__(self, window) -> None:
        from qtpy.QtCore import QEvent, QObject

        class Filter(QObject):
            count = 0

            def eventFilter(self, _obj, event):
                if event.type() == QEvent.Type.UpdateRequest:
                    self.count += 1
                return False

        self._window = window
        self._filter = Filter(window)

    @property
    def count(self) -> int:
        return self._filter.count

    def __enter__(self) -> _Repaints:
        self._window.installEventFilter(self._filter)
        return self

    def __exit__(self, *exc: object) -> None:
        self._window.removeEventFilter(self._filter)


def _process_repaints() -> None:
    for _ in range(5):  # the repaint, then whatever Qt runs after it
        QApplication.processEvents()


@pytest.mark.parametrize("floating", [False, True], ids=["docked", "floating"])
def test_a_tick_repaints_the_window_once(docked, qtbot, floating):
    """napari's layer list answers a re-slice with a delayed layout that would repaint the
    window again after the tick's repaint (with software OpenGL a whole-window composition,
    holding the GIL); the widget runs that layout within the tick, also from a floating
    dock (a window of its own)."""
    from qtpy.QtWidgets import QDockWidget

    from _frames import plane, put

    _viewer, widget = docked(show=True)
    widget.render_tick.stop()  # ticks only when the test says
    widget.render_tick.follow_ms = 0  # and the slider follows at every one
    window = widget.window()  # napari's, where the layer list is
    if floating:
        dock = widget.parentWidget()
        while not isinstance(dock, QDockWidget):
            dock = dock.parentWidget()
        dock.setFloating(True)
        qtbot.waitUntil(lambda: widget.window() is dock)

    def tick(value: int) -> None:
        for channel in ("DAPI", "GFP"):  # the slider follows to a new z plane each time
            put(widget.assembler, plane(value), well="A01", z=value % 8, channel=channel)
        widget.render_tick.tick()
        _process_repaints()

    for value in range(8):  # the layers and their stacks exist
        tick(value)
    with _Repaints(window) as repaints:
        for value in range(8, 28):
            tick(value)
    assert 20 <= repaints.count <= 22  # one a tick (two without the settling: 40)


def test_an_overview_rebuild_repaints_the_window_once(docked, qtbot):
    """The plate overview changes napari layers outside the render tick: it settles too."""
    from _frames import plane, put

    _viewer, widget = docked(show=True)
    widget.render_tick.stop()
    wells = [f"{row}{col:02d}" for row in "AB" for col in range(1, 13)]
    for i, well in enumerate(wells):
        put(widget.assembler, plane(i), well=well, channel="DAPI")
    widget.render_tick.tick()
    assert widget.show_overview(True)
    _process_repaints()
    overview = widget._res.overview
    with _Repaints(widget.window()) as repaints:
        for i in range(10):
            put(widget.assembler, plane(100 + i), well=wells[i], channel="DAPI")
            overview.refresh()
            _process_repaints()
    assert 10 <= repaints.count <= 12  # one a rebuild (two without the settling: 20)


def test_settling_takes_the_views_python_made_and_lets_go_of_deleted_ones(qtbot):
    from qtpy.QtWidgets import QListView, QTableWidget, QVBoxLayout, QWidget

    from napari_hcs_stream._qt._settle import ItemViewSettler

    before = ItemViewSettler().settle()  # whatever else is on screen
    window = QWidget()
    qtbot.addWidget(window)
    layout = QVBoxLayout(window)
    table, listed = QTableWidget(2, 2), QListView()  # the table's two headers are Qt's own
    layout.addWidget(table)
    layout.addWidget(listed)
    window.show()
    qtbot.waitExposed(window)
    settler = ItemViewSettler()
    assert settler.settle() == before + 2  # the table and the list; PyQt refuses the headers
    listed.setParent(None)
    listed.deleteLater()
    qtbot.waitUntil(lambda: settler.settle() == before + 1)


def test_plate_map_shows_arrived_wells_and_a_click_moves_the_sliders(docked, qtbot):
    from _frames import put

    viewer, widget = docked(show=True)
    assembler, view = widget.assembler, widget.plate_map
    assert not widget.plate_box.isVisible()  # no well yet
    meta = {"plate": {"rows": 4, "cols": 6}}
    for well in ("B03", "A01", "D06"):
        for site in (1, 2):
            put(assembler, plane_for(well, site, "DAPI"), well=well, site=site,
                channel="DAPI", run="plate1", source="plate", meta=meta)
    put(assembler, plane_for("A01", 1, "DAPI"), well="ctrl", site=1, channel="DAPI",
        run="plate1", source="plate")
    widget.render_tick.tick()
    widget.refresh_info()
    qtbot.waitUntil(widget.plate_box.isVisible, timeout=5000)
    plate = view.plate
    assert (plate.rows, plate.cols) == (4, 6)
    assert {w.name for w in plate.cells.values()} == {"B03", "A01", "D06"}
    assert widget.plate_label.text() == ("3 of 24 wells (4 x 6), newest ctrl; "
                                         "1 not on the plate: ctrl")
    assert "2 frames" in view.describe(1, 2) and "no frames" in view.describe(0, 1)
    # the sliders followed the newest frame, so the ring is on the newest well's position
    assert view.current == "ctrl" and viewer.dims.current_step[0] == 3

    def colour(row: int, col: int) -> str:
        image = view.grab().toImage()
        point = view.cell_rect(row, col).center() * view.devicePixelRatioF()
        return image.pixelColor(point).name()

    colors = view.colors
    assert colour(1, 2) == colors["recent"]  # B03 has just arrived
    assert colour(0, 1) == colors["empty"]
    view.recent_s = 0.05  # later, the same well is drawn as "has frames"
    view.set_colors(colors)
    qtbot.waitUntil(lambda: colour(1, 2) == colors["data"], timeout=5000)

    # a click on A01 moves the well slider there; the overlay and the ring follow
    qtbot.mouseClick(view, Qt.MouseButton.LeftButton, pos=view.cell_rect(0, 0).center())
    assert viewer.dims.current_step[0] == assembler.well_index("A01") == 1
    assert widget.overlay.text.startswith("Well A01")
    assert view.current == "A01"
    qtbot.mouseClick(view, Qt.MouseButton.LeftButton, pos=view.cell_rect(3, 0).center())
    assert viewer.dims.current_step[0] == 1  # an empty well: nothing to go to
    viewer.dims.set_current_step(0, assembler.well_index("D06"))
    assert view.current == "D06"
    assert widget.show_well("B03") and not widget.show_well("H12")

    # the sliders stay where the user put them while frames arrive; a click on the newest
    # frame's well moves every slider there, and the sliders follow the stream again
    put(assembler, plane_for("C02", 2, "DAPI"), well="C02", site=2, channel="DAPI",
        run="plate1", source="plate", meta=meta)
    widget.render_tick.tick()
    assert view.current == "B03"
    viewer.dims.set_current_step(1, 0)
    widget.refresh_info()
    qtbot.mouseClick(view, Qt.MouseButton.LeftButton, pos=view.cell_rect(2, 1).center())
    assert tuple(viewer.dims.current_step[:2]) == (assembler.well_index("C02"), 1)
    put(assembler, plane_for("A03", 1, "DAPI"), well="A03", site=1, channel="DAPI",
        run="plate1", source="plate", meta=meta)
    widget.render_tick.tick()
    assert view.current == "A03"

    # the runs box picks the run the map shows; clearing everything hides it
    put(assembler, plane_for("B05", 1, "DAPI"), well="B05", site=1, channel="DAPI",
        run="plate2", source="plate")
    widget.render_tick.tick()
    widget.refresh_info()
    assert view.plate.arrived == 7
    widget.run_combo.setCurrentText("plate2")
    assert [w.name for w in view.plate.cells.values()] == ["B05"]
    widget.run_combo.setCurrentText("plate1")
    assert view.plate.arrived == 6
    widget.clear(None)
    assert not widget.plate_box.isVisible() and view.plate is None


def test_go_to_newest_frame_resumes_following(docked, qtbot):
    from _frames import put

    viewer, widget = docked()
    widget.render_tick.follow_ms = 0  # ticks back to back below, each one looked at
    assembler = widget.assembler
    assert not widget.go_to_newest()  # nothing streamed yet
    for z in range(3):
        put(assembler, plane_for("A01", 1, "DAPI"), well="A01", z=z, channel="DAPI")
    widget.render_tick.tick()
    z_axis = 4
    assert viewer.dims.current_step[z_axis] == 2  # following
    viewer.dims.set_current_step(z_axis, 0)  # the user looks back: following stops
    put(assembler, plane_for("A01", 1, "DAPI"), well="A01", z=3, channel="DAPI")
    widget.render_tick.tick()
    assert viewer.dims.current_step[z_axis] == 0
    widget.newest_button.click()
    assert viewer.dims.current_step[z_axis] == 3
    put(assembler, plane_for("A01", 1, "DAPI"), well="A01", z=4, channel="DAPI")
    widget.render_tick.tick()
    assert viewer.dims.current_step[z_axis] == 4  # and the sliders follow again


@pytest.mark.parametrize(("rows", "cols", "width"), [(8, 12, 400), (16, 24, 400), (32, 48, 300)])
def test_plate_map_view_places_every_well_where_a_click_finds_it(qtbot, rows, cols, width):
    from qtpy.QtCore import QPoint
    from qtpy.QtGui import QColor

    from napari_hcs_stream._qt._platemap import PlateMapView
    from napari_hcs_stream.labels import well_name
    from napari_hcs_stream.platemap import WellStatus, build_plate_map

    now = [100.0]
    view = PlateMapView(clock=lambda: now[0])
    qtbot.addWidget(view)
    wells = [WellStatus(well_name(r, c), 3, 99.5, i)
             for i, (r, c) in enumerate([(0, 0), (rows - 1, cols - 1), (rows // 2, 1)])]
    wells.append(WellStatus(well_name(1, 1), 1, 99.5, 3))  # a well with fewer frames
    view.set_plate(build_plate_map(wells, {"rows": rows, "cols": cols}))
    view.resize(width, view.heightForWidth(width))
    view.show()
    qtbot.waitExposed(view)
    for r, c in [(0, 0), (rows - 1, cols - 1), (rows // 2, 1), (1, cols // 2)]:
        rect = view.cell_rect(r, c)
        assert rect.width() >= 4 and view.rect().contains(rect)
        assert view.cell_at(rect.center()) == (r, c)
    assert view.cell_at(QPoint(-1, 5)) is None and view.cell_at(QPoint(width + 5, 5)) is None
    assert view.describe(0, 0) == "A01: 3 frames, newest just now"

    def colour(row: int, col: int) -> tuple[int, int, int]:
        image = view.grab().toImage()
        c = image.pixelColor(view.cell_rect(row, col).center() * view.devicePixelRatioF())
        return c.red(), c.green(), c.blue()

    def near(got: tuple[int, int, int], name: str) -> bool:  # displays may round colours
        want = QColor(view.colors[name])
        return max(abs(a - b) for a, b in zip(got, (want.red(), want.green(), want.blue()),
                                              strict=True)) <= 12

    assert near(colour(0, 0), "recent")  # arriving now
    now[0] = 160.0
    assert view.describe(rows - 1, cols - 1).endswith("newest 60 s ago")
    assert view.describe(1, 0) == f"{well_name(1, 0)}: no frames yet"
    view.set_colors(view.colors)  # redrawn a minute later: no well is arriving now
    assert near(colour(0, 0), "data")  # as many frames as the fullest well
    faint = colour(1, 1)  # a third of them: fainter
    assert not near(faint, "data") and not near(faint, "empty") and not near(faint, "recent")
    clicked: list[str] = []
    view.well_clicked.connect(clicked.append)
    qtbot.mouseClick(view, Qt.MouseButton.LeftButton, pos=view.cell_rect(rows // 2, 1).center())
    assert clicked == [well_name(rows // 2, 1)]


def test_overview_button_says_why_there_is_no_plate(docked, qtbot):
    from _frames import put
    from napari_hcs_stream._qt.widget import NO_PLATE

    viewer, widget = docked()
    put(widget.assembler, plane_for("A01", 1, "DAPI"), channel="DAPI")  # no well: no plate
    widget.render_tick.tick()
    widget.overview_button.click()
    assert not widget.overview_button.isChecked()
    assert widget.error_label.text() == NO_PLATE and len(viewer.layers) == 1
    put(widget.assembler, plane_for("B03", 1, "DAPI"), well="B03", channel="DAPI", run="r2")
    widget.render_tick.tick()
    widget.overview_button.click()
    assert widget.overview_button.isChecked() and widget.error_label.text() == ""
    # the layer with no plate is hidden too: it would cover the mosaic's corner
    assert [layer.name for layer in viewer.layers if layer.visible] == ["DAPI · out [r2] "
                                                                        "overview"]
    widget.overview_button.click()
    assert not widget.overview_button.isChecked()
    assert all(layer.visible for layer in viewer.layers) and len(viewer.layers) == 2


def test_overview_fills_in_live_as_producers_stream(docked, qtbot, runtime_dir):
    from napari_hcs_stream.labels import parse_well
    from napari_hcs_stream.overview import tiling

    viewer, widget = docked(show=True)
    listen(qtbot, widget, "live")
    first = {"prod-a": PLAN["prod-a"]}
    procs, results = start_producers("live", str(runtime_dir), first, sites=(1,))
    qtbot.waitUntil(lambda: results.qsize() == 1, timeout=60000)
    procs[0].join(10)
    qtbot.waitUntil(lambda: len(viewer.layers) == len(CHANNELS)
                    and widget.assembler.state()["frames"] == 3 * len(CHANNELS), timeout=10000)
    qtbot.waitUntil(lambda: widget.show_overview(True), timeout=5000)
    shown = widget._res.overview.layers()
    layout = tiling(4, 6, (64, 64))  # A01..D06: a 24-well plate is inferred

    def tile(well: str, channel: str) -> int:
        layer = next(v for k, v in shown.items() if k.startswith(channel))
        y, x = layout.origin(*parse_well(well))
        return int(layer.data[y + 32, x + 32])

    assert tile("A03", "GFP") == 0  # not streamed yet
    procs, results = start_producers("live", str(runtime_dir), {"prod-b": PLAN["prod-b"]},
                                     sites=(1,))
    qtbot.waitUntil(lambda: all(tile(w, c) == value_of(w, 1, c)
                                for w in PLAN["prod-b"] for c in CHANNELS), timeout=30000)
    assert all(tile(w, c) == value_of(w, 1, c) for w in PLAN["prod-a"] for c in CHANNELS)
    qtbot.waitUntil(lambda: results.qsize() == 1, timeout=60000)
    procs[0].join(10)
    assert widget.overview_button.isChecked()
    assert not any(viewer.layers[n.split(" overview")[0]].visible for n in
                   (layer.name for layer in shown.values()))


def test_overview_follows_the_run_chosen_in_the_runs_box(docked, qtbot):
    from _frames import put

    viewer, widget = docked()
    for run, well in (("r1", "A01"), ("r2", "B03")):
        put(widget.assembler, plane_for(well, 1, "DAPI"), well=well, channel="DAPI", run=run)
    widget.render_tick.tick()
    widget.refresh_info()
    assert widget.show_overview(True)
    assert len(widget._res.overview.layers()) == 2
    widget.run_combo.setCurrentText("r2")
    qtbot.waitUntil(lambda: list(widget._res.overview.layers()) == ["DAPI · out [r2]"],
                    timeout=5000)
    assert [layer.name for layer in viewer.layers if layer.visible] == ["DAPI · out [r2] overview"]
    assert widget.chosen_run() == "r2" and widget.plate_map.plate.cells  # the map agrees


def test_demo_button_streams_a_plate_into_this_viewer(docked, qtbot, runtime_dir):
    """The demo's pipeline finds this viewer (it listens first) and launches no other."""
    viewer, widget = docked()
    widget.endpoint_edit.setText("try-it")
    assert not widget.is_listening
    assert widget.stream_demo("--wells", "12", "--sites", "1", "--size", "64",
                              "--workers", "1")
    qtbot.waitUntil(lambda: widget.demo_process is not None, timeout=20000)
    assert widget.is_listening and widget.endpoint == "try-it"
    assert not widget.demo_button.isEnabled()
    assert not widget.stream_demo()  # one at a time
    proc = widget.demo_process
    qtbot.waitUntil(lambda: proc.poll() is not None, timeout=180000)
    assert proc.returncode == 0, widget._demo_log.read_text()
    out = widget._demo_log.read_text()
    assert f"'try-it': reusing napari (pid {os.getpid()})" in out, out  # no second napari
    state = widget.assembler.state()
    assert {layer["frames"] for layer in state["layers"]} == {12}  # flushed before it exits
    assert len(state["layers"]) == 5 and len(viewer.layers) == 5
    qtbot.waitUntil(widget.demo_button.isEnabled, timeout=5000)
    assert widget.demo_button.text() == "Stream a demo plate"


def test_a_failing_demo_says_where_its_output_is(docked, qtbot, runtime_dir):
    viewer, widget = docked()
    listen(qtbot, widget, "try-bad")
    assert widget.stream_demo("--wells", "7")  # not a plate format: the demo refuses
    qtbot.waitUntil(lambda: widget.demo_process is not None
                    and widget.demo_process.poll() is not None, timeout=60000)
    qtbot.waitUntil(widget.demo_button.isEnabled, timeout=5000)
    assert "the demo stopped with exit code" in widget.error_label.text()
    assert str(widget._demo_log) in widget.error_label.text()
    assert "n_wells" in widget._demo_log.read_text()
    assert widget.is_listening and len(viewer.layers) == 0
