"""Finding a viewer by name: runtime folder, addresses, discovery files, stale sockets."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import stat
from pathlib import Path

import pytest

from napari_hcs_stream import endpoints
from napari_hcs_stream.endpoints import (
    Endpoint,
    EndpointError,
    EndpointInUse,
    default_endpoint,
    endpoint_to_bind,
    is_local_address,
    lookup_endpoint,
    prepare_ipc_bind,
    register_endpoint,
    resolve_endpoint,
    runtime_dir,
    tcp_endpoint,
    unregister_endpoint,
)
from napari_hcs_stream.receiver import Receiver


def _dead_pid() -> int:
    proc = mp.get_context("spawn").Process(target=os.getpid)
    proc.start()
    proc.join(30)
    assert proc.pid is not None
    return proc.pid


def test_runtime_dir_from_environment(runtime_dir: Path) -> None:
    assert endpoints.runtime_dir() == runtime_dir


def test_runtime_dir_fallbacks_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.delenv("NAPARI_HCS_STREAM_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = runtime_dir()
    assert path == tmp_path / "napari-hcs-stream"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(endpoints.tempfile, "gettempdir", lambda: str(tmp_path))
    assert runtime_dir() == tmp_path / f"napari-hcs-stream-{os.getuid()}"


def test_loose_permissions_are_tightened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    monkeypatch.setenv("NAPARI_HCS_STREAM_RUNTIME_DIR", str(loose))
    runtime_dir()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand a folder to another user")
def test_a_folder_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 4242, 4242)
    monkeypatch.setenv("NAPARI_HCS_STREAM_RUNTIME_DIR", str(theirs))
    with pytest.raises(EndpointError, match="belongs to another user"):
        runtime_dir()


def test_default_addresses(runtime_dir: Path) -> None:
    ep = default_endpoint("lab-1")
    assert ep == Endpoint("lab-1", f"ipc://{runtime_dir}/lab-1.data",
                          f"ipc://{runtime_dir}/lab-1.ctl")
    assert resolve_endpoint("lab-1") == ep  # nobody registered: the defaults


def test_long_runtime_dirs_fall_back_to_a_short_socket_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 60)
    monkeypatch.setenv("NAPARI_HCS_STREAM_RUNTIME_DIR", str(deep))
    ep = default_endpoint("x" * 64)
    assert ep.data == f"ipc:///tmp/hcs-{os.getuid()}/{'x' * 64}.data"
    assert len(ep.control) - len("ipc://") < 100
    monkeypatch.setattr(endpoints, "MAX_IPC_PATH", 30)
    with pytest.raises(EndpointError, match="longer than 30 characters"):
        default_endpoint("x" * 64)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-x", "x" * 65, "a b", "a\n"])
def test_bad_names_are_refused(name: str, runtime_dir: Path) -> None:
    with pytest.raises(EndpointError, match="is not valid"):
        resolve_endpoint(name) if name else default_endpoint(name)


@pytest.mark.parametrize(("address", "control"), [
    ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"),
    ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
    ("tcp://[::1]:7000", "tcp://[::1]:7001"),
    ("ipc:///run/x/viewer.data", "ipc:///run/x/viewer.ctl"),
    ("ipc:///run/x/viewer", "ipc:///run/x/viewer.ctl"),
])
def test_explicit_addresses(address: str, control: str) -> None:
    assert resolve_endpoint(address) == Endpoint(address, address, control)


def test_unsupported_address() -> None:
    with pytest.raises(EndpointError, match="unsupported address"):
        resolve_endpoint("udp://1.2.3.4:5")
    with pytest.raises(EndpointError, match="has no port"):
        resolve_endpoint("tcp://localhost")


def test_discovery_file_round_trip(runtime_dir: Path) -> None:
    ep = tcp_endpoint("scope", 6000)
    path = register_endpoint(ep)
    assert path == runtime_dir / "scope.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid() and record["protocol"] == [1, 0]
    assert record["control"] == "tcp://127.0.0.1:6001"
    assert lookup_endpoint("scope") == ep
    assert resolve_endpoint("scope") == ep
    assert not unregister_endpoint("scope", pid=1)  # not ours: left alone
    assert unregister_endpoint("scope")
    assert lookup_endpoint("scope") is None
    assert not list(runtime_dir.glob(".scope.*"))  # no temporary files left


def test_a_dead_viewers_file_is_removed(runtime_dir: Path) -> None:
    register_endpoint(tcp_endpoint("gone", 7000), pid=_dead_pid())
    assert lookup_endpoint("gone") is None
    assert not (runtime_dir / "gone.json").exists()
    (runtime_dir / "junk.json").write_text("{not json")
    assert lookup_endpoint("junk") is None


def test_a_live_viewer_name_cannot_be_bound_twice(runtime_dir: Path) -> None:
    register_endpoint(default_endpoint("busy"), pid=1)  # pid 1 is always alive
    with pytest.raises(EndpointInUse, match=r"a viewer \(pid 1\) already listens"):
        endpoint_to_bind("busy")
    assert endpoint_to_bind("tcp://127.0.0.1:0").data == "tcp://127.0.0.1:0"


@pytest.mark.parametrize(("address", "local"), [
    ("ipc:///tmp/x", True), ("inproc://x", True), ("tcp://127.0.0.1:1", True),
    ("tcp://127.3.2.1:1", True), ("tcp://localhost:1", True), ("tcp://[::1]:1", True),
    ("tcp://10.0.0.5:1", False), ("tcp://example.org:1", False), ("tcp://*:1", False),
    ("tcp://0.0.0.0:1", False), ("pgm://x", False),
])
def test_is_local_address(address: str, local: bool) -> None:
    assert is_local_address(address) is local


def test_stale_socket_file_is_replaced_but_a_live_one_is_refused(runtime_dir: Path) -> None:
    path = runtime_dir / "s.data"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        with pytest.raises(EndpointInUse, match="already served by a running process"):
            prepare_ipc_bind(f"ipc://{path}")
        assert path.exists()
    finally:
        server.close()
    assert path.exists()  # a leftover file now: nobody listens
    prepare_ipc_bind(f"ipc://{path}")
    assert not path.exists()


def test_receiver_refuses_an_endpoint_in_use_and_cleans_up_after_itself(runtime_dir: Path
                                                                        ) -> None:
    first = Receiver("twice")
    ep = first.bind()
    try:
        assert lookup_endpoint("twice") == ep
        second = Receiver(Endpoint("twice", ep.data, ep.control))
        with pytest.raises(EndpointInUse):
            second.bind()
        second.close()
    finally:
        first.close()
    assert lookup_endpoint("twice") is None
    assert not Path(ep.data[6:]).exists()
