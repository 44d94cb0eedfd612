"""Shared pieces of the transport tests: a receiver serving in a thread, producer processes.

Producer functions live here (not in a test module) so ``spawn`` children import only this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from conftest import wait_until
from napari_hcs_stream.control import ControlServer, ReceiverControl, serve
from napari_hcs_stream.endpoints import Endpoint, endpoint_to_bind
from napari_hcs_stream.protocol import FrameHeader
from napari_hcs_stream.receiver import Receiver


@dataclass
class Served:
    """What a receiver thread saw; lists are appended in the receiver thread."""

    receiver: Receiver
    endpoint: Endpoint = field(default=None)  # type: ignore[assignment]
    frames: list[tuple[FrameHeader, np.ndarray]] = field(default_factory=list)
    torn: list[FrameHeader] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def count(self, producer: str | None = None) -> int:
        return sum(1 for h, _ in list(self.frames) if producer in (None, h.producer))


@contextmanager
def serving(spec: str | Endpoint = "test", *, control: bool = True,
            destination: Callable[[FrameHeader], np.ndarray | None] | None = None,
            handler_kwargs: dict[str, Any] | None = None, **receiver_kwargs: Any
            ) -> Iterator[Served]:
    """A Receiver (and ControlServer) bound and polled in a background thread, like the
    viewer's listener; every good frame is kept (copied) for the test to check."""
    served = Served(None)  # type: ignore[arg-type]
    receiver = Receiver(
        spec, destination=destination,
        on_frame=lambda h, a: served.frames.append((h, a.copy())),
        on_torn=lambda h, a: served.torn.append(h),
        on_error=served.errors.append, **receiver_kwargs)
    served.receiver = receiver
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        server = None
        try:
            if control:
                kwargs = {"shutdown": lambda _r: served.stop.set(), **(handler_kwargs or {})}
                handler = ReceiverControl(receiver, **kwargs)
                server = ControlServer(endpoint_to_bind(spec).control, handler,
                                       auth=receiver_kwargs.get("auth"),
                                       on_refused=receiver.record_refusal)
                server.bind()
            served.endpoint = receiver.bind(server.address if server else None)
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            if server is not None:
                server.close()
            return
        ready.set()
        try:
            if server is not None:
                serve(receiver, server, served.stop, timeout_ms=20)
            else:
                while not served.stop.is_set():
                    receiver.poll(20)
        finally:
            if server is not None:
                server.close()
            receiver.close()

    thread = threading.Thread(target=run, name="test-receiver", daemon=True)
    thread.start()
    ready.wait(20)
    if failure:
        thread.join(5)
        raise failure[0]
    try:
        yield served
    finally:
        served.stop.set()
        thread.join(10)
        assert not thread.is_alive(), "the receiver thread did not stop"


def pattern(shape: tuple[int, ...], dtype: str, salt: int = 0) -> np.ndarray:
    """Distinct, exactly checkable values for every (salt, index)."""
    n = int(np.prod(shape))
    values = (np.arange(n, dtype=np.int64) * 7 + salt * 1009) % 251
    if np.dtype(dtype).kind == "f":
        return (values.astype(dtype) / 4).reshape(shape)
    return values.astype(dtype).reshape(shape)


def producer_main(endpoint: str, count: int, salt: int, kwargs: dict[str, Any],
                  conn: Connection) -> None:
    """A pipeline worker: publish ``count`` frames, report stats, close."""
    from napari_hcs_stream.publisher import Publisher

    pub = Publisher(endpoint, **kwargs)
    conn.send(("started", pub.producer_id))
    shape = (64, 48)
    for i in range(count):
        pub.publish(pattern(shape, "uint16", salt * 10000 + i), z=i, site=salt,
                    meta={"salt": salt, "i": i})
    stats = {"producer": pub.producer_id, "sent": pub.stats.sent,
             "dropped": pub.stats.dropped, "last_seq": pub.last_seq,
             "max_publish_s": pub.stats.max_publish_s()}
    pub.close()
    conn.send(("done", stats))


def late_producer_main(endpoint: str, count: int, interval: float, kwargs: dict[str, Any],
                       conn: Connection) -> None:
    """Publish at a steady pace from before the viewer exists until ``count`` frames."""
    from napari_hcs_stream.publisher import Publisher

    pub = Publisher(endpoint, **kwargs)
    conn.send(("started", pub.producer_id))
    results = []
    for i in range(count):
        results.append(pub.publish(pattern((32, 32), "uint16", i), z=i))
        time.sleep(interval)  # pacing a producer, not waiting for a condition
    stats = {"producer": pub.producer_id, "sent": pub.stats.sent, "dropped":
             pub.stats.dropped, "results": results, "last_seq": pub.last_seq,
             "max_publish_s": pub.stats.max_publish_s(),
             "reasons": dict(pub.stats.drop_reasons)}
    pub.close()
    conn.send(("done", stats))


def receiver_main(endpoint: str, received: Any, bound: Any) -> None:
    """A viewer in its own process (so a test can kill it mid-stream); ``received`` is a
    shared ``multiprocessing.Value`` counter and ``bound`` an Event set once listening."""

    def count(_h: FrameHeader, _a: np.ndarray) -> None:
        received.value += 1

    receiver = Receiver(endpoint, on_frame=count)
    receiver.bind()
    bound.set()
    while True:
        receiver.poll(20)


def raw_xpub(address: str, receiver: Receiver | None = None, timeout: float = 10.0) -> Any:
    """A bare producer socket (no project code) that has seen the viewer's subscription.

    ``receiver``: one polled in this thread (it must run for the subscription to flow).
    """
    import zmq

    sock = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    deadline = time.monotonic() + timeout
    while not sock.poll(0):
        if receiver is not None:
            receiver.poll(5)
        elif not sock.poll(10):
            pass
        if time.monotonic() > deadline:
            sock.close()
            raise AssertionError(f"no subscription from {address}")
    sock.recv()
    return sock


def poll_until(receiver: Receiver, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Service a receiver owned by this thread until ``predicate`` holds (with a deadline)."""

    def serviced() -> Any:
        return predicate() or (receiver.poll(10) and False)

    return wait_until(serviced, timeout=timeout, interval=0, message=str(predicate))
