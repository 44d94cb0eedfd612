"""The viewer's end of the data stream: bind SUB, decode, validate, copy into place.

Pixels are copied exactly once, straight into the array the ``destination`` callback returns
(a slice of a preallocated stack), from the producer's shared-memory slot or from the message
frame. A bad message is counted, logged and reported through ``on_error``; it never stops the
receiver and never touches earlier data.

Threading: create, :meth:`Receiver.bind`, :meth:`Receiver.poll` and :meth:`Receiver.close` in
one thread (ZeroMQ sockets are not thread-safe). Each receiver owns a ZeroMQ context unless
one is passed in, so closing it never waits on anybody else's sockets. :attr:`Receiver.stats`
may be read from any thread (use :meth:`ReceiverStats.as_dict` for a consistent copy;
:meth:`Receiver.snapshot`, in the receiver's thread, also reads how long producers waited).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import zmq

from ._context import data_context
from ._gilrecv import HeaderReceiver, OversizePart, header_receiver
from .auth import Gatekeeper, bind_server
from .endpoints import (
    Endpoint,
    endpoint_to_bind,
    prepare_ipc_bind,
    readable,
    register_endpoint,
    remove_ipc_file,
    unregister_endpoint,
)
from .protocol import (
    DEFAULT_LIMITS,
    Bye,
    FrameHeader,
    HeaderDecoder,
    Limits,
    ProtocolError,
    ShmRef,
)
from .ring import RingReader, TornRead, copy_pixels, sweep_stale_segments

log = logging.getLogger("napari_hcs_stream")

#: the producer bucket for messages too broken to say who sent them.
UNKNOWN = "unknown"
#: producers counted one by one; beyond this, newcomers share the ``unknown`` bucket
MAX_PRODUCERS = 4096
#: parts of one message kept (the header and a pixel frame; more are read and dropped)
MAX_PARTS = 8
_EVENTS, _POLLIN, _NOBLOCK = zmq.EVENTS, int(zmq.POLLIN), zmq.NOBLOCK  # enum members: fastest
_zmq_poll = zmq.zmq_poll  # one call, no Poller object per wait (Socket.poll builds one)

Destination = Callable[[FrameHeader], "np.ndarray | None"]
FrameCallback = Callable[[FrameHeader, np.ndarray], Any]


@dataclass
class ProducerStats:
    """What one producer sent; ``dropped`` counts sequence numbers that never arrived."""

    received: int = 0
    dropped: int = 0
    torn: int = 0
    rejected: int = 0
    bytes: int = 0
    last_seq: int = -1
    last_error: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    closed: bool = False
    #: seconds this producer has waited for a free slot in its shared-memory ring, i.e. been
    #: held back by this receiver (local producers; brought up to date by
    #: :meth:`Receiver.snapshot`).
    waited_s: float = 0.0


@dataclass
class ReceiverStats:
    """Totals over every producer, and each producer's own counts."""

    received: int = 0
    dropped: int = 0
    torn: int = 0
    rejected: int = 0
    bytes: int = 0
    last_error: str = ""
    producers: dict[str, ProducerStats] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        producers = list(self.producers.items())  # atomic under the GIL
        return {"received": self.received, "dropped": self.dropped, "torn": self.torn,
                "rejected": self.rejected, "bytes": self.bytes, "last_error": self.last_error,
                "producers": {name: asdict(p) for name, p in producers}}


