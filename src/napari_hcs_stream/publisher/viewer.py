"""Launch a napari viewer with the plugin listening, or reuse one that is already running.

A viewer is found by endpoint name: it answers ``ping`` on its control address with its
protocol version. Launching is serialised per endpoint with a file lock in the runtime folder,
so two runs starting at once get one viewer. Nothing is ever killed because it holds a port: a
viewer is only ever asked to shut down, over its control channel, and only one we launched
ourselves and that is not persistent.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control import ControlClient
from ..endpoints import Endpoint, resolve_endpoint, runtime_dir
from ..protocol import PROTOCOL_VERSION

log = logging.getLogger("napari_hcs_stream")

#: set in a launched viewer's environment: its widget starts listening at once, and a
#: ``shutdown`` request closes napari (the process belongs to the pipeline that launched it).
ENV_AUTOSTART = "NAPARI_HCS_STREAM_AUTOSTART"
ENV_OWNED = "NAPARI_HCS_STREAM_OWNED"
ENV_ENDPOINT = "NAPARI_HCS_STREAM_ENDPOINT"


class ViewerError(RuntimeError):
    """The viewer could not be started or did not answer; the text says where to look."""


@dataclass(frozen=True)
class ViewerInfo:
    endpoint: Endpoint
    pid: int | None
    launched: bool
    version: str


class ViewerManager:
    """Make sure a napari viewer listens on ``endpoint``; launch one only when none answers.

    ``persistent`` viewers outlive the run (the next run reuses them); a non-persistent viewer
    that this manager launched is shut down by :meth:`stop_viewer`.
    """

    def __init__(
        self,
        endpoint: str = "default",
        *,
        persistent: bool = True,
        startup_timeout: float = 90.0,
        ping_timeout: float = 1.0,
        python: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        server_key: str | bytes | None = None,
    ) -> None:
        self.endpoint_spec = endpoint
        #: the viewer's CURVE public key for a viewer elsewhere (see ``Publisher``)
        self.server_key = server_key
        self.persistent = persistent
        self.startup_timeout = startup_timeout
        self.ping_timeout = ping_timeout
        self.python = python or sys.executable
        self.extra_env = dict(extra_env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._info: ViewerInfo | None = None

    # -- discovery ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> Endpoint:
        return resolve_endpoint(self.endpoint_spec)

    def ping(self) -> dict[str, Any] | None:
        """The viewer's ping reply if one answers with a protocol this side speaks, else None."""
        return self._ping(self.endpoint)

    def _ping(self, endpoint: Endpoint) -> dict[str, Any] | None:
        reply = ControlClient(endpoint.control, server_key=self.server_key).ping(
            timeout=self.ping_timeout)
        if not reply or not reply.get("ok"):
            return None
        proto = reply.get("protocol") or [0, 0]
        if int(proto[0]) != PROTOCOL_VERSION[0]:
            log.warning(
                "viewer on %s speaks protocol %s, this pipeline speaks %s.x: not reusing it",
                endpoint.control, proto, PROTOCOL_VERSION[0],
            )
            return None
        return reply if reply.get("ready", True) else None

    @property
    def is_running(self) -> bool:
        return self.ping() is not None

    @property
    def log_file(self) -> Path:
        return runtime_dir() / f"{_safe(self.endpoint_spec)}.viewer.log"

    # -- lifecycle ---------------------------------------------------------------------------
    def start_viewer(self) -> ViewerInfo:
        """Reuse a viewer answering on the endpoint, or launch one and wait until it listens."""
        reply = self.ping()
        if reply is None:
            with self._launch_lock():
                reply = self.ping()  # another run may have launched it while we waited
                if reply is None:
                    return self._launch()
        self._info = ViewerInfo(self.endpoint, reply.get("pid"), False, str(reply.get("version")))
        log.info("reusing the napari viewer on %s (pid %s)", self.endpoint.control, self._info.pid)
        return self._info

    def _launch(self) -> ViewerInfo:
        if "://" in self.endpoint_spec and not self.endpoint_spec.startswith("ipc://"):
            host = self.endpoint_spec.split("://", 1)[1].rsplit(":", 1)[0]
            if host not in {"127.0.0.1", "localhost", "[::1]", "*", "0.0.0.0"}:
                raise ViewerError(
                    f"no viewer answers on {self.endpoint_spec} and it is not on this machine: "
                    "start `napari-hcs-stream viewer --endpoint ...` there first"
                )
        env = dict(os.environ)
        env.update(self.extra_env)
        env[ENV_AUTOSTART] = "1"
        env[ENV_ENDPOINT] = self.endpoint_spec
        if not self.persistent:
            env[ENV_OWNED] = "1"
        cmd = [self.python, "-m", "napari_hcs_stream", "viewer", "--endpoint", self.endpoint_spec]
        logf = self.log_file
        log.info("launching napari: %s (log: %s)", " ".join(cmd), logf)
        with logf.open("wb") as out:
            # A new session: a persistent viewer outlives the pipeline's process group.
            self._process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise ViewerError(
                    f"napari exited with code {code} before it was ready; see {logf}:\n"
                    + _tail(logf)
                )
            reply = self.ping()
            if reply is not None:
                self._info = ViewerInfo(
                    self.endpoint, self._process.pid, True, str(reply.get("version"))
                )
                return self._info
        raise ViewerError(
            f"napari did not start listening on {self.endpoint.control} within "
            f"{self.startup_timeout:.0f} s; see {logf}:\n" + _tail(logf)
        )

    @contextlib.contextmanager
    def _launch_lock(self) -> Iterator[None]:
        lock_path = runtime_dir() / f"{_safe(self.endpoint_spec)}.launch.lock"
        with lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def request(self, cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
        return ControlClient(self.endpoint.control, server_key=self.server_key).request(
            cmd, timeout=timeout, **args)

    def flush(self, until: Mapping[str, int], timeout: float = 60.0) -> dict[str, Any]:
        """Return once everything the producers in ``until`` sent is in the viewer's layers."""
        try:
            return self.request("flush", timeout=timeout + 2.0, until=dict(until),
                                timeout_s=timeout)
        except TimeoutError as exc:
            log.warning("flush: %s", exc)
            return {"ok": False, "error": str(exc)}

    def clear(self, run: str | None = None) -> dict[str, Any]:
        return self.request("clear", run=run)

    def state(self) -> dict[str, Any]:
        return self.request("state")

    def overview(self, on: bool = True, timeout: float = 60.0) -> dict[str, Any]:
        """Show (or end) the viewer's plate overview, every well side by side: ``{"ok": true,
        "active": ...}``, or ``ok: false`` with the reason when it has no plate to lay out."""
        return self.request("overview", timeout=timeout, on=on)

    def screenshot(self, path: str | Path, canvas_only: bool = False,
                   timeout: float = 60.0) -> dict[str, Any]:
        """Save a screenshot of the viewer to ``path`` (absolute; .png, .jpg or .tif, in a
        folder that exists): ``{"ok": true, "path": ...}`` or ``ok: false`` with the reason."""
        return self.request("screenshot", timeout=timeout, path=str(path),
                            canvas_only=canvas_only)

    def stop_viewer(self, *, force: bool = False, timeout: float = 20.0) -> None:
        """Shut the viewer down unless it is persistent (``force``: shut it down anyway).

        Only a viewer that answers our control channel is asked; nothing is ever killed.
        """
        if self.persistent and not force:
            return
        try:
            self.request("shutdown", timeout=5.0, close=True)
        except TimeoutError:
            log.warning("the viewer on %s did not answer shutdown", self.endpoint.control)
            return
        if self._process is not None:
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("napari (pid %s) is still closing after %.0f s", self._process.pid,
                            timeout)
        else:
            deadline = time.monotonic() + timeout
            while self.is_running and time.monotonic() < deadline:
                time.sleep(0.1)

    def __enter__(self) -> ViewerManager:
        self.start_viewer()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_viewer()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
