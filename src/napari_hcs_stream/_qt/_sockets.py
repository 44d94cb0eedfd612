"""The listener's two sockets, data (Receiver, SUB) and control (ControlServer, ROUTER).

Kept apart from the thread class so the listener loop reads as: poll, service, answer. Bound
and closed by the listener thread only (ZeroMQ sockets belong to their thread). Closing
removes the discovery file (the Receiver registered it) and releases every shared-memory
mapping; nothing here ever unlinks a producer's segment.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..control import DEFER, ControlServer, Token
from ..endpoints import endpoint_to_bind, readable
from ..protocol import CONTROL_COMMANDS
from ..receiver import Receiver

log = logging.getLogger(__name__)

#: (command, request, token) -> a reply now, or None to answer later.
Handler = Callable[[str, dict[str, Any], Any], "dict[str, Any] | None"]
#: the protocol's commands plus the viewer's own (``screenshot`` and ``overview``: for
#: unattended demos and plate montages).
COMMANDS = CONTROL_COMMANDS | {"screenshot", "overview"}
#: rejections are logged at most this often (the receiver counts every one).
_ERROR_LOG_EVERY_S = 1.0


class ListenerSockets:
    """Binds both sockets for ``endpoint`` (a name or an address) and services them."""

    def __init__(
        self,
        endpoint: str,
        assembler: Any,
        handler: Handler,
        on_committed: Callable[[], None],
    ) -> None:
        self._handler = handler
        self._assembler = assembler
        self._on_committed = on_committed
        self._errors = 0
        self._logged_at = 0.0
        want = endpoint_to_bind(endpoint)
        self.receiver = Receiver(
            want,
            destination=assembler.destination,
            on_frame=self._on_frame,
            on_torn=assembler.discard,
            on_error=self._on_error,
        )
        self.control = ControlServer(want.control, self._handle, commands=COMMANDS,
                                     on_refused=self.receiver.record_refusal)
        try:
            control_address = self.control.bind()
            bound = self.receiver.bind(control_address)
        except BaseException:
            self.close()
            raise
        self.address = bound.data
        self.control_address = bound.control
        # what each side polls (its socket, and its CURVE gate when there is one), once
        self._data = frozenset(self.receiver.sockets())
        self._control = frozenset(self.control.sockets())
        gate = self.receiver.gate
        #: this viewer's CURVE public key when it admits only authorized producers, else "".
        self.viewer_key = gate.public.decode("ascii") if gate is not None else ""

    # -- callbacks (listener thread) ---------------------------------------------------------
    def _on_frame(self, header: Any, array: Any) -> None:
        self._assembler.commit(header, array)
        self._on_committed()

    def _on_error(self, reason: str) -> None:
        self._errors += 1
        now = time.monotonic()
        if now - self._logged_at >= _ERROR_LOG_EVERY_S:
            self._logged_at = now
            log.info("HCS Stream rejected %d message(s) so far; latest: %s", self._errors, reason)

    def _handle(self, request: dict[str, Any], token: Token) -> Any:
        reply = self._handler(str(request.get("cmd")), request, token)
        return DEFER if reply is None else reply

    # -- the loop's calls --------------------------------------------------------------------
    def sockets(self) -> list[zmq.Socket]:
        """Data, control, and the CURVE gates answering their handshakes (when there are)."""
        return self.receiver.sockets() + self.control.sockets()

    def ready_now(self) -> dict[Any, int]:
        """The sockets with a message waiting, asked without releasing the GIL (a poll
        releases it, and in napari's process getting it back can take milliseconds)."""
        return {sock: zmq.POLLIN for sock in self.sockets() if readable(sock)}

    def service(self, ready: dict[Any, int]) -> None:
        """Handle what is waiting: a batch of frames, then every control request."""
        if not self._data.isdisjoint(ready):
            self.receiver.poll(0)  # answers its gate too
        if not self._control.isdisjoint(ready):
            self.control.handle_pending()

    @property
    def seen(self) -> dict[str, int]:
        """Highest sequence number accounted for per producer (received, dropped, rejected)."""
        return self.receiver.last_seqs()

    def reply(self, token: Any, message: dict[str, Any]) -> None:
        self.control.reply(token, message)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the counts for the widget (safe to hand to another thread)."""
        stats = self.receiver.snapshot()
        producers = stats.pop("producers")
        return {
            "address": self.address,
            "control_address": self.control_address,
            "producers": producers,
            "totals": stats,
            "last_error": stats.get("last_error", ""),
            "errors": self._errors,
        }

    def close(self) -> None:
        """Close both sockets (the receiver also removes the discovery file); idempotent."""
        with contextlib.suppress(Exception):
            self.receiver.close()
        with contextlib.suppress(Exception):
            self.control.close()
