"""The control channel: JSON request/reply next to the data stream (never pickle).

A viewer binds a ROUTER (:class:`ControlServer`); a client sends one JSON request on a fresh
REQ socket (:class:`ControlClient`) and waits with a deadline. A handler may answer later
(:data:`DEFER`): ``flush`` waits until frames are received and rendered, and must not stop the
same thread from receiving those frames meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from . import __version__
from .auth import Gatekeeper, bind_server, secure_client, server_key_for
from .endpoints import prepare_ipc_bind, remove_ipc_file
from .protocol import (
    CONTROL_COMMANDS,
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    decode_control,
    encode_control,
)

if TYPE_CHECKING:
    from .receiver import Receiver

log = logging.getLogger("napari_hcs_stream")


class _Defer:
    def __repr__(self) -> str:
        return "DEFER"


#: returned by a handler that will answer later with :meth:`ControlServer.reply`.
DEFER: Any = _Defer()


@dataclass(frozen=True)
class Token:
    """Where a reply goes: the ROUTER envelope of the request."""

    envelope: tuple[bytes, ...]


Handler = Callable[[dict[str, Any], Token], Any]


def error_reply(message: str, **extra: Any) -> dict[str, Any]:
    return {"hcs": list(PROTOCOL_VERSION), "ok": False, "error": message, **extra}


class ControlServer:
    """A ROUTER socket answering control requests through ``handler``.

    Create and :meth:`bind` it in the thread that polls it; add :attr:`socket` to the same
    ``zmq.Poller`` as the receiver's socket and call :meth:`handle_pending` when readable.
    """

    def __init__(self, address: str, handler: Handler, *, context: zmq.Context | None = None,
                 limits: Limits = DEFAULT_LIMITS, batch: int = 64,
                 commands: frozenset[str] = CONTROL_COMMANDS, auth: bool | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.address = address
        #: require CURVE (None: when the address is TCP beyond loopback); see ``Receiver``.
        self.auth = auth
        #: told (besides the log) about clients the CURVE gate refused, naming their key; the
        #: reason starts with ``control:`` (a viewer passes its receiver's ``record_refusal``,
        #: so refusals on either socket are counted and shown alike)
        self.on_refused = on_refused
        self.gate: Gatekeeper | None = None
        self.handler = handler
        self.commands = commands  # the protocol's five, plus any the application adds
        self.limits = limits
        self.batch = batch
        self._own_context = context is None
        self._context = context
        self.socket: zmq.Socket | None = None
        self._inode: int | None = None

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(f"control: {reason}")

    def bind(self) -> str:
        """Bind (in the calling thread) and return the real address (OS-chosen TCP port)."""
        prepare_ipc_bind(self.address)
        ctx = self._context = self._context or zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        self.gate, self.address, self._inode = bind_server(
            ctx, sock, self.address, self.auth, self._refused, "bind the control address")
        self.socket = sock
        return self.address

    def sockets(self) -> list[zmq.Socket]:
        """What to poll: the control socket, and the CURVE gate when there is one."""
        gate = self.gate.socket if self.gate is not None else None
        return [s for s in (self.socket, gate) if s is not None]

    def handle_pending(self) -> int:
        """Answer every request already waiting (up to ``batch``); never blocks."""
        sock = self.socket
        assert sock is not None, "bind() first"
        if self.gate is not None:
            self.gate.handle_pending()
        n = 0
        while n < self.batch:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            if len(frames) < 2:
                continue  # not a routed request: nobody to answer
            token = Token(tuple(frames[:-1]))
            self._answer(frames[-1], token)
        return n

    def serve_once(self, timeout_ms: int) -> int:
        assert self.socket is not None, "bind() first"
        return self.handle_pending() if zmq.zmq_poll(
            [(s, zmq.POLLIN) for s in self.sockets()], timeout_ms) else 0

    def _answer(self, payload: bytes, token: Token) -> None:
        try:
            request = decode_control(payload, limits=self.limits, commands=self.commands)
        except ProtocolError as exc:
            log.warning("bad control request: %s", exc)
            self.reply(token, error_reply(str(exc)))
            return
        try:
            reply = self.handler(request, token)
        except Exception as exc:
            log.exception("control command %r failed", request.get("cmd"))
            reply = error_reply(f"{request['cmd']} failed: {type(exc).__name__}: {exc}")
        if reply is not DEFER:
            self.reply(token, reply)

    def reply(self, token: Token, message: Mapping[str, Any]) -> None:
        """Send a (possibly deferred) reply; a client that went away is not an error."""
        sock = self.socket
        if sock is None:
            return
        try:
            sock.send_multipart([*token.envelope, encode_control(dict(message))], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("control reply not sent: %s", exc)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
            remove_ipc_file(self.address, self._inode)
        if self.gate is not None:
            self.gate.close()
            self.gate = None
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None


class ControlClient:
    """Ask a viewer something; a fresh REQ socket per request, so a lost reply never wedges."""

    def __init__(self, address: str, *, context: zmq.Context | None = None,
                 server_key: str | bytes | None = None) -> None:
        self.address = address
        self._context = context
        #: the viewer's CURVE public key (:func:`.auth.server_key_for`; for TCP beyond loopback
        #: with none given or in the environment: this machine's own, as for a viewer run by
        #: this user here), or None.
        self.server_key = server_key_for(address, server_key, this_machine=True)

    def request(self, cmd: str, timeout: float = 2.0, **args: Any) -> dict[str, Any]:
        """Send ``{"cmd": cmd, **args}``; the reply, or TimeoutError after ``timeout`` s."""
        return self.exchange({"cmd": cmd, **args}, timeout)

    def exchange(self, message: Mapping[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        """Send one request object as is (any argument names) and wait for its reply."""
        ctx = self._context or zmq.Context.instance()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.server_key is not None:
                secure_client(sock, self.server_key)
            sock.connect(self.address)
            sock.send(encode_control(dict(message)))
            if not sock.poll(int(timeout * 1000)):
                hint = ("; with CURVE: is the viewer's key right, and this machine's key "
                        "authorized there?" if self.server_key is not None else "")
                raise TimeoutError(
                    f"no answer to {message.get('cmd')!r} from {self.address} within "
                    f"{timeout:g} s (is the viewer running and listening{hint})"
                )
            return decode_control(sock.recv(), reply=True)
        finally:
            sock.close(linger=0)

    def ping(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The viewer's ping reply, or None if nothing sensible answers in time."""
        try:
            return self.request("ping", timeout=timeout)
        except (TimeoutError, ProtocolError, zmq.ZMQError):
            return None

    def flush(self, until: Mapping[str, int], timeout: float = 60.0) -> dict[str, Any]:
        """Return once the viewer received and rendered each producer's frames up to a seq."""
        return self.exchange({"cmd": "flush", "until": dict(until), "timeout": timeout},
                             timeout + 2.0)


