"""The pipeline's end of the stream: ``publish()`` never blocks long and never fails a step.

A publisher connects an XPUB socket to the viewer's SUB. XPUB tells us when the viewer's
subscription arrives (so the first frames are not lost to ZeroMQ's slow-joiner race) and when
it goes away; with ``XPUB_NODROP`` a full queue is an error we can count instead of a silent
loss. Local pixels go through a shared-memory ring (one copy in here, one copy out in the
viewer); remote pixels go as a zero-copy message frame. Everything the viewer does wrong (absent,
slow, closed, crashed) costs at most ``send_timeout`` per publish and is counted, not raised;
``strict=True`` is the opt-in that waits and raises instead.
"""

from __future__ import annotations

import os
import secrets
import socket as _socket
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from multiprocessing import util as _mp_util
from typing import Any, Literal

import numpy as np
import zmq

from .. import auth
from ..endpoints import (
    Endpoint,
    is_local_address,
    lookup_endpoint,
    pid_alive,
    registered_pid,
    resolve_endpoint,
)
from ..protocol import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits
from ..ring import ShmRing, align, sweep_stale_segments
from ._args import check_array, check_name, coords_meta, dumps
from ._link import Link

_SMALL = 64 * 1024  # below this, copying into the message is cheaper than zero-copy tracking
NO_VIEWER = "no viewer connected"
SLOTS_BUSY = "viewer too slow (every shared-memory slot in flight)"
QUEUE_FULL = "viewer too slow (send queue full)"
VIEWER_GONE = "viewer went away"
DRAIN_S = 0.001  # how often (at most) a publish reads the viewer's (un)subscriptions
_PLAIN = (str, int, type(None))  # coordinate types whose checked header bytes are cached


class DeliveryError(RuntimeError):
    """Strict mode only: the viewer did not take a frame in time."""


#: the shared-memory ring's default budget and smallest slot (see :func:`ring_geometry`)
RING_BYTES = 128 << 20
MIN_SLOT_BYTES = 1 << 20


@dataclass
class PublisherStats:
    """What happened to every publish; ``durations`` holds the last few publish times (s)."""

    sent: int = 0
    dropped: int = 0
    oversize: int = 0
    bytes_sent: int = 0
    last_drop_reason: str = ""
    #: seconds spent waiting for the viewer to free a shared-memory slot: how much the viewer
    #: held this publisher back (each wait lasts at most ``send_timeout``, or
    #: ``strict_timeout`` in strict mode).
    waited_s: float = 0.0
    drop_reasons: Counter[str] = field(default_factory=Counter)
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def median_publish_s(self) -> float:
        return statistics.median(self.durations) if self.durations else 0.0

    def max_publish_s(self) -> float:
        return max(self.durations, default=0.0)


