"""The control channel: each command, bad requests, deferred replies, client timeouts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from conftest import wait_until
from napari_hcs_stream import __version__
from napari_hcs_stream.control import DEFER, ControlClient, ControlServer, Token
from napari_hcs_stream.endpoints import lookup_endpoint
from napari_hcs_stream.protocol import CONTROL_COMMANDS
from napari_hcs_stream.publisher import Publisher
from transport_helpers import serving


def test_ping_and_discovery(runtime_dir: Path) -> None:
    with serving("ctl") as served:
        found = lookup_endpoint("ctl")
        assert found == served.endpoint
        reply = ControlClient(found.control).ping()
    assert reply is not None
    assert reply["ok"] is True and reply["ready"] is True and reply["protocol"] == [1, 0]
    assert reply["app"] == "napari-hcs-stream" and reply["version"] == __version__
    assert isinstance(reply["pid"], int)


def test_state_reports_receiver_counts(runtime_dir: Path) -> None:
    extra = {"layers": ["nuclei"]}
    with serving("state", handler_kwargs={"state": lambda: extra}) as served:
        with Publisher("state") as pub:
            pub.publish(np.zeros((4, 4), np.uint8))
        wait_until(lambda: served.count() == 1)
        reply = ControlClient(served.endpoint.control).request("state")
    assert reply["ok"] and reply["layers"] == ["nuclei"]
    assert reply["stats"]["producers"][pub.producer_id]["received"] == 1


def test_clear_one_run_or_everything(runtime_dir: Path) -> None:
    cleared: list[str | None] = []
    kwargs = {"clear": lambda run: cleared.append(run) or {"removed": 1}}
    with serving("clear", handler_kwargs=kwargs) as served:
        client = ControlClient(served.endpoint.control)
        assert client.request("clear", run="run-1") == {"hcs": [1, 0], "ok": True,
                                                        "run": "run-1", "removed": 1}
        assert client.request("clear", run=None)["ok"]
        assert client.request("clear")["ok"]
        bad = client.request("clear", run=5)
    assert cleared == ["run-1", None, None]
    assert bad["ok"] is False and "'run' must be a run id or null" in bad["error"]


def test_flush_waits_for_frames_without_blocking_them(runtime_dir: Path) -> None:
    with serving("flush") as served:
        client = ControlClient(served.endpoint.control)
        assert client.flush({}, timeout=5)["ok"]  # nothing to wait for
        pub = Publisher("flush")
        replies: list[dict[str, Any]] = []
        asked = threading.Thread(
            target=lambda: replies.append(client.flush({pub.producer_id: 9}, timeout=20)))
        asked.start()
        wait_until(lambda: served.count() == 0 and not replies)
        for i in range(10):  # the viewer keeps receiving while the flush is pending
            assert pub.publish(np.full((4, 4), i, np.uint8))
        asked.join(30)
        pub.close()
        assert served.count() == 10
    assert replies == [{"hcs": [1, 0], "ok": True, "received": {pub.producer_id: 9}}]


def test_flush_times_out_with_a_reason(runtime_dir: Path) -> None:
    with serving("flush-late") as served:
        start = time.monotonic()
        reply = ControlClient(served.endpoint.control).flush({"nobody:1:0": 3}, timeout=0.2)
        assert time.monotonic() - start < 2.0
    assert reply["ok"] is False and reply["timeout"] is True
    assert "flush timed out after 0.2 s" in reply["error"] and "nobody:1:0" in reply["error"]


def test_flush_waits_for_rendering_too(runtime_dir: Path) -> None:
    rendered = threading.Event()
    kwargs = {"rendered": lambda until: rendered.is_set()}
    with serving("flush-render", handler_kwargs=kwargs) as served:
        client = ControlClient(served.endpoint.control)
        replies: list[dict[str, Any]] = []
        asked = threading.Thread(target=lambda: replies.append(client.flush({}, timeout=20)))
        asked.start()
        asked.join(0.3)  # bounded look: it must still be waiting for the screen
        assert asked.is_alive() and not replies
        rendered.set()
        asked.join(20)
    assert replies and replies[0]["ok"]


@pytest.mark.parametrize(("until", "timeout", "error"), [
    ([1, 2], 1, "'until' must map producer ids"),
    ({"p": "3"}, 1, "'until' must map producer ids"),
    ({"p": 3}, -1, "'timeout' must be seconds"),
    ({"p": 3}, "soon", "'timeout' must be seconds"),
])
def test_bad_flush_requests(runtime_dir: Path, until: Any, timeout: Any, error: str) -> None:
    with serving("flush-bad") as served:
        reply = ControlClient(served.endpoint.control).request(
            "flush", until=until, timeout_s=timeout)
    assert reply["ok"] is False and error in reply["error"]


def test_shutdown(runtime_dir: Path) -> None:
    with serving("down") as served:
        reply = ControlClient(served.endpoint.control).request("shutdown", close=True)
        assert reply["ok"] and reply["closing"]
        assert served.stop.wait(10)
    with serving("down2", handler_kwargs={"shutdown": None}) as served:
        served_reply = ControlClient(served.endpoint.control).request("shutdown")
    assert served_reply["ok"] is False and "cannot be shut down" in served_reply["error"]


def _raw_request(address: str, payload: bytes, socket_type: int = zmq.REQ) -> dict[str, Any]:
    sock = zmq.Context.instance().socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(payload)
        assert sock.poll(5000), "no reply"
        return json.loads(sock.recv())
    finally:
        sock.close()


@pytest.mark.parametrize(("payload", "error"), [
    (b"not json", "not valid UTF-8 JSON"),
    (b"\x80\x04\x95\x00", "not valid UTF-8 JSON"),  # a pickle is never unpickled
    (b"[1, 2]", "must be a JSON object"),
    (b'{"cmd": "ping"}', "'hcs' must be the protocol version"),
    (b'{"hcs": [2, 0], "cmd": "ping"}', "protocol major version 2 is not supported"),
    (b'{"hcs": [1, 0], "cmd": "format_disk"}', "unknown command"),
    (b'{"hcs": [1, 0]}', "unknown command"),
    (b" " * 300_000, "more than the limit"),
])
def test_bad_requests_get_an_error_reply(runtime_dir: Path, payload: bytes, error: str) -> None:
    with serving("bad") as served:
        reply = _raw_request(served.endpoint.control, payload)
        assert reply["ok"] is False and error in reply["error"]
        assert ControlClient(served.endpoint.control).ping()  # still serving


def test_a_dealer_without_an_envelope_is_answered(runtime_dir: Path) -> None:
    with serving("dealer") as served:
        reply = _raw_request(served.endpoint.control, b'{"hcs": [1, 0], "cmd": "ping"}',
                             zmq.DEALER)
    assert reply["ok"] is True


def test_custom_handler_deferring_and_failing(runtime_dir: Path) -> None:
    later: list[Token] = []

    def handler(request: dict[str, Any], token: Token) -> Any:
        if request["cmd"] == "flush":
            later.append(token)
            return DEFER
        if request["cmd"] == "state":
            raise RuntimeError("state is broken")
        return {"ok": True, "cmd": request["cmd"]}

    address = f"ipc://{runtime_dir}/custom.ctl"
    stop = threading.Event()
    bound = threading.Event()
    servers: list[ControlServer] = []

    def run() -> None:
        server = ControlServer(address, handler, commands=CONTROL_COMMANDS | {"snapshot"})
        server.bind()
        servers.append(server)
        bound.set()
        while not stop.is_set():
            server.serve_once(20)
            if later:
                server.reply(later.pop(), {"ok": True, "flushed": True})
        server.close()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert bound.wait(10)
        client = ControlClient(address)
        assert client.request("ping") == {"hcs": [1, 0], "ok": True, "cmd": "ping"}
        assert client.request("snapshot")["ok"]  # an application's own extra command
        assert "unknown command" in client.request("format_disk")["error"]
        assert client.request("flush", until={}) == {"hcs": [1, 0], "ok": True, "flushed": True}
        failed = client.request("state")
        assert failed["ok"] is False
        assert failed["error"] == "state failed: RuntimeError: state is broken"
    finally:
        stop.set()
        thread.join(10)
    assert not Path(address[6:]).exists()


def test_client_times_out_clearly(runtime_dir: Path) -> None:
    client = ControlClient(f"ipc://{runtime_dir}/nobody.ctl")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer to 'state' from .* within 0.2 s"):
        client.request("state", timeout=0.2)
    assert client.ping(timeout=0.1) is None
    assert time.monotonic() - start < 2.0
