"""A publisher's socket and ring, and how they are closed (even from a finalizer).

Kept apart from :class:`~napari_hcs_stream.publisher.Publisher` so that a
``multiprocessing`` finalizer can hold it without keeping the publisher alive.
"""

from __future__ import annotations

import os
import time

import zmq

from .._context import data_context
from ..auth import secure_client
from ..endpoints import Endpoint, readable
from ..protocol import Bye, encode_bye
from ..ring import ShmRing


class Link:
    """The XPUB socket (connected), the ring (created on first use), the subscription count."""

    def __init__(self, endpoint: Endpoint, producer: str, hwm: int, linger_ms: int, *,
                 server_key: bytes | None = None) -> None:
        self.pid = os.getpid()
        self.producer = producer
        self.context = data_context()  # I/O thread under SCHED_BATCH where possible
        sock = self.context.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscribe, so counting works
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if server_key is not None:  # a viewer that admits only authorized producers
            secure_client(sock, server_key)
        sock.connect(endpoint.data)
        self.socket: zmq.Socket | None = sock
        self.ring: ShmRing | None = None
        self.subscribers = 0
        self.next_drain = 0.0
        self.seq = -1
        self.closed = False

    def drain(self) -> None:
        """Read (un)subscriptions without blocking; the viewer leaving frees every slot."""
        sock = self.socket
        assert sock is not None
        while readable(sock):
            try:
                msg: bytes = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self.subscribers += 1
            elif msg[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)
                if self.subscribers == 0 and self.ring is not None:
                    self.ring.reclaim_all()

    def wait_subscribed(self, deadline: float) -> bool:
        sock = self.socket
        assert sock is not None
        self.drain()
        while self.subscribers == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.poll(max(1, int(left * 1000)), zmq.POLLIN)
            self.drain()
        return True

    def close(self, wait: float) -> None:
        """Say bye, give the viewer ``wait`` s to copy what is in flight, unlink the ring."""
        if self.closed or os.getpid() != self.pid:
            return  # already closed, or a forked copy that owns nothing
        self.closed = True
        sock, ring = self.socket, self.ring
        try:
            if sock is not None:
                self.drain()
                deadline = time.monotonic() + wait
                bye = encode_bye(Bye(self.producer, self.seq))
                while self.subscribers and self.seq >= 0:  # full queue: retry, bounded
                    try:
                        sock.send(bye, zmq.NOBLOCK)
                        break
                    except zmq.ZMQError:
                        if time.monotonic() >= deadline:
                            break
                        time.sleep(0.001)
                        self.drain()
                while (ring is not None and ring.pending() and self.subscribers
                       and time.monotonic() < deadline):
                    time.sleep(0.001)  # polling shared memory: there is nothing to wait on
                    self.drain()
        finally:
            if sock is not None:
                sock.close()
                self.socket = None
            self.context.term()  # waits at most LINGER for queued messages
            if ring is not None:
                ring.close()
                self.ring = None
