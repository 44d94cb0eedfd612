"""The HCS Stream dock widget: where to listen, what arrived, what went wrong, how to show it.

napari creates it from the Plugins menu (npe2 injects the viewer) or the launcher docks it with
``viewer.window.add_plugin_dock_widget("napari-hcs-stream", "HCS Stream")``. Its Python API
(``start``, ``stop``, ``is_listening``, ``endpoint``, ``assembler``, ``listener``) is what the
launcher and the tests drive.

napari never sends close events to dock widgets, so teardown hangs off three things that do
happen: the widget's C++ object being destroyed (the window closed), the widget leaving its
dock (``remove_dock_widget``), and the application quitting. All three run the same idempotent
:class:`_Resources.close`, which holds no reference to Qt objects that may already be gone.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QEvent, QSignalBlocker, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QElidingLabel

from ..assembler import DEFAULT_MODES, MIN_CAP_GIB, STACK_AXES, PlateAssembler, run_label
from ..labels import human_bytes
from . import _settings
from ._counts import CountsTable
from ._demo import DEMO_ARGS, spawn_demo
from ._overview import PlateOverview
from ._pacing import MAX_MS, Pacer
from ._platemap import PlateMapView
from ._settle import ItemViewSettler
from .listener import CommitCounter, ListenerThread
from .overlay import DimsLabelOverlay, stack_step, with_stack_step
from .render import RenderTick

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

ERROR_STYLE = "color: #e5534b;"  # red reads on napari's dark and light themes alike
ALL_RUNS = "(all runs)"
INFO_EVERY_S = 0.5
#: a status snapshot waits at most this long for a render tick to be shown with (ms): longer
#: than the pacer's longest interval, so that while frames stream in the counts always come
#: with a tick's window repaint, never in one of their own.
STATUS_WAIT_MS = MAX_MS + 50
#: listeners that did not stop in time: kept alive until they do (never destroyed running).
_STUCK: list[ListenerThread] = []
GIB = 1024**3
DEMO_TEXT = "Stream a demo plate"
#: how often the widget looks whether the demo process has finished (ms)
DEMO_POLL_MS = 500
#: why the plate overview cannot be shown
NO_PLATE = ("No plate to show: no streamed layer has wells of a plate on a slider yet (wells "
            "shown as separate layers have none).")
#: display resolutions offered for new layers: keep every n-th pixel (1: full resolution)
RESOLUTIONS = (1, 2, 4, 8, 16)


class _Resources:
    """Everything to undo on teardown; plain Python so it outlives the widget's C++ side."""

    def __init__(self) -> None:
        self.listener: ListenerThread | None = None
        self.render: RenderTick | None = None
        self.overlay: DimsLabelOverlay | None = None
        self.overview: PlateOverview | None = None
        self.connections: list[tuple[Any, Callable[..., Any]]] = []
        self.listener_connections: list[tuple[Any, Callable[..., Any]]] = []
        self.closed = False

    def connect(self, signal: Any, slot: Callable[..., Any]) -> None:
        signal.connect(slot)
        self.connections.append((signal, slot))

    def connect_listener(self, signal: Any, slot: Callable[..., Any]) -> None:
        signal.connect(slot)
        self.listener_connections.append((signal, slot))

    def stop_listener(self) -> None:
        """Stop the listener (bounded wait) and disconnect what ``start`` connected to it."""
        listener, self.listener = self.listener, None
        if listener is not None and not listener.stop():
            _STUCK.append(listener)  # destroying a running QThread would abort the process
        _disconnect_all(self.listener_connections)

    def close(self, *_: object) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop_listener()
        _disconnect_all(self.connections)
        if self.overview is not None:  # its layers go, the streamed layers it hid come back
            self.overview.close()
        if self.overlay is not None:
            self.overlay.close()
        if self.render is not None:
            self.render.close()


