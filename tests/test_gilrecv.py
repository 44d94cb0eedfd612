"""Receiving headers through libzmq with the GIL held, on real ZeroMQ sockets."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from napari_hcs_stream import _gilrecv
from napari_hcs_stream._gilrecv import HeaderReceiver, OversizePart, header_receiver

pytestmark = pytest.mark.skipif(_gilrecv._lib() is None,
                                reason="libzmq is not reachable through ctypes here")


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://127.0.0.1:{port}")
    yield push, pull
    push.close()
    pull.close()
    ctx.term()


def take(recv: HeaderReceiver, deadline_s: float = 5.0) -> tuple[bytes, bool]:
    """The next first part; the message may still be on its way over TCP."""
    deadline = time.monotonic() + deadline_s
    while (got := recv()) is None:
        assert time.monotonic() < deadline, "no message arrived"
        zmq.select([recv._socket], [], [], 0.05)  # wait for readability, bounded
    return got


def test_the_loaded_library_is_pyzmqs_own() -> None:
    path = _gilrecv._loaded_libzmq()
    assert path is not None and Path(path).exists()
    assert Path(path).name.startswith("libzmq")


def test_first_parts_come_as_bytes_and_the_rest_through_pyzmq(pair) -> None:
    push, pull = pair
    recv = header_receiver(pull, 1024)
    assert recv is not None
    try:
        assert recv() is None  # nothing waiting: no error, no wait
        push.send(b'{"v":"1.0"}')
        push.send_multipart([b"head", b"pixels" * 1000, b"tail"])
        push.send(b"")  # an empty part is still a message
        assert take(recv) == (b'{"v":"1.0"}', False)
        assert take(recv) == (b"head", True)
        second = pull.recv(copy=False)  # libzmq keeps the message's progress in the socket
        assert second.more and second.bytes == b"pixels" * 1000
        third = pull.recv(copy=False)
        assert not third.more and third.bytes == b"tail"
        assert take(recv) == (b"", False)
        assert recv() is None
        # a first part over the capacity: only its size is known, the rest of its message
        # is still there for the caller to drain
        push.send_multipart([b"x" * 1025, b"after"])
        push.send(b"y" * 1024)  # exactly the capacity fits
        with pytest.raises(OversizePart) as raised:
            take(recv)
        assert (raised.value.size, raised.value.more) == (1025, True)
        assert pull.recv() == b"after"
        assert take(recv) == (b"y" * 1024, False)
        # pyzmq and the fast path may take turns between messages too
        push.send(b"one")
        push.send(b"two")
        assert pull.recv() == b"one"
        assert take(recv) == (b"two", False)
    finally:
        recv.close()


def test_a_closed_socket_raises_instead_of_touching_freed_memory(pair) -> None:
    _push, pull = pair
    recv = header_receiver(pull, 1024)
    assert recv is not None
    pull.close()
    with pytest.raises(zmq.ZMQError):
        recv()
    recv.close()
    recv.close()  # idempotent
    with pytest.raises(zmq.ZMQError):
        recv()


def test_the_gil_is_kept_while_receiving(pair) -> None:
    """A thread that needs the GIL makes no progress during a long run of fast-path receives
    unless the interpreter's switch interval takes the GIL away: measured as how many times
    the other thread ran while we received 20000 times (pyzmq would let it run at each)."""
    _push, pull = pair
    recv = header_receiver(pull, 1024)
    assert recv is not None
    ran = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ran[0] += 1
            time.sleep(0)  # hand the GIL back at once

    old = sys.getswitchinterval()
    sys.setswitchinterval(10.0)  # no forced switches during the measurement
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.01)
        before = ran[0]
        for _ in range(20000):
            recv()
        during_fast = ran[0] - before
        before = ran[0]
        for _ in range(20000):
            with contextlib.suppress(zmq.Again):
                pull.recv(zmq.NOBLOCK)
        during_pyzmq = ran[0] - before
    finally:
        sys.setswitchinterval(old)
        stop.set()
        thread.join()
        recv.close()
    assert during_fast < 100 <= during_pyzmq, (during_fast, during_pyzmq)


def test_another_libzmq_version_falls_back_to_pyzmq(monkeypatch) -> None:
    _gilrecv._lib.cache_clear()
    try:
        monkeypatch.setattr(zmq, "zmq_version_info", lambda: (3, 0, 0))
        assert _gilrecv._lib() is None
        monkeypatch.undo()
        _gilrecv._lib.cache_clear()
        monkeypatch.setenv("NAPARI_HCS_STREAM_PYZMQ_RECV", "1")
        assert _gilrecv._lib() is None
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PULL)
        try:
            assert header_receiver(sock, 1024) is None
        finally:
            sock.close()
    finally:
        monkeypatch.undo()
        _gilrecv._lib.cache_clear()
    assert _gilrecv._lib() is not None


def test_receivers_keep_the_gil_by_default_only_off_the_main_thread(runtime_dir) -> None:
    from napari_hcs_stream.receiver import Receiver

    kinds: dict[str, bool] = {}

    def bind(name: str, **kwargs) -> None:
        receiver = Receiver(f"gil-{name}", register=False, **kwargs)
        receiver.bind()
        try:
            kinds[name] = receiver._take_header is not None
        finally:
            receiver.close()

    bind("main")
    thread = threading.Thread(target=bind, args=("thread",))
    thread.start()
    thread.join()
    bind("forced", keep_gil=True)
    assert kinds == {"main": False, "thread": True, "forced": True}