def new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def new_producer_id() -> str:
    return f"{_socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class Publisher:
    """Send images and labels to a viewer; see the module docstring for the guarantees.

    ``endpoint``: a viewer name (found through its discovery file) or an address.
    ``transport``: ``"shm"`` (a shared-memory ring; ``"auto"`` picks it for ipc and loopback
    addresses) or ``"frames"`` (pixels inside the message: for other hosts; do not modify an
    array in place after publishing it this way, ZeroMQ may still be sending it).
    ``connect_timeout``: the first publish waits until this long after construction for the
    viewer's subscription (once; later publishes never wait for a viewer). When a live viewer
    is registered under the endpoint's name, it waits up to ``viewer_wait`` instead: a napari
    busy creating layers may take seconds to answer a new producer, and the frames must not
    be lost for that; an absent viewer still costs only ``connect_timeout``.
    ``ring_slots``: slots in the shared-memory ring; None sizes it from ``ring_bytes`` (at
    least 4 slots, at most 1024, and within a quarter of the free ``/dev/shm``), so
    small frames get enough slots to ride out a viewer stall of a second or two.
    ``send_timeout``: the most a publish waits for a free slot or queue space before it drops.
    ``strict``: wait up to ``strict_timeout`` instead, and raise :class:`DeliveryError`.
    ``close_timeout``: how long :meth:`close` lets the viewer copy what is in flight.
    ``server_key``: the viewer's CURVE public key (Z85 text or a ``.key`` file), for a viewer
    that requires CURVE (one listening beyond loopback, :mod:`napari_hcs_stream.auth`); for
    such an address ``$NAPARI_HCS_STREAM_SERVER_KEY`` is used when it is not given. A viewer
    found by name runs on this machine, under this user: its key is this machine's own, and
    nothing needs to be given. An address beyond loopback with no key raises
    :class:`~napari_hcs_stream.auth.AuthError`.

    Not shareable across ``fork()``; calls from several threads are serialised by a lock.
    """

    def __init__(
        self,
        endpoint: str | Endpoint = "default",
        *,
        run: str | None = None,
        producer: str | None = None,
        transport: Literal["auto", "shm", "frames"] = "auto",
        strict: bool = False,
        connect_timeout: float = 2.0,
        viewer_wait: float = 10.0,
        send_timeout: float = 0.005,
        strict_timeout: float = 30.0,
        close_timeout: float = 1.0,
        ring_slots: int | None = None,
        ring_bytes: int = RING_BYTES,
        min_slot_bytes: int = MIN_SLOT_BYTES,
        hwm: int = 64,
        reclaim_age: float = 2.0,
        limits: Limits = DEFAULT_LIMITS,
        server_key: str | bytes | os.PathLike[str] | None = None,
    ) -> None:
        if transport not in ("auto", "shm", "frames"):
            raise ValueError(f"transport must be 'auto', 'shm' or 'frames', got {transport!r}")
        self.endpoint = resolve_endpoint(endpoint)
        by_name = isinstance(endpoint, str) and "://" not in endpoint  # registered here, by us
        key = auth.server_key_for(self.endpoint.data, server_key, this_machine=by_name)
        self.run = check_name("run", run or new_run_id(), limits)
        self.producer_id = check_name("producer", producer or new_producer_id(), limits)
        if transport == "auto":
            transport = "shm" if is_local_address(self.endpoint.data) else "frames"
        self.transport: str = transport
        self.strict = strict
        self.send_timeout = send_timeout
        self.strict_timeout = strict_timeout
        self.close_timeout = strict_timeout if strict else close_timeout
        self.ring_slots = ring_slots
        self.ring_bytes = ring_bytes
        self.min_slot_bytes = min_slot_bytes
        self.reclaim_age = reclaim_age
        self.limits = limits
        self.stats = PublisherStats()
        self._waited_before = 0  # ns waited on rings since replaced
        self._lock = threading.Lock()
        self._viewer_pid: int | None = None
        if "://" not in self.endpoint.name and lookup_endpoint(self.endpoint.name) is not None:
            self._viewer_pid = registered_pid(self.endpoint.name)
            connect_timeout = max(connect_timeout, viewer_wait)
        self._connect_deadline = time.monotonic() + connect_timeout
        if transport == "shm":
            sweep_stale_segments()
        linger = int(min(strict_timeout, 60.0) * 1000) if strict else 200
        self._link = Link(self.endpoint, self.producer_id, hwm, linger, server_key=key)
        # runs on garbage collection and at (multiprocessing or interpreter) exit
        self._finalizer = _mp_util.Finalize(self, self._link.close, args=(self.close_timeout,),
                                            exitpriority=10)
        self._static: dict[tuple[Any, ...], bytes] = {}
        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self._prefix = dumps({"hcs": list(PROTOCOL_VERSION), "type": "frame",
                               "producer": self.producer_id, "run": self.run})[:-1].encode()

    # -- properties ---------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        """The sequence number of the latest publish attempt (-1: none yet)."""
        return self._link.seq

    @property
    def connected(self) -> bool:
        """Whether a viewer is subscribed right now."""
        if self._link.socket is None:
            return False
        with self._lock:
            self._link.drain()
        return self._link.subscribers > 0

    # -- publishing ---------------------------------------------------------------------------
    def publish(
        self,
        array: np.ndarray,
        *,
        well: str | None = None,
        site: int | None = None,
        channel: str | int | None = None,
        z: int | None = None,
        t: int | None = None,
        source: str = "output",
        kind: Literal["image", "labels"] = "image",
        rgb: bool = False,
        meta: Mapping[str, Any] | None = None,
    ) -> bool:
        """Hand one item to the viewer: True if sent, False if dropped (and counted).

        Raises only for the caller's own mistakes (not an array, unsupported dtype, bad
        coordinates); a viewer that is absent, slow or gone is never an exception here.
        """
        t0 = time.perf_counter()
        if not isinstance(array, np.ndarray):
            check_array(array, kind, rgb, self.limits)  # raises, saying what to pass
        try:  # the header part shared by every frame of one kind and shape is cached
            static = self._static.get((array.dtype, array.shape, source, kind, rgb))
        except TypeError:  # something unhashable: the checks below say what is wrong
            static = None
        if static is None:
            static = self._static_part(array, source, kind, rgb)
        if meta is None and type(well) in _PLAIN and type(site) in _PLAIN and \
                type(channel) in _PLAIN and type(z) in _PLAIN and type(t) in _PLAIN:
            # plain ints and strings (never bools or numpy scalars, which would compare
            # equal to ints and skip their own checks): checked and formatted once
            key = (well, site, channel, z, t)
            body = self._bodies.get(key)
            if body is None:
                body = coords_meta(well, site, channel, z, t, None, self.limits)
                if len(self._bodies) >= 4096:
                    self._bodies.clear()
                self._bodies[key] = body
        else:
            body = coords_meta(well, site, channel, z, t, meta, self.limits)
        with self._lock:
            link = self._link
            if link.socket is None or os.getpid() != link.pid:
                raise RuntimeError("publish() on a closed Publisher (or across fork())")
            link.seq += 1
            ok = self._send(link, array, b"%s,\"seq\":%d,%s,%s" % (
                self._prefix, link.seq, static, body))
        self.stats.durations.append(time.perf_counter() - t0)
        return ok

    def _static_part(self, array: object, source: str, kind: str, rgb: bool) -> bytes:
        arr = check_array(array, kind, rgb, self.limits)
        check_name("source", source, self.limits)
        shape = ",".join(map(str, arr.shape))
        static = (f'"source":{dumps(source)},"kind":"{kind}","dtype":"{arr.dtype.name}",'
                  f'"shape":[{shape}],"rgb":{"true" if rgb else "false"}').encode()
        if len(self._static) > 256:
            self._static.clear()
        self._static[(arr.dtype, arr.shape, source, kind, rgb)] = static
        return static

    def publish_many(self, items: Iterable[tuple[np.ndarray, Mapping[str, Any]]]) -> int:
        """Publish ``(array, keyword arguments)`` pairs; returns how many were sent."""
        return sum(self.publish(arr, **kwargs) for arr, kwargs in items)

    def _drop(self, reason: str) -> bool:
        if self.strict:
            raise DeliveryError(f"frame {self._link.seq} not delivered to "
                                f"{self.endpoint.data}: {reason}")
        self.stats.dropped += 1
        self.stats.drop_reasons[reason] += 1
        self.stats.last_drop_reason = reason
        return False

    def _send(self, link: Link, arr: np.ndarray, head: bytes) -> bool:
        """``head``: the header without its closing pixels member."""
        now = time.monotonic()
        if link.subscribers == 0 or now >= link.next_drain:
            link.drain()  # a syscall: at most every DRAIN_S while a viewer is there
            link.next_drain = now + DRAIN_S
        if link.subscribers == 0:
            now = time.monotonic()
            deadline = now + self.strict_timeout if self.strict else self._connect_deadline
            if now >= deadline or not self._wait_for_viewer(link, deadline):
                return self._drop(NO_VIEWER)
            self._connect_deadline = 0.0  # wait once, at the start, never again
        patience = self.strict_timeout if self.strict else self.send_timeout
        nbytes = arr.nbytes
        ring = link.ring
        if self.transport == "shm":
            if ring is None or (nbytes > ring.slot_bytes and not ring.pending()):
                ring = link.ring = self._new_ring(ring, nbytes)
            if nbytes <= ring.slot_bytes:
                slot = ring.acquire()
                if slot is None:  # every slot in flight: wait for the viewer, and count it
                    slot = ring.acquire(patience)
                    self.stats.waited_s = (self._waited_before + ring.waited_ns) / 1e9
                    if slot is None:
                        return self._drop(SLOTS_BUSY)
                offset, gen = ring.write(slot, arr)
                header = b'%s,"pixels":{"shm":{"segment":"%s","offset":%d,"nbytes":%d,' \
                         b'"slot":%d,"generation":%d}}}' % (head, ring.name_bytes, offset,
                                                           nbytes, slot, gen)
                failed = self._push(link, header, None, patience)
                if failed:
                    ring.release(slot)  # never sent: reusable at once
                    return self._drop(failed)
                self.stats.sent += 1
                self.stats.bytes_sent += nbytes
                return True
            self.stats.oversize += 1
        if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
            arr = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<"))
        failed = self._push(link, b'%s,"pixels":{"frame":1}}' % head, arr.data.cast("B"),
                            patience)
        if failed:
            return self._drop(failed)
        self.stats.sent += 1
        self.stats.bytes_sent += nbytes
        return True

    def _wait_for_viewer(self, link: Link, deadline: float) -> bool:
        """Wait for the subscription, but stop at once if the registered viewer process dies."""
        while True:
            if link.wait_subscribed(min(deadline, time.monotonic() + 0.05)):
                return True
            if time.monotonic() >= deadline:
                return False
            if self._viewer_pid is not None and not pid_alive(self._viewer_pid):
                return False

    def _new_ring(self, old: ShmRing | None, nbytes: int) -> ShmRing:
        """Created on first use, sized for the frames actually sent; replaced by a bigger one
        (never a smaller one) only while nothing is in flight, so no header points at it."""
        if old is not None:
            self._waited_before += old.waited_ns
            old.close()
        slot_bytes, nslots = ring_geometry(nbytes, self.ring_bytes, self.min_slot_bytes)
        return ShmRing(slot_bytes, self.ring_slots or nslots, reclaim_age=self.reclaim_age)

    def _push(self, link: Link, header: bytes, pixels: memoryview | None,
              patience: float) -> str | None:
        """Send without blocking, retrying for at most ``patience`` s; the drop reason if not.

        The header is always copied (small); pixels go zero-copy when large. ZeroMQ queues a
        multipart message atomically, so only the first part can meet a full queue.
        """
        sock = link.socket
        assert sock is not None
        deadline = 0.0
        flags = zmq.NOBLOCK if pixels is None else zmq.NOBLOCK | zmq.SNDMORE
        while True:
            try:
                sock.send(header, flags)
                break
            except zmq.Again:
                pass
            now = time.monotonic()
            if not deadline:
                deadline = now + patience
            link.drain()
            if link.subscribers == 0:
                return VIEWER_GONE
            if now >= deadline:
                return QUEUE_FULL
            time.sleep(0.0002)
        if pixels is not None:
            sock.send(pixels, 0, copy=pixels.nbytes < _SMALL)
        return None

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Say bye, let the viewer copy what is in flight (bounded), free everything.

        Idempotent, and safe from a ``multiprocessing`` finalizer or at interpreter exit.
        """
        with self._lock:
            self._finalizer()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Publisher({self.endpoint.data!r}, producer={self.producer_id!r}, "
                f"run={self.run!r}, transport={self.transport!r}, sent={self.stats.sent}, "
                f"dropped={self.stats.dropped})")


def ring_geometry(nbytes: int, ring_bytes: int = RING_BYTES,
                  min_slot_bytes: int = MIN_SLOT_BYTES) -> tuple[int, int]:
    """``(slot_bytes, slots)`` of the ring a :class:`Publisher` makes for ``nbytes`` frames
    when ``ring_slots`` is not given: slots of at least ``min_slot_bytes``, and as many as
    fit ``ring_bytes`` (4 to 1024, within a quarter of the free ``/dev/shm``), so that small
    frames get enough slots to ride out a viewer stall (a 512x512 uint16 frame: 128 slots)."""
    slot_bytes = max(align(nbytes), min_slot_bytes)
    budget = ring_bytes
    try:
        st = os.statvfs("/dev/shm")
        budget = min(budget, st.f_bavail * st.f_frsize // 4)
    except OSError:  # no /dev/shm (macOS): the budget alone
        pass
    return slot_bytes, max(4, min(1024, budget // slot_bytes))
