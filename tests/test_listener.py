"""The listener thread and its control commands, with real sockets and no napari viewer.

The thread tests need a Qt application (marked ``gui``); the flush book is plain Python.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_hcs_stream._qt._flush import FlushBook
from napari_hcs_stream._qt.listener import ListenerThread
from napari_hcs_stream.assembler import PlateAssembler
from napari_hcs_stream.control import ControlClient
from napari_hcs_stream.endpoints import lookup_endpoint
from napari_hcs_stream.publisher import Publisher


@pytest.fixture
def listener(qtbot, runtime_dir):
    """A running listener on its own endpoint; ``rendered`` is what the test says it is."""
    made: list[ListenerThread] = []

    def make(name: str = "lst", **kwargs) -> ListenerThread:
        rendered = {"n": 0}
        thread = ListenerThread(name, PlateAssembler(max_bytes=1 << 28),
                                rendered=lambda: rendered["n"], **kwargs)
        thread.rendered_box = rendered  # type: ignore[attr-defined]
        with qtbot.waitSignal(thread.bound, timeout=10000):
            thread.start()
        made.append(thread)
        return thread

    yield make
    for thread in made:
        assert thread.stop()


def ask(qtbot, address: str, cmd: str, **args):
    """A control request from another thread while this one spins the Qt loop."""
    out: dict = {}
    thread = threading.Thread(
        target=lambda: out.update(reply=ControlClient(address).request(cmd, timeout=10, **args)),
        daemon=True)
    thread.start()
    return out, thread


@pytest.mark.gui
def test_ping_and_state(qtbot, listener):
    thread = listener()
    client = ControlClient(thread.control_address)
    ping = client.request("ping", timeout=5)
    assert ping["ok"] and ping["protocol"] == [1, 0] and ping["ready"]
    assert ping["app"] == "napari-hcs-stream" and isinstance(ping["pid"], int)
    with Publisher("lst", run="r", producer="p", connect_timeout=10) as pub:
        pub.publish(np.ones((4, 4), np.uint16), well="A01")
        qtbot.waitUntil(lambda: thread.counter.value == 1, timeout=10000)
    state = client.request("state", timeout=5)
    assert state["ok"] and state["frames"] == 1 and state["runs"] == ["r"]
    assert state["receiver"]["producers"]["p"]["received"] == 1


@pytest.mark.gui
def test_flush_waits_for_frames_and_render(qtbot, listener):
    thread = listener()
    with Publisher("lst", run="r", producer="p", connect_timeout=10) as pub:
        for i in range(5):
            pub.publish(np.full((4, 4), i, np.uint16), well="A01", t=i)
        out, asker = ask(qtbot, thread.control_address, "flush",
                         until={"p": pub.last_seq}, timeout_s=5)
        qtbot.waitUntil(lambda: thread.counter.value == 5, timeout=10000)
        qtbot.wait(150)  # several poll rounds: still unanswered, nothing rendered yet
        assert asker.is_alive()
        thread.rendered_box["n"] = 5  # the render tick caught up
        qtbot.waitUntil(lambda: not asker.is_alive(), timeout=5000)
    assert out["reply"]["ok"]


@pytest.mark.gui
def test_flush_times_out_saying_what_is_missing(qtbot, listener):
    thread = listener()
    out, asker = ask(qtbot, thread.control_address, "flush", until={"ghost": 3}, timeout_s=0.2)
    qtbot.waitUntil(lambda: not asker.is_alive(), timeout=5000)
    reply = out["reply"]
    assert not reply["ok"] and "ghost" in reply["error"] and reply["missing"]["ghost"]["until"] == 3


@pytest.mark.gui
def test_clear_is_answered_from_the_main_thread(qtbot, listener):
    thread = listener()
    asked = []

    def on_clear(run, token):
        asked.append(run)
        thread.post_reply(token, {"ok": True, "run": run})

    thread.clear_requested.connect(on_clear)
    out, asker = ask(qtbot, thread.control_address, "clear", run="r7")
    qtbot.waitUntil(lambda: not asker.is_alive(), timeout=5000)
    assert asked == ["r7"] and out["reply"]["ok"] and out["reply"]["run"] == "r7"


@pytest.mark.gui
def test_shutdown_replies_then_stops(qtbot, listener):
    thread = listener(close_on_shutdown=lambda asked: asked)
    with qtbot.waitSignal(thread.shutdown_requested, timeout=5000) as blocker:
        out, asker = ask(qtbot, thread.control_address, "shutdown", close=True)
    qtbot.waitUntil(lambda: not asker.is_alive() and thread.isFinished(), timeout=5000)
    assert blocker.args == [True]
    assert out["reply"]["ok"] and out["reply"]["closing"] is True
    assert lookup_endpoint("lst") is None


@pytest.mark.gui
def test_stop_is_prompt_and_unregisters(qtbot, listener):
    thread = listener("quick")
    assert lookup_endpoint("quick") is not None
    start = time.monotonic()
    assert thread.stop()
    assert time.monotonic() - start < 1.0
    assert lookup_endpoint("quick") is None


@pytest.mark.gui
def test_an_endpoint_in_use_fails_with_a_reason(qtbot, listener):
    listener("taken")
    second = ListenerThread("taken", PlateAssembler(max_bytes=1 << 20))
    with qtbot.waitSignal(second.failed, timeout=10000) as blocker:
        second.start()
    assert "taken" in blocker.args[0]
    assert second.wait(5000)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_flush_book_records_the_generation_when_frames_are_seen():
    clock = _Clock()
    book = FlushBook(clock)
    replies: list = []
    reply = lambda token, msg: replies.append((token, msg))  # noqa: E731
    assert book.add("t", {"p": 4}, 10) is None
    book.check({"p": 3}, committed=3, rendered=3, reply=reply)
    assert not replies
    book.check({"p": 4}, committed=4, rendered=3, reply=reply)  # seen; render pending
    assert not replies
    book.check({"p": 9}, committed=9, rendered=4, reply=reply)  # 4 rendered is enough
    assert replies == [("t", {"ok": True, "rendered": 4})]


def test_flush_book_rejects_bad_requests_and_times_out():
    clock = _Clock()
    book = FlushBook(clock)
    assert "until" in book.add("t", ["p"], 1)
    assert "timeout" in book.add("t", {"p": 1}, "soon")
    assert book.add("t", {"p": 1}, 1) is None
    replies: list = []
    clock.now = 2
    book.check({}, committed=0, rendered=0, reply=lambda t, m: replies.append(m))
    assert not replies[0]["ok"] and replies[0]["missing"] == {"p": {"until": 1, "seen": None}}
    assert len(book) == 0


@pytest.mark.gui
def test_a_flood_of_bad_messages_keeps_status_at_ten_hz(qtbot, listener):
    import zmq

    thread = listener("flood")
    seen: list[dict] = []
    thread.status.connect(seen.append)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.connect(thread.address)
    try:
        qtbot.waitUntil(lambda: _spray(sock) or bool(seen and seen[-1]["totals"]["rejected"]),
                        timeout=10000)
        seen.clear()
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            _spray(sock)
            qtbot.wait(20)
    finally:
        sock.close(linger=0)
        ctx.term()
    assert 3 <= len(seen) <= 13
    assert seen[-1]["last_error"]  # the reason reaches the widget
    assert thread.isRunning()


def _spray(sock) -> bool:
    for _ in range(50):
        sock.send_multipart([b"\x00garbage", b"x"])
    return False