class Receiver:
    """Binds the data address and turns messages into arrays in their final place.

    ``keep_gil``: receive headers without releasing the GIL (:mod:`._gilrecv`). By default
    (None) a receiver bound in a background thread does, since it shares the GIL with a main
    thread that has work of its own (napari's): giving the GIL away for a microsecond's
    receive can cost milliseconds there. A receiver in the main thread usually has the
    process to itself, and pyzmq's receive is about a microsecond cheaper.

    ``auth``: require CURVE (:mod:`.auth`): only producers whose key is authorized get in. By
    default (None) required exactly when the address is TCP beyond loopback. The handshakes
    are answered by :attr:`gate`, polled with the data socket; a refused producer is counted
    as rejected (producer ``unknown``) with the key to authorize.
    """

    #: the default for receivers not told otherwise (None: decided by the binding thread)
    keep_gil: bool | None = None

    def __init__(
        self,
        endpoint: str | Endpoint = "default",
        *,
        destination: Destination | None = None,
        on_frame: FrameCallback | None = None,
        on_torn: FrameCallback | None = None,
        on_error: Callable[[str], Any] | None = None,
        limits: Limits | None = DEFAULT_LIMITS,
        register: bool = True,
        rcvhwm: int = 10000,
        batch: int = 256,
        context: zmq.Context | None = None,
        keep_gil: bool | None = None,
        auth: bool | None = None,
    ) -> None:
        self.endpoint_spec = endpoint
        self.auth = auth
        self.gate: Gatekeeper | None = None
        self.endpoint: Endpoint | None = None
        self.destination = destination
        self.on_frame = on_frame
        self.on_torn = on_torn
        self.on_error = on_error
        self.limits = limits or DEFAULT_LIMITS
        self.register = register
        self.rcvhwm = rcvhwm
        self.batch = batch
        if keep_gil is not None:
            self.keep_gil = keep_gil
        self.stats = ReceiverStats()
        self.socket: zmq.Socket | None = None
        self._poll_items: list[tuple[zmq.Socket, int]] = []
        self._take_header: HeaderReceiver | None = None
        self._context = context
        self._own_context = context is None
        self._reader = RingReader()
        self._segments: dict[str, set[str]] = {}
        self._waited_before: dict[str, int] = {}  # ns waited on a producer's earlier rings
        self._registered = False
        self._inode: int | None = None
        self._dtypes: dict[str, tuple[np.dtype, np.dtype]] = {}
        self._decoder = HeaderDecoder(self.limits)

    # -- lifecycle ----------------------------------------------------------------------------
    def bind(self, control_address: str | None = None) -> Endpoint:
        """Bind in the calling thread; ``control_address``: the bound control server's address.

        Returns the endpoint with real addresses (an OS-chosen TCP port filled in), which is
        also written to the discovery file when ``register`` is set.
        """
        want = endpoint_to_bind(self.endpoint_spec)
        prepare_ipc_bind(want.data)
        ctx = self._context = self._context or data_context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.gate, data, self._inode = bind_server(ctx, sock, want.data, self.auth,
                                                   self.record_refusal, "listen on")
        self.socket = sock
        self._poll_items = [(sock, zmq.POLLIN)]
        if self.gate is not None and self.gate.socket is not None:
            self._poll_items.append((self.gate.socket, zmq.POLLIN))
        keep = self.keep_gil
        if keep is None:
            keep = threading.current_thread() is not threading.main_thread()
        if keep:
            self._take_header = header_receiver(sock, self.limits.max_header_bytes + 1)
        self.endpoint = Endpoint(want.name, data, control_address or want.control)
        if self.gate is not None:
            log.info("listening on %s with CURVE: %d producer key(s) admitted", data,
                     len(self.gate.allowed))
        swept = sweep_stale_segments()
        if swept:
            log.info("removed shared memory left by dead producers: %s", ", ".join(swept))
        if self.register and "://" not in want.name:
            register_endpoint(self.endpoint)
            self._registered = True
        return self.endpoint

    def close(self) -> None:
        """Close the socket, release every mapping, remove our discovery file; idempotent."""
        if self._take_header is not None:
            self._take_header.close()
            self._take_header = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
            self._poll_items = []
            if self.endpoint is not None:
                remove_ipc_file(self.endpoint.data, self._inode)
        for producer, names in list(self._segments.items()):
            self._forget_segments(producer, names)  # keeps what they waited in the counts
        self._reader.close()
        self._segments.clear()
        if self._registered and self.endpoint is not None:
            unregister_endpoint(self.endpoint.name)
            self._registered = False
        if self.gate is not None:
            self.gate.close()
            self.gate = None
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None

    def sockets(self) -> list[zmq.Socket]:
        """What to poll: the data socket, and the CURVE gate when there is one."""
        return [sock for sock, _events in self._poll_items]

    def record_refusal(self, reason: str) -> None:
        """A connection a CURVE gate refused (wrong or unknown key), this receiver's or its
        control server's: counted as a rejection (producer ``unknown``) and shown."""
        self._reject(UNKNOWN, reason, None)

    def __enter__(self) -> Receiver:
        self.bind()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- receiving ----------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0) -> int:
        """Wait up to ``timeout_ms`` for a message, then handle all waiting (up to ``batch``).

        With ``timeout_ms=0`` (the socket is already known readable, e.g. from a Poller) it
        goes straight to receiving.

        A receiver that keeps the GIL (``keep_gil``) takes headers through
        :mod:`._gilrecv`: in napari's process every release can cost the listener up to the
        interpreter's switch interval. Otherwise pyzmq receives, with as few calls per message
        as it can (each costs microseconds next to a 512x512 frame's 40 us copy): the header
        comes as a ``zmq.Frame``, whose ``more`` flag saves asking ``ZMQ_RCVMORE``, and
        ``ZMQ_EVENTS`` is asked only before a second and later message (a failed receive,
        ``zmq.Again``, would cost more still). Pixel frames always come through pyzmq,
        zero-copy.
        """
        sock = self.socket
        assert sock is not None, "bind() first"
        if timeout_ms and not _zmq_poll(self._poll_items, timeout_ms):
            return 0
        gate = self.gate
        if gate is not None and gate.socket is not None and readable(gate.socket):
            gate.handle_pending()
        take = self._take_header
        if take is not None and take.capacity <= self.limits.max_header_bytes:  # limits grew
            take.close()
            take = self._take_header = header_receiver(sock, self.limits.max_header_bytes + 1)
        recv, option = sock.recv, sock.getsockopt
        n = 0
        while n < self.batch:
            if take is not None:
                try:
                    got = take()
                except OversizePart as oversize:  # over the header limit: its bytes are gone
                    self._drain_parts(oversize.more)
                    self._reject(UNKNOWN, f"header is {oversize.size} bytes, more than the "
                                 f"limit of {self.limits.max_header_bytes}", None)
                    n += 1
                    continue
                if got is None:
                    break
                frames: list[Any] = [got[0]]
                more = got[1]
            else:
                if n and not cast(int, option(_EVENTS)) & _POLLIN:
                    break
                try:
                    head = recv(_NOBLOCK, copy=False)
                except zmq.Again:  # readiness was stale (another reader, a spurious wake-up)
                    break
                frames = [head.bytes]  # the small header, as bytes
                more = head.more
            while more:  # the rest of a message is there already
                part = recv(0, copy=False)  # pixels: no second copy
                more = part.more
                if len(frames) < MAX_PARTS:
                    frames.append(part)
            self.handle(frames)
            n += 1
        return n

    def _drain_parts(self, more: bool) -> None:
        """Receive and drop the rest of a message."""
        sock = self.socket
        assert sock is not None
        while more:
            more = sock.recv(0, copy=False).more

    def handle(self, frames: list[Any]) -> bool:
        """One message; True when a frame was copied into place (or a Bye was taken)."""
        head = frames[0]
        raw = head.bytes if isinstance(head, zmq.Frame) else head
        decoder = self._decoder
        if decoder.limits is not self.limits:  # limits replaced: forget what was validated
            decoder = self._decoder = HeaderDecoder(self.limits)
        try:
            msg = decoder.decode(raw, len(frames))
        except ProtocolError as exc:
            self._reject(exc.producer or UNKNOWN, str(exc), exc.seq)
            return False
        if isinstance(msg, Bye):
            self._bye(msg)
            return True
        return self._frame(msg, frames)

    def _producer(self, name: str) -> ProducerStats:
        producers = self.stats.producers
        ps = producers.get(name)
        now = time.time()
        if ps is None and len(producers) >= MAX_PRODUCERS:  # a flood of made-up names
            ps = producers.get(UNKNOWN)
        if ps is None:
            ps = producers[name if len(producers) < MAX_PRODUCERS else UNKNOWN] = ProducerStats(
                first_seen=now)
        ps.last_seen = now
        return ps

    def _advance(self, ps: ProducerStats, seq: int) -> None:
        gap = seq - ps.last_seq - 1
        if gap > 0:
            ps.dropped += gap
            self.stats.dropped += gap
        ps.last_seq = seq  # an older seq means the producer restarted: count from there

    def _frame(self, h: FrameHeader, frames: list[Any]) -> bool:
        # the per-frame path: plain locals, no helper calls unless something is wrong
        stats = self.stats
        producer = h.producer
        ps = stats.producers.get(producer)
        if ps is None:
            ps = self._producer(producer)
        else:
            ps.last_seen = time.time()
        seq = h.seq
        if seq != ps.last_seq + 1:
            self._advance(ps, seq)
        else:
            ps.last_seq = seq
        dtypes = self._dtypes.get(h.dtype)
        if dtypes is None:
            native = np.dtype(h.dtype)
            dtypes = self._dtypes[h.dtype] = (native, native.newbyteorder("<"))
        shape = h.shape
        destination = self.destination
        try:
            dest = destination(h) if destination is not None else None
        except Exception as exc:
            return self._reject(producer, f"destination failed: {type(exc).__name__}: {exc}",
                                seq, ps)
        if dest is None:
            dest = np.empty(shape, dtypes[0])
        elif not (type(dest) is np.ndarray and dest.shape == shape
                  and dest.dtype == dtypes[0] and dest.flags.writeable):
            return self._reject(producer, f"destination for {h.source} is not a writable "
                                f"{h.dtype} array of shape {shape}: got {_describe(dest)}",
                                seq, ps)
        pixels = h.pixels
        nbytes = dest.nbytes
        try:
            if isinstance(pixels, ShmRef):
                self._reader.copy_into(pixels, dest, dtypes[1])
                segs = self._segments.get(producer)
                if segs is None or pixels.segment not in segs:
                    self._new_segment(producer, pixels.segment)
            else:
                frame = frames[pixels.index]
                buf = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
                if buf.nbytes != nbytes:
                    raise ProtocolError(f"frame {pixels.index} holds {buf.nbytes} bytes but "
                                        f"dtype {h.dtype} and shape {list(shape)} need "
                                        f"{nbytes}")
                copy_pixels(dest, np.frombuffer(buf, dtypes[1]).reshape(shape))
        except TornRead as exc:
            ps.torn += 1
            stats.torn += 1
            log.debug("torn frame %s #%d: %s", producer, seq, exc)
            if self.on_torn is not None:
                self._call(self.on_torn, h, dest, ps)
            return False
        except (ProtocolError, ValueError) as exc:
            return self._reject(producer, str(exc), seq, ps)
        ps.received += 1
        ps.bytes += nbytes
        stats.received += 1
        stats.bytes += nbytes
        on_frame = self.on_frame
        if on_frame is not None:
            try:
                on_frame(h, dest)
            except Exception as exc:
                return self._callback_failed(on_frame, h, exc, ps)
        return True

    def _new_segment(self, producer: str, segment: str) -> None:
        """A producer only replaces its ring once nothing is in flight: drop the old ones."""
        self._forget_segments(producer, self._segments.get(producer, ()))
        self._segments[producer] = {segment}

    def _forget_segments(self, producer: str, names: Iterable[str]) -> None:
        """Unmap a producer's rings, keeping the time it waited on them."""
        for name in names:
            waited = self._reader.waited_ns(name)
            if waited:
                self._waited_before[producer] = self._waited_before.get(producer, 0) + waited
            self._reader.release(name)
        self._set_waited(producer)

    def _set_waited(self, producer: str) -> None:
        ps = self.stats.producers.get(producer)
        if ps is not None:
            waited = self._waited_before.get(producer, 0) + sum(
                self._reader.waited_ns(name) for name in self._segments.get(producer, ()))
            ps.waited_s = waited / 1e9

    def snapshot(self) -> dict[str, Any]:
        """The counts as plain data (:meth:`ReceiverStats.as_dict`), each producer's
        ``waited_s`` first read from its ring's header (a read of shared memory per producer:
        for status updates, not per frame). Call it in the receiver's thread."""
        for producer in list(self.stats.producers):
            self._set_waited(producer)
        return self.stats.as_dict()

    def _call(self, callback: FrameCallback, h: FrameHeader, array: np.ndarray,
              ps: ProducerStats) -> bool:
        try:
            callback(h, array)
        except Exception as exc:
            return self._callback_failed(callback, h, exc, ps)
        return True

    def _callback_failed(self, callback: FrameCallback, h: FrameHeader, exc: Exception,
                         ps: ProducerStats) -> bool:
        name = getattr(callback, "__name__", "callback")
        return self._reject(h.producer, f"{name} failed: {type(exc).__name__}: {exc}", None, ps)

    def _bye(self, bye: Bye) -> None:
        ps = self._producer(bye.producer)
        if bye.seq > ps.last_seq:
            self._advance(ps, bye.seq)
        ps.closed = True
        self._forget_segments(bye.producer, self._segments.pop(bye.producer, ()))

    def _reject(self, producer: str, reason: str, seq: int | None,
                ps: ProducerStats | None = None) -> bool:
        if ps is None:
            ps = self._producer(producer)
            if seq is not None:
                self._advance(ps, seq)
        ps.rejected += 1
        self.stats.rejected += 1
        ps.last_error = self.stats.last_error = reason
        log.warning("rejected a message from %s: %s", producer, reason)
        if self.on_error is not None:
            try:
                self.on_error(reason)
            except Exception:
                log.exception("on_error failed")
        return False

    # -- queries ------------------------------------------------------------------------------
    @property
    def segments(self) -> list[str]:
        """Producers' shared-memory segments this receiver has mapped right now."""
        return self._reader.names

    def reached(self, until: Mapping[str, int]) -> bool:
        """Has every producer's stream reached ``seq`` (received, rejected or known dropped)?"""
        producers = self.stats.producers
        return all((p := producers.get(name)) is not None and p.last_seq >= seq
                   for name, seq in until.items())

    def last_seqs(self, names: Mapping[str, int] | None = None) -> dict[str, int]:
        producers = self.stats.producers
        keys = list(producers) if names is None else list(names)
        return {k: producers[k].last_seq if k in producers else -1 for k in keys}


def _describe(obj: object) -> str:
    if isinstance(obj, np.ndarray):
        ro = "" if obj.flags.writeable else "read-only "
        return f"{ro}{obj.dtype} array of shape {obj.shape}"
    return type(obj).__name__