@dataclass
class _Flush:
    token: Token
    until: dict[str, int]
    deadline: float
    timeout: float


class ReceiverControl:
    """The five commands answered from a :class:`Receiver`; hooks let a GUI add its part.

    ``state()`` adds to the ``state`` reply, ``clear(run)`` clears layers, ``rendered(until)``
    says whether what was received up to ``until`` is on screen (default: received is enough),
    ``shutdown(request)`` closes the application. Call :meth:`tick` after every poll so
    deferred flushes are answered promptly.
    """

    def __init__(
        self,
        receiver: Receiver,
        *,
        state: Callable[[], dict[str, Any]] | None = None,
        clear: Callable[[str | None], dict[str, Any] | None] | None = None,
        rendered: Callable[[dict[str, int]], bool] | None = None,
        shutdown: Callable[[dict[str, Any]], None] | None = None,
        ready: Callable[[], bool] | None = None,
        app: str = "napari-hcs-stream",
    ) -> None:
        self.receiver = receiver
        self._state, self._clear, self._rendered = state, clear, rendered
        self._shutdown, self._ready = shutdown, ready
        self.app = app
        self.pending: list[_Flush] = []

    def __call__(self, request: dict[str, Any], token: Token) -> Any:
        cmd = request["cmd"]
        ok = {"hcs": list(PROTOCOL_VERSION), "ok": True}
        if cmd == "ping":
            return {**ok, "protocol": list(PROTOCOL_VERSION), "ready": bool(
                self._ready() if self._ready else True), "pid": os.getpid(), "app": self.app,
                "version": __version__}
        if cmd == "state":
            return {**ok, "stats": self.receiver.snapshot(),
                    **(self._state() if self._state else {})}
        if cmd == "clear":
            run = request.get("run")
            if run is not None and not isinstance(run, str):
                return error_reply(f"'run' must be a run id or null, got {run!r}")
            return {**ok, "run": run, **((self._clear(run) or {}) if self._clear else {})}
        if cmd == "shutdown":
            if self._shutdown is None:
                return error_reply("this viewer cannot be shut down remotely")
            self._shutdown(request)
            return {**ok, "closing": True}
        return self._flush(request, token)

    def _flush(self, request: dict[str, Any], token: Token) -> Any:
        until = request.get("until", {})
        if not (isinstance(until, dict) and all(
                isinstance(k, str) and type(v) is int and v >= -1 for k, v in until.items())):
            return error_reply("'until' must map producer ids to sequence numbers")
        timeout = request.get("timeout", request.get("timeout_s", 60.0))
        if type(timeout) not in (int, float) or not 0 <= timeout <= 86400:
            return error_reply(f"'timeout' must be seconds between 0 and 86400, got {timeout!r}")
        self.pending.append(_Flush(token, until, time.monotonic() + timeout, timeout))
        return DEFER

    def tick(self, server: ControlServer) -> None:
        """Answer the flushes that are complete or out of time."""
        if not self.pending:
            return
        now = time.monotonic()
        waiting = []
        for f in self.pending:
            if self.receiver.reached(f.until) and (
                    self._rendered is None or self._rendered(f.until)):
                server.reply(f.token, {"ok": True, "received": self.receiver.last_seqs(f.until)})
            elif now >= f.deadline:
                missing = {p: s for p, s in f.until.items()
                           if not self.receiver.reached({p: s})}
                server.reply(f.token, error_reply(
                    f"flush timed out after {f.timeout:g} s; still waiting for "
                    f"{missing or 'rendering'}", timeout=True,
                    received=self.receiver.last_seqs(f.until)))
            else:
                waiting.append(f)
        self.pending = waiting


def serve(receiver: Receiver, server: ControlServer, stop: threading.Event, *,
          timeout_ms: int = 50) -> None:
    """Poll the receiver and the control server together until ``stop`` is set.

    Both must have been bound in this thread. The Qt listener thread does the same.
    """
    assert receiver.socket is not None and server.socket is not None, "bind() both first"
    poller = zmq.Poller()
    data, control = receiver.sockets(), server.sockets()
    for sock in data + control:
        poller.register(sock, zmq.POLLIN)
    tick = getattr(server.handler, "tick", None)
    while not stop.is_set():
        events = dict(poller.poll(timeout_ms))
        if any(s in events for s in data):
            receiver.poll(0)
        if any(s in events for s in control):
            server.handle_pending()
        if tick is not None:
            tick(server)