class StreamWidget(QWidget):
    """Listen for streamed HCS frames and show them as napari layers."""

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        parent: QWidget | None = None,
        *,
        assembler: Any = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        #: a ``shutdown`` request closes napari (the launching pipeline owns this process).
        self.owned = _settings.owned()
        #: a ``shutdown`` request with ``close: true`` closes napari (our launcher started it).
        self.launched = _settings.launched()
        self._assembler = (assembler if assembler is not None
                           else PlateAssembler(keep_runs=_settings.keep_runs(),
                                               max_bytes=_settings.memory_cap()))
        self._counter = CommitCounter()
        self._settler = ItemViewSettler()
        self._res = _Resources()
        self._was_docked = False
        self._info_at = 0.0
        self._close_when_stopped = False
        self._status: dict[str, Any] | None = None  # the newest snapshot not yet shown
        self._status_timer = QTimer(self)
        self._status_timer.setSingleShot(True)
        self._status_timer.setInterval(STATUS_WAIT_MS)
        self._status_timer.timeout.connect(self._show_status)
        #: the demo pipeline process started from the widget, its log, and its arguments
        self._demo: subprocess.Popen[bytes] | None = None
        self._demo_log: Path | None = None
        self._demo_args: tuple[str, ...] = DEMO_ARGS
        self._demo_pending = False  # start it once listening
        self._demo_timer = QTimer(self)
        self._demo_timer.setInterval(DEMO_POLL_MS)
        self._demo_timer.timeout.connect(self._check_demo)
        self._build_ui()

        self._res.render = RenderTick(napari_viewer, self._assembler, generation=self._counter.get,
                                      pacer=Pacer(load=self._counter.get_load))
        self._res.overview = PlateOverview(napari_viewer, self._assembler,
                                           self._res.render.streamed, open_well=self.open_well,
                                           on_hover=self._update_overlay, run=self.chosen_run,
                                           settle=self._settler.settle)
        self._res.overlay = DimsLabelOverlay(napari_viewer, self._assembler,
                                             self._res.render.streamed, self._res.overview)
        self._res.connect(self._res.render.applied, self._res.overlay.update)
        self._res.connect(self._res.render.applied, self._on_rendered)
        self._res.connect(self._res.render.applied, self._res.overview.schedule)
        for signal in (napari_viewer.dims.events.current_step,
                       napari_viewer.layers.selection.events.active):
            self._res.connect(signal, self._show_current_well)
        if hasattr(napari_viewer.events, "theme"):
            self._res.connect(napari_viewer.events.theme, self._apply_theme)
        self._apply_theme()
        self._res.connect(self.destroyed, self._res.close)
        app = QApplication.instance()
        if app is not None:
            self._res.connect(app.aboutToQuit, self._res.close)
        self._res.render.start()
        if _settings.autostart():
            self.start()

    # -- public API ------------------------------------------------------------------------------
    @property
    def assembler(self) -> Any:
        return self._assembler

    @property
    def listener(self) -> ListenerThread | None:
        return self._res.listener

    @property
    def render_tick(self) -> RenderTick | None:
        return self._res.render

    @property
    def overlay(self) -> DimsLabelOverlay | None:
        return self._res.overlay

    @property
    def endpoint(self) -> str:
        """The endpoint listened on (or to be listened on): a name or an address."""
        listener = self._res.listener
        return listener.endpoint if listener is not None else self.endpoint_edit.text().strip()

    @property
    def is_listening(self) -> bool:
        listener = self._res.listener
        return listener is not None and (listener.isRunning() or not listener.isFinished())

    def start(self, endpoint: str | None = None) -> None:
        """Listen on ``endpoint`` (default: the line edit); restarts if it is another one."""
        if self._res.closed:
            raise RuntimeError("this HCS Stream widget was closed; open a new one")
        endpoint = (endpoint or self.endpoint_edit.text()).strip() or _settings.DEFAULT_ENDPOINT
        if self.is_listening:
            if endpoint == self.endpoint:
                return
            self.stop()
        self.endpoint_edit.setText(endpoint)
        listener = ListenerThread(
            endpoint,
            self._assembler,
            counter=self._counter,
            rendered=self._rendered_generation,
            close_on_shutdown=self._closes_on_shutdown,
        )
        for signal, slot in (
            (listener.status, self._on_status),
            (listener.bound, self._on_bound),
            (listener.failed, self._on_failed),
            (listener.clear_requested, self._on_clear_requested),
            (listener.shutdown_requested, self._on_shutdown_requested),
            (listener.screenshot_requested, self._on_screenshot_requested),
            (listener.overview_requested, self._on_overview_requested),
            (listener.finished, self._on_finished),
        ):
            self._res.connect_listener(signal, slot)
        self._res.listener = listener
        self.state_label.setText(f"Starting on {endpoint}…")
        self.start_button.setText("Stop")
        self.endpoint_edit.setEnabled(False)
        listener.start()

    def stop(self) -> None:
        """Stop listening (bounded wait); layers and counts stay."""
        self._res.stop_listener()
        self._show_stopped()

    # -- UI ----------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        self.endpoint_edit = QLineEdit(_settings.default_endpoint())
        self.endpoint_edit.setToolTip(
            "Endpoint name (producers find it by name) or address (ipc://PATH, tcp://HOST:PORT)"
        )
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self._on_start_clicked)
        row = QHBoxLayout()
        row.addWidget(self.endpoint_edit, 1)
        row.addWidget(self.start_button)
        self.state_label = QLabel("Not listening")
        self.state_label.setWordWrap(True)
        self.state_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.counts = CountsTable()
        self.error_label = QElidingLabel("")
        self.error_label.setStyleSheet(ERROR_STYLE)
        self.memory_label = QLabel("No streamed layers")
        self.cap_spin = QDoubleSpinBox()
        self.cap_spin.setRange(MIN_CAP_GIB, 4096.0)
        self.cap_spin.setKeyboardTracking(False)  # typing 16 must not pass through 1
        self.cap_spin.setDecimals(2)
        self.cap_spin.setSuffix(" GiB")
        self.cap_spin.setValue(self._assembler.max_bytes / GIB)
        self.cap_spin.setToolTip(
            "Most memory streamed layers may take. A run that needs more is shown at half its "
            "resolution (again, down to 1/16), its earlier frames too; only past that are its "
            "frames rejected. Clear a run to make room. Applies to the next allocation, and "
            "is remembered in the plugin settings."
        )
        self.cap_spin.valueChanged.connect(self._on_cap_changed)
        self.keep_spin = QSpinBox()
        self.keep_spin.setRange(0, 999)
        self.keep_spin.setSpecialValueText("all")  # shown for 0
        self.keep_spin.setKeyboardTracking(False)  # typing 12 must not pass through 1
        self.keep_spin.setValue(int(getattr(self._assembler, "keep_runs", 0)))
        self.keep_spin.setToolTip(
            "Keep only this many runs, the newest; an older run is cleared once it has been "
            "quiet for a few seconds. all: keep every run until you clear it."
        )
        self.keep_spin.valueChanged.connect(self._on_keep_runs_changed)
        self.newest_button = QPushButton("Go to newest frame")
        self.newest_button.setToolTip(
            "Move every slider to the newest frame; the sliders then follow the stream again "
            "(they stop following when you move one yourself)"
        )
        self.newest_button.clicked.connect(self.go_to_newest)
        self.demo_button = QPushButton(DEMO_TEXT)
        self.demo_button.setToolTip(
            "Try it: a pipeline in a background process (napari-hcs-stream demo) streams a "
            "synthetic 96-well plate (2 sites, 4 channels, 256x256) into this viewer. Starts "
            "listening first if need be."
        )
        self.demo_button.clicked.connect(lambda: self.stream_demo())

        form = QFormLayout()
        form.addRow("Endpoint", row)
        form.addRow("State", self.state_label)
        form.addRow("Memory", self.memory_label)
        limits = QHBoxLayout()  # two limits on memory, side by side: one row less
        limits.addWidget(self.cap_spin, 1)
        limits.addWidget(QLabel("keep runs"))
        limits.addWidget(self.keep_spin, 1)
        form.addRow("Memory cap", limits)
        form.addRow("Sliders", self.newest_button)
        form.addRow("Demo", self.demo_button)

        self.mode_combos: dict[str, QComboBox] = {}
        modes_box = QGroupBox("New layers: each component as, and resolution")
        grid = QGridLayout(modes_box)
        modes = {**DEFAULT_MODES, **self._assembler.modes}
        for i, component in enumerate(STACK_AXES):
            combo = QComboBox()
            combo.addItems(["stack", "layer"])
            combo.setCurrentText(modes[component].value)
            combo.setToolTip(f"stack: a slider axis; layer: one layer per {component}")
            combo.currentTextChanged.connect(self._on_mode_changed)
            self.mode_combos[component] = combo
            grid.addWidget(QLabel(component), i // 3, (i % 3) * 2)
            grid.addWidget(combo, i // 3, (i % 3) * 2 + 1)
        self.resolution_combo = QComboBox()
        for step in RESOLUTIONS:
            self.resolution_combo.addItem("full" if step == 1 else f"1/{step}", step)
        current = int(getattr(self._assembler, "downsample", 1))
        if current not in RESOLUTIONS:
            self.resolution_combo.addItem(f"1/{current}", current)
        self.resolution_combo.setCurrentIndex(self.resolution_combo.findData(current))
        self.resolution_combo.setToolTip(
            "Resolution of new layers: 1/4 keeps every 4th pixel along each image axis, a "
            "16th of the memory (for plates too big to hold at full resolution). Layers stay "
            "in full-resolution pixel coordinates (napari scale); a producer's "
            "meta['downsample'] wins for its own run."
        )
        self.resolution_combo.currentIndexChanged.connect(self._on_resolution_changed)
        n = len(STACK_AXES)
        grid.addWidget(QLabel("resolution"), n // 3, (n % 3) * 2)
        grid.addWidget(self.resolution_combo, n // 3, (n % 3) * 2 + 1)

        self.plate_box = QGroupBox("Plate")
        self.plate_label = QElidingLabel("")
        self.plate_map = PlateMapView()
        self.plate_map.well_clicked.connect(self.open_well)
        self.overview_button = QPushButton("Plate overview")
        self.overview_button.setCheckable(True)
        self.overview_button.setToolTip(
            "Every well side by side, laid out as on the plate, at the site, z and time the "
            "sliders show (each streamed layer gets an overview layer, shown instead of it). "
            "Double-click a well, or click it in the map, to open it."
        )
        self.overview_button.clicked.connect(self.show_overview)
        plate_layout = QVBoxLayout(self.plate_box)
        plate_layout.addWidget(self.plate_label)
        plate_layout.addWidget(self.plate_map)
        plate_layout.addWidget(self.overview_button)
        self.plate_box.setVisible(False)  # until a frame names a well

        self.run_combo = QComboBox()
        self.run_combo.addItem(ALL_RUNS)
        self.run_combo.setToolTip(
            "The run to clear, and the run the plate map and the plate overview show")
        self.run_combo.currentTextChanged.connect(self._on_run_chosen)
        self.clear_run_button = QPushButton("Clear run")
        self.clear_run_button.clicked.connect(self._on_clear_run_clicked)
        self.clear_all_button = QPushButton("Clear all")
        self.clear_all_button.clicked.connect(lambda: self.clear(None))
        clear_row = QHBoxLayout()
        clear_row.addWidget(self.run_combo, 1)
        clear_row.addWidget(self.clear_run_button)
        clear_row.addWidget(self.clear_all_button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.counts)
        layout.addWidget(self.error_label)
        layout.addWidget(self.plate_box)
        layout.addWidget(modes_box)
        layout.addLayout(clear_row)
        layout.addStretch(1)

    def _show_stopped(self) -> None:
        self.start_button.setText("Start")
        self.endpoint_edit.setEnabled(True)
        self.state_label.setText("Not listening")

    # -- slots (main thread) -----------------------------------------------------------------
    def _on_start_clicked(self) -> None:
        if self.is_listening:
            self.stop()
            return
        endpoint = self.endpoint_edit.text().strip() or _settings.DEFAULT_ENDPOINT
        _settings.remember_endpoint(endpoint)
        self.start(endpoint)

    def _on_bound(self, data: str, control: str) -> None:
        key = self.listener.viewer_key if self.listener is not None else ""
        if key:  # beyond this machine: producers need this key, and their own authorized
            self.state_label.setText(f"Listening on {data}, authorized producers only "
                                     f"(CURVE). Viewer key: {key}")
            self.state_label.setToolTip(
                f"data: {data}\ncontrol: {control}\nProducers elsewhere need the viewer key "
                "(server_key= or NAPARI_HCS_STREAM_SERVER_KEY), and their own key authorized "
                "here: napari-hcs-stream keys authorize KEY")
        else:
            self.state_label.setText(f"Listening on {data}")
            self.state_label.setToolTip(f"data: {data}\ncontrol: {control}")
        if self._demo_pending:
            self._demo_pending = False
            self._spawn_demo()

    # -- the demo --------------------------------------------------------------------------------
    def stream_demo(self, *args: str) -> bool:
        """Stream a synthetic plate into this viewer from ``napari-hcs-stream demo`` in a
        background process, listening first if need be; ``args`` go to the demo (default:
        96 wells, 2 sites, 256x256). False while a demo started here is still running."""
        if self._demo is not None and self._demo.poll() is None:
            return False
        self._demo_args = tuple(args) or DEMO_ARGS
        listener = self.listener
        if listener is not None and listener.address:
            self._spawn_demo()
        else:
            self._demo_pending = True
            self.start()
        return True

    def _spawn_demo(self) -> None:
        listener = self.listener
        try:
            self._demo, self._demo_log = spawn_demo(
                self.endpoint, self._demo_args, listener.viewer_key if listener else "")
        except OSError as exc:
            self.show_error(f"cannot start the demo: {exc}")
            return
        self.demo_button.setEnabled(False)
        self.demo_button.setText("Demo streaming…")
        self._demo_timer.start()

    @property
    def demo_process(self) -> subprocess.Popen[bytes] | None:
        """The demo pipeline process started from the widget (if any)."""
        return self._demo

    def _check_demo(self) -> None:
        demo = self._demo
        if demo is None or demo.poll() is None:
            return
        self._demo_timer.stop()
        self.demo_button.setEnabled(True)
        self.demo_button.setText(DEMO_TEXT)
        if demo.returncode != 0:
            self.show_error(f"the demo stopped with exit code {demo.returncode}; its output "
                            f"is in {self._demo_log}")

    def _on_failed(self, message: str) -> None:
        self._demo_pending = False
        self.show_error(message)

    def _on_finished(self) -> None:
        listener = self.sender()
        if listener is self._res.listener:  # it ended on its own (bind failed, shutdown)
            self._res.stop_listener()
            self._show_stopped()
        if self._close_when_stopped:
            self._close_when_stopped = False
            QTimer.singleShot(0, self.viewer.close)

    def _on_status(self, status: dict[str, Any]) -> None:
        """Keep the snapshot for the next render tick that applies something, or at most
        :data:`STATUS_WAIT_MS` from now: every widget repaint makes Qt compose the whole
        window again (with software OpenGL about 8 ms), so the counts are repainted in the
        same pass as the layers instead of on their own. A final snapshot shows at once."""
        self._status = status
        if not status.get("listening", True):
            self._show_status()
        elif not self._status_timer.isActive():
            self._status_timer.start()

    def _show_status(self) -> None:
        status, self._status = self._status, None
        self._status_timer.stop()
        if status is None or self._res.closed:
            return
        self.counts.show_counts(status.get("producers", {}), status.get("totals", {}))
        if status.get("last_error"):
            self.show_error(status["last_error"])

    def show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.setToolTip(message)

    def _on_rendered(self) -> None:
        """After a tick that changed something: what the widget shows, then the item views'
        pending layouts, so that all of it is in the tick's one window repaint."""
        if self._status is not None:
            self._show_status()
        now = time.monotonic()
        if now - self._info_at >= INFO_EVERY_S:
            self._info_at = now
            self.refresh_info()
        self._settler.settle()

    def refresh_info(self) -> None:
        """Memory held and the runs to clear (from ``assembler.state()``; a few Hz at most)."""
        state = self._assembler.state()
        layers = len(self._res.render.streamed()) if self._res.render else 0
        dropped = int(state.get("runs_dropped", 0))
        notes = f"; {dropped} older run{'s' * (dropped != 1)} dropped" if dropped else ""
        lowered = [run_label(str(r)) for r in state.get("lowered", ())]
        if lowered:  # the memory cap lowered their resolution
            notes += f"; lower resolution to fit the cap: {', '.join(lowered)}"
        self.memory_label.setText(f"{human_bytes(state['nbytes'])} in {layers} layers{notes}")
        self.memory_label.setToolTip(self.memory_label.text())
        runs = [str(r) for r in state["runs"]]
        current = [self.run_combo.itemText(i) for i in range(1, self.run_combo.count())]
        if runs != current:
            selected = self.run_combo.currentText()
            with QSignalBlocker(self.run_combo):  # one plate refresh below, not one per item
                self.run_combo.clear()
                self.run_combo.addItems([ALL_RUNS, *runs])
                self.run_combo.setCurrentText(selected)
        self.refresh_plate()

    # -- the plate map -------------------------------------------------------------------------
    def chosen_run(self) -> str | None:
        """The run chosen in the runs box; None for all runs."""
        run = self.run_combo.currentText()
        return None if run in ("", ALL_RUNS) else run

    def _on_run_chosen(self, _run: str) -> None:
        self.refresh_plate()
        if self._res.overview is not None:
            self._res.overview.schedule(0)

    def refresh_plate(self) -> None:
        """Redraw the plate map for the run chosen in the runs box (all runs: every well)."""
        plate = self._assembler.plate_map(self.chosen_run())
        self.plate_box.setVisible(plate is not None)
        self.plate_map.set_plate(plate)
        if plate is None:
            return
        newest = max([*plate.cells.values(), *plate.unplaced], key=lambda w: w.last_seen)
        size = f" ({plate.rows} x {plate.cols})" if plate.wells else ""
        text = f"{len(plate.cells)} of {plate.wells} wells{size}, newest {newest.name}"
        if plate.unplaced:
            names = ", ".join(w.name for w in plate.unplaced[:5])
            more = "…" if len(plate.unplaced) > 5 else ""
            text += f"; {len(plate.unplaced)} not on the plate: {names}{more}"
        self.plate_label.setText(text)
        self.plate_label.setToolTip(text)
        self.plate_map.set_current(self._current_well())

    def _target(self) -> tuple[str, Any] | None:
        """(assembler name, napari layer) of the streamed layer the overlay labels, if any."""
        overlay = self._res.overlay
        return overlay.target() if overlay is not None and not self._res.closed else None

    def _current_well(self) -> str | None:
        """The well the sliders show, in the layer the overlay labels."""
        target = self._target()
        if target is None:
            return None
        name, layer = target
        return self._assembler.well_at(name, stack_step(self.viewer.dims.current_step,
                                                        layer.ndim))

    def _show_current_well(self, _event: object = None) -> None:
        """Ring the well the sliders show. The map is redrawn with the counts (a few times a
        second); a slider that followed the stream to a well the map does not have yet
        redraws it now, so the two never disagree."""
        well = self._current_well()
        plate = self.plate_map.plate
        if well is not None and (plate is None or not plate.has(well)):
            self.refresh_plate()
        else:
            self.plate_map.set_current(well)

    def show_well(self, well: str) -> bool:
        """Move the well slider to ``well`` (as named by the producer); False if no
        streamed layer stacks wells on a slider or that well never arrived.

        The newest frame's well moves every slider to the newest frame, so the sliders
        follow the stream again; any other well moves only the well slider."""
        target = self._target()
        index = self._assembler.well_index(well)
        if target is None or index is None:
            return False
        name, layer = target
        dims = self.viewer.dims
        offset = max(0, dims.ndim - layer.ndim)
        well_axis = offset + STACK_AXES.index("well")
        if well_axis >= dims.ndim or well_axis in dims.displayed:
            return False
        newest = self._assembler.announced_newest(name)
        if newest is None or newest[STACK_AXES.index("well")] != index:
            dims.set_current_step(well_axis, index)
            return True
        return self.go_to_newest()

    def open_well(self, well: str) -> bool:
        """Leave the plate overview if it is on, and show ``well`` (see :meth:`show_well`)."""
        self.show_overview(False)
        return self.show_well(well)

    def show_overview(self, on: bool = True) -> bool:
        """Show every well side by side as on the plate (True), or go back to the streamed
        layers; False when there is no plate to lay out (no streamed layer stacks wells of a
        plate on a slider), with the reason in the widget."""
        overview = self._res.overview
        if overview is None or self._res.closed:
            return False
        shown = overview.set_active(bool(on))
        if not shown:
            self.show_error(NO_PLATE)
        elif self.error_label.text() == NO_PLATE:
            self.show_error("")
        with QSignalBlocker(self.overview_button):
            self.overview_button.setChecked(overview.active)
        self._update_overlay()
        return shown

    def _update_overlay(self) -> None:
        if self._res.overlay is not None and not self._res.closed:
            self._res.overlay.update()

    def go_to_newest(self) -> bool:
        """Move every slider to the newest frame shown (of the layer the overlay labels), so
        the sliders follow the stream again; False when no streamed frame is shown yet."""
        target = self._target()
        if target is None:
            return False
        name, layer = target
        newest = self._assembler.announced_newest(name)
        if newest is None:
            return False
        dims = self.viewer.dims
        dims.current_step = with_stack_step(dims.current_step, layer.ndim, newest, dims.displayed)
        return True

    def _apply_theme(self, _event: object = None) -> None:
        """The plate map in the viewer's theme colours (napari's own widgets follow it)."""
        try:
            from napari.utils.theme import get_theme

            theme = get_theme(self.viewer.theme)
        except Exception:  # an unknown theme or an older napari: keep the default colours
            log.debug("no napari theme for the plate map", exc_info=True)
            return
        colors = {"empty": theme.primary, "data": theme.current, "recent": theme.warning,
                  "text": theme.text}
        self.plate_map.set_colors({k: v.as_hex() for k, v in colors.items()})

    def _on_cap_changed(self, gib: float) -> None:
        self._assembler.max_bytes = int(gib * GIB)
        _settings.remember_memory_cap(gib)

    def _on_keep_runs_changed(self, value: int) -> None:
        self._assembler.keep_runs = value  # drops quiet older runs now
        _settings.remember_keep_runs(value)
        self._apply_now()

    def _on_resolution_changed(self, _index: int) -> None:
        self._assembler.downsample = int(self.resolution_combo.currentData())

    def _on_mode_changed(self, _text: str) -> None:
        self._assembler.set_modes({c: combo.currentText() for c, combo in self.mode_combos.items()})

    def _on_clear_run_clicked(self) -> None:
        self.clear(self.chosen_run())

    def clear(self, run: str | None = None) -> None:
        """Drop one run's layers (None: everything streamed) and apply it at once."""
        self._assembler.clear(run)
        self._apply_now()
        if run is None:
            self.show_error("")

    def _apply_now(self) -> None:
        """Show what the assembler just changed (removed layers) without waiting a tick."""
        if self._res.render is not None:
            self._res.render.tick()
        self.refresh_info()

    def _answer(self, token: Any, action: str, do: Callable[[], dict[str, Any]]) -> None:
        """Run a control request on the main thread and always answer the client."""
        listener = self.sender()
        try:
            reply = {"ok": True, **do()}
        except Exception as exc:  # answer the client whatever happens
            log.exception("%s failed", action)
            reply = {"ok": False, "error": f"{action} failed: {exc}"}
        if isinstance(listener, ListenerThread):
            listener.post_reply(token, reply)

    def _on_clear_requested(self, run: str | None, token: Any) -> None:
        def do() -> dict[str, Any]:
            self.clear(run)
            return {"run": run}

        self._answer(token, "clear", do)

    def _on_screenshot_requested(self, path: str, canvas_only: bool, token: Any) -> None:
        def do() -> dict[str, Any]:
            self.viewer.screenshot(path=path, canvas_only=canvas_only, flash=False)
            return {"path": path}

        self._answer(token, "screenshot", do)

    def _on_overview_requested(self, on: bool, token: Any) -> None:
        def do() -> dict[str, Any]:
            if not self.show_overview(on):
                return {"ok": False, "error": NO_PLATE, "active": False}
            return {"active": bool(self._res.overview and self._res.overview.active)}

        self._answer(token, "overview", do)

    def _closes_on_shutdown(self, asked: bool) -> bool:
        return self.owned or (asked and self.launched)

    def _on_shutdown_requested(self, close: bool) -> None:
        """The listener stops by itself once its reply is out; then we may close napari."""
        self._close_when_stopped = self._close_when_stopped or close
        self.state_label.setText("Shutting down…")

    def _rendered_generation(self) -> int:
        render = self._res.render
        return render.rendered_generation if render is not None else 0

    def event(self, e: QEvent | None) -> bool:
        """Leaving the dock (``remove_dock_widget`` reparents us to None) ends the stream."""
        if e is not None and e.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._was_docked = True
            elif self._was_docked:
                self._res.close()
                self._show_stopped()
        return super().event(e)


def _disconnect_all(connections: list[tuple[Any, Callable[..., Any]]]) -> None:
    for signal, slot in reversed(connections):
        with contextlib.suppress(RuntimeError, TypeError, ValueError):
            signal.disconnect(slot)
    connections.clear()
