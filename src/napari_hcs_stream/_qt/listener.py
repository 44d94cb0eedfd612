"""The listener thread: receives frames and control requests off the Qt main thread.

This is the only place where work hops between threads, and it hops in exactly three ways:

* pixels go straight from the wire (or a producer's shared-memory slot) into the assembler's
  stacks, in this thread, with no Qt signal per frame;
* this thread tells the main thread things through queued Qt signals: a status snapshot at most
  :data:`STATUS_HZ` times a second, a clear request, a shutdown request;
* the main thread answers deferred control requests through :meth:`ListenerThread.post_reply`,
  a thread-safe queue this thread drains (ZeroMQ sockets belong to the thread that made them).

Sockets are created inside :meth:`run` and closed there, so a thread that stops leaves nothing
bound, and the poll timeout (:data:`POLL_MS`) bounds how long a stop request waits.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from qtpy.QtCore import QThread, Signal

from .. import __version__
from ..protocol import PROTOCOL_VERSION
from ._flush import FlushBook
from ._sockets import ListenerSockets

log = logging.getLogger(__name__)

POLL_MS = 50
STATUS_HZ = 10.0
#: after a ``shutdown`` request, keep serving this long so its reply leaves the socket.
SHUTDOWN_GRACE_S = 0.2
#: a stop that takes longer than this is reported (the thread is stuck in a C call).
STOP_TIMEOUT_S = 3.0


class CommitCounter:
    """Frames committed into the assembler and how busy the listener is; the listener writes,
    the render tick reads.

    One per widget, shared by successive listeners, so a restart never runs the count
    backwards under a pending flush. A plain int written by one thread needs no lock.
    """

    def __init__(self) -> None:
        self.value = 0
        #: smoothed share of the listener's time spent receiving (1.0: saturated).
        self.load = 0.0

    def get(self) -> int:
        return self.value

    def get_load(self) -> float:
        return self.load


class ListenerThread(QThread):
    """Owns the data and control sockets for one endpoint while it runs.

    ``rendered`` returns the render tick's ``rendered_generation`` (read from this thread: an
    int attribute, so no lock is needed) and lets ``flush`` answer once frames are on screen.
    """

    #: a :class:`ListenerStatus`-like dict snapshot, at most STATUS_HZ per second.
    status = Signal(object)
    #: (data address, control address) once both sockets are bound.
    bound = Signal(str, str)
    #: the listener could not start or died; the text says why and what to do.
    failed = Signal(str)
    #: a control client asked to clear ``run`` (None: everything); answer with post_reply(token).
    clear_requested = Signal(object, object)
    #: a control client asked us to shut down; True: close napari too.
    shutdown_requested = Signal(bool)
    #: a control client asked for a screenshot: (path, canvas_only, token); post_reply(token).
    screenshot_requested = Signal(str, bool, object)
    #: a control client asked for the plate overview on (True) or off: (on, token).
    overview_requested = Signal(bool, object)

    def __init__(
        self,
        endpoint: str,
        assembler: Any,
        *,
        counter: CommitCounter | None = None,
        rendered: Callable[[], int] = lambda: 0,
        close_on_shutdown: Callable[[bool], bool] = lambda _asked: False,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        self._assembler = assembler
        self._rendered = rendered
        self._close_on_shutdown = close_on_shutdown
        self._stop = threading.Event()
        self._stop_at = float("inf")  # a shutdown request stops the loop at this time
        self._replies: queue.SimpleQueue[tuple[Any, dict[str, Any]]] = queue.SimpleQueue()
        self._transport: ListenerSockets | None = None
        self._flushes = FlushBook()
        self.counter = counter if counter is not None else CommitCounter()
        self.address = ""
        self.control_address = ""
        #: the viewer's CURVE public key while it admits only authorized producers, else "".
        self.viewer_key = ""
        self.setObjectName(f"hcs-stream-listener-{endpoint}")

    # -- main-thread API -------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Ask the thread to stop and wait for it (bounded); True if it has stopped."""
        self._stop.set()
        if not self.isRunning():
            return True
        stopped = bool(self.wait(int(timeout_s * 1000)))
        if not stopped:
            log.error("the HCS Stream listener did not stop within %.1f s", timeout_s)
        return stopped

    def post_reply(self, token: Any, message: dict[str, Any]) -> None:
        """Answer a deferred control request from any thread."""
        self._replies.put((token, message))

    # -- the thread ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            transport = ListenerSockets(
                self.endpoint, self._assembler, self._handle_control, self._on_committed
            )
        except Exception as exc:  # bind errors, bad addresses: the user must see them
            log.warning("cannot listen on %r: %s", self.endpoint, exc)
            self.failed.emit(f"cannot listen on {self.endpoint!r}: {exc}")
            return
        self._transport = transport
        self.address, self.control_address = transport.address, transport.control_address
        self.viewer_key = transport.viewer_key  # read by the widget when ``bound`` arrives
        self.bound.emit(transport.address, transport.control_address)
        try:
            self._loop(transport)
        except Exception as exc:
            log.exception("the HCS Stream listener failed")
            self.failed.emit(f"the listener stopped: {exc}")
        finally:
            if len(self._flushes):
                self._flushes.fail_all(transport.reply, "the viewer stopped listening")
                time.sleep(0.05)  # let the replies leave before the socket closes
            self._drain_replies(transport)
            transport.close()
            self._transport = None
            self._emit_status(transport, force=True)

    def _loop(self, transport: ListenerSockets) -> None:
        poller = zmq.Poller()
        for sock in transport.sockets():
            poller.register(sock, zmq.POLLIN)
        next_status = 0.0
        while not self._stop.is_set() and time.monotonic() < self._stop_at:
            t0 = time.perf_counter()
            ready = transport.ready_now()  # a backlog is taken without a poll
            if not ready:
                ready = dict(poller.poll(POLL_MS))
            t1 = time.perf_counter()
            transport.service(ready)
            self._measure_load(t1 - t0, time.perf_counter() - t1)
            self._drain_replies(transport)
            if len(self._flushes):
                self._flushes.check(
                    transport.seen, self.counter.value, self._rendered(), transport.reply
                )
            now = time.monotonic()
            if now >= next_status:  # errors included: a flood of bad messages stays at 10 Hz
                self._emit_status(transport)
                next_status = now + 1.0 / STATUS_HZ

    def _measure_load(self, waited: float, worked: float) -> None:
        """Smoothed share of time spent handling messages rather than waiting for them.

        Near 1 the producers send faster than we take frames in: the render tick then
        redraws less often, because the main thread's napari work competes for the GIL.
        Only waits for messages count as waiting: with a backlog the loop takes the next
        batch without polling, so time lost getting the GIL back counts as work.
        """
        total = waited + worked
        if total > 0:
            self.counter.load += 0.05 * (worked / total - self.counter.load)

    def _on_committed(self) -> None:
        self.counter.value += 1

    def _drain_replies(self, transport: ListenerSockets) -> None:
        while True:
            try:
                token, message = self._replies.get_nowait()
            except queue.Empty:
                return
            transport.reply(token, message)

    def _emit_status(self, transport: ListenerSockets, *, force: bool = False) -> None:
        snapshot = transport.snapshot()
        snapshot["committed"] = self.counter.value
        snapshot["listening"] = not force and not self._stop.is_set()
        self.status.emit(snapshot)

    # -- control requests (this thread) ----------------------------------------------------------
    def _handle_control(self, cmd: str, args: dict[str, Any], token: Any) -> dict[str, Any] | None:
        """Answer now (a dict) or later (None: the reply is posted when it is known)."""
        if cmd == "ping":
            return {
                "ok": True,
                "protocol": list(PROTOCOL_VERSION),
                "ready": not self._stop.is_set() and self._stop_at == float("inf"),
                "pid": os.getpid(),
                "app": "napari-hcs-stream",
                "version": __version__,
                "endpoint": self.endpoint,
            }
        if cmd == "state":
            state = dict(self._assembler.state())
            if self._transport is not None:
                state["receiver"] = self._transport.snapshot()
            state["committed"] = self.counter.value
            state["rendered"] = self._rendered()
            return {"ok": True, **state}
        if cmd == "clear":
            self.clear_requested.emit(args.get("run"), token)
            return None
        if cmd == "flush":
            until = args.get("until") or {}
            timeout = args.get("timeout_s", args.get("timeout", 30.0))
            error = self._flushes.add(token, until, timeout)
            if error:
                return {"ok": False, "error": error}
            return None
        if cmd == "screenshot":
            path = args.get("path")
            error = _screenshot_path_error(path)
            if error:
                return {"ok": False, "error": error}
            self.screenshot_requested.emit(str(path), bool(args.get("canvas_only", False)), token)
            return None
        if cmd == "overview":
            on = args.get("on", True)
            if not isinstance(on, bool):
                return {"ok": False, "error": "overview 'on' must be true or false"}
            self.overview_requested.emit(on, token)
            return None
        if cmd == "shutdown":
            close = self._close_on_shutdown(bool(args.get("close", False)))
            self._stop_at = time.monotonic() + SHUTDOWN_GRACE_S
            self.shutdown_requested.emit(close)
            return {"ok": True, "closing": close}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _screenshot_path_error(path: object) -> str | None:
    """Only image files, at an absolute path, in a folder that exists (no guessing)."""
    if not isinstance(path, str) or not Path(path).is_absolute():
        return "screenshot needs 'path': an absolute file path"
    if not path.lower().endswith(_IMAGE_SUFFIXES):
        return f"screenshot 'path' must end with one of {', '.join(_IMAGE_SUFFIXES)}"
    if not Path(path).parent.is_dir():
        return f"screenshot folder {Path(path).parent} does not exist"
    return None
