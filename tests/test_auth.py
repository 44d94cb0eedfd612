"""CURVE: a viewer listening beyond loopback admits only the producers whose key it knows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zmq
from zmq.auth.certs import load_certificate
from zmq.utils import z85

from conftest import wait_until
from napari_hcs_stream import auth
from napari_hcs_stream.control import ControlClient
from napari_hcs_stream.endpoints import tcp_endpoint
from napari_hcs_stream.publisher import Publisher
from transport_helpers import serving


def test_key_pair_is_made_once_private_and_readable_by_zeromq(keys_dir: Path) -> None:
    public, secret = auth.key_pair()
    assert auth.key_pair() == (public, secret)  # made once, then loaded
    assert keys_dir.stat().st_mode & 0o777 == 0o700
    assert (keys_dir / "id.key_secret").stat().st_mode & 0o777 == 0o600
    assert load_certificate(keys_dir / "id.key_secret") == (public, secret)
    assert load_certificate(keys_dir / "id.key") == (public, None)  # the half to share
    (keys_dir / "id.key_secret").chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        auth.key_pair()


def test_keys_are_taken_as_text_or_files_and_nothing_else(tmp_path: Path) -> None:
    public, _secret = zmq.curve_keypair()
    assert auth.parse_key(public.decode()) == public
    assert auth.parse_key(f"  {public.decode()}\n") == public
    auth.key_pair()
    assert auth.parse_key(auth.keys_dir() / "id.key") == auth.key_pair()[0]
    for bad in ("abc", "x" * 39 + "'", str(tmp_path / "missing.key")):
        with pytest.raises(auth.AuthError, match="neither a public key"):
            auth.parse_key(bad)
    (tmp_path / "junk.key").write_text("not a certificate")
    with pytest.raises(auth.AuthError):
        auth.parse_key(tmp_path / "junk.key")


def test_authorized_keys_are_files_with_names() -> None:
    public, _secret = zmq.curve_keypair()
    path = auth.authorize(public.decode(), "lab-pc")
    assert path.name == "lab-pc.key" and path.parent == auth.authorized_dir()
    assert auth.authorized_keys() == {public: "lab-pc"}
    other, _ = zmq.curve_keypair()
    assert auth.authorize(other).stem.startswith("key-")  # named after the key
    assert set(auth.authorized_keys()) == {public, other}
    with pytest.raises(auth.AuthError, match="not a usable name"):
        auth.authorize(public, "../escape")


@pytest.mark.parametrize(("address", "required"), [
    ("tcp://0.0.0.0:5555", True), ("tcp://192.168.1.20:5555", True), ("tcp://[::]:5555", True),
    ("tcp://127.0.0.1:5555", False), ("tcp://localhost:5555", False),
    ("tcp://[::1]:5555", False), ("ipc:///tmp/x.data", False), ("inproc://x", False)])
def test_curve_is_required_exactly_beyond_loopback(address: str, required: bool) -> None:
    assert auth.requires_auth(address) is required


def test_a_remote_address_without_the_viewers_key_is_refused_before_connecting(
        runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(auth.AuthError, match="requires CURVE: pass server_key="):
        Publisher("tcp://10.255.0.1:5555")
    public, _secret = zmq.curve_keypair()
    monkeypatch.setenv(auth.ENV_SERVER_KEY, public.decode())
    pub = Publisher("tcp://10.255.0.1:5555", connect_timeout=0.05)  # the key from the env
    pub.close()


def test_which_key_a_client_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    remote, _ = zmq.curve_keypair()
    given, _ = zmq.curve_keypair()
    own = auth.key_pair()[0]
    far = "tcp://10.255.0.1:5555"
    assert auth.server_key_for(far, given.decode()) == given  # given always wins
    assert auth.server_key_for("tcp://127.0.0.1:5555", given) == given  # asked-for CURVE
    assert auth.server_key_for(far, this_machine=True) == own  # found by name: ours
    assert auth.server_key_for("tcp://0.0.0.0:5555") == own  # only reachable from here
    monkeypatch.setenv(auth.ENV_SERVER_KEY, remote.decode())
    assert auth.server_key_for(far) == remote
    assert auth.server_key_for(far, this_machine=True) == remote
    assert auth.server_key_for("ipc:///tmp/x.data") is None  # the env is for remote viewers
    assert auth.server_key_for("tcp://127.0.0.1:5555") is None


def test_a_key_in_the_environment_leaves_local_viewers_alone(
        runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.ENV_SERVER_KEY, zmq.curve_keypair()[0].decode())
    with serving("local-plain") as served:
        with Publisher("local-plain", connect_timeout=10) as pub:  # by name, over ipc
            assert pub.publish(np.zeros((8, 8), np.uint16))
        wait_until(lambda: served.count() == 1)


_OTHER_MACHINE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from napari_hcs_stream import auth
    from napari_hcs_stream.publisher import Publisher
    pub = Publisher(sys.argv[1], server_key=sys.argv[2], connect_timeout=float(sys.argv[3]),
                    producer="elsewhere")
    sent = pub.publish(np.full((8, 8), 7, np.uint16), well="B02")
    pub.close()
    print(json.dumps({"sent": sent, "key": auth.key_pair()[0].decode()}))
""")


def _from_another_machine(address: str, server_key: bytes, keys: Path,
                          timeout: float) -> dict:
    """A producer with its own key folder (as on another machine), in its own process."""
    env = {**os.environ, auth.ENV_KEYS_DIR: str(keys)}
    out = subprocess.run([sys.executable, "-c", _OTHER_MACHINE, address, server_key.decode(),
                          str(timeout)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_viewer_beyond_loopback_admits_only_authorized_producers(
        runtime_dir: Path, tmp_path: Path) -> None:
    viewer_key = auth.key_pair()[0]
    with serving("tcp://0.0.0.0:0") as served:  # every interface: CURVE without asking
        receiver = served.receiver
        assert receiver.gate is not None
        port = served.endpoint.data.rpartition(":")[2]
        local = f"tcp://127.0.0.1:{port}"
        # this machine's own key is admitted (the same user made both)
        with Publisher(local, server_key=viewer_key, connect_timeout=10) as pub:
            assert pub.publish(np.full((8, 8), 1, np.uint16), well="A01")
        wait_until(lambda: served.count() == 1)
        # a producer whose key nobody authorized: refused at the handshake, counted, named
        other = _from_another_machine(local, viewer_key, tmp_path / "other", 1.0)
        assert other["sent"] is False
        wait_until(lambda: receiver.stats.rejected >= 1)
        assert f"key {other['key']} is not authorized" in receiver.stats.last_error
        assert "napari-hcs-stream keys authorize" in receiver.stats.last_error
        # without CURVE at all: never gets in either
        with Publisher(local, connect_timeout=0.5) as plain:
            assert not plain.publish(np.zeros((8, 8), np.uint16), well="A02")
        # control needs the key too
        control = served.endpoint.control.replace("0.0.0.0", "127.0.0.1")
        assert ControlClient(control, server_key=viewer_key).ping(timeout=5)["ok"]
        assert ControlClient(control).ping(timeout=0.5) is None
        assert served.count() == 1 and receiver.gate.admitted >= 1
        # a control client with a key nobody authorized: refused, counted and named too
        rejected = receiver.stats.rejected
        stranger = zmq.Context.instance().socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()
        stranger.curve_publickey, stranger.curve_secretkey = public, secret
        stranger.curve_serverkey = viewer_key
        stranger.connect(control)
        stranger.send_multipart([b"", b'{"hcs": [1, 0], "cmd": "ping"}'])
        wait_until(lambda: receiver.stats.rejected > rejected)
        stranger.close(linger=0)
        assert receiver.stats.last_error.startswith("control: refused")
        assert public.decode() in receiver.stats.last_error

    auth.authorize(other["key"], "other")  # on the viewer's machine; read at the next start
    with serving("tcp://0.0.0.0:0") as served:
        port = served.endpoint.data.rpartition(":")[2]
        again = _from_another_machine(f"tcp://127.0.0.1:{port}", viewer_key,
                                      tmp_path / "other", 10.0)
        assert again["sent"] is True and again["key"] == other["key"]
        wait_until(lambda: served.count() == 1)
        assert served.frames[0][0].producer == "elsewhere"
        assert served.receiver.stats.rejected == 0


def test_curve_can_be_asked_for_on_loopback(runtime_dir: Path) -> None:
    with serving("tcp://127.0.0.1:0", auth=True) as served:
        viewer_key = auth.key_pair()[0]
        with Publisher(served.endpoint.data, connect_timeout=0.5) as plain:
            assert not plain.publish(np.zeros((8, 8), np.uint16))
        with Publisher(served.endpoint.data, server_key=viewer_key, connect_timeout=10) as pub:
            assert pub.publish(np.zeros((8, 8), np.uint16))
        wait_until(lambda: served.count() == 1)


def test_the_gate_reports_a_retrying_refused_key_once_per_period() -> None:
    reports: list[str] = []
    ctx = zmq.Context()
    gate = auth.Gatekeeper(ctx, on_refused=reports.append)
    try:
        stranger = z85.decode(zmq.curve_keypair()[0])
        own = z85.decode(auth.key_pair()[0])
        request = [b"1.0", b"7", b"", b"10.0.0.9", b"", b"CURVE"]
        for _ in range(5):  # libzmq retries a refused handshake every 0.1 s
            assert gate._answer([*request, stranger])[2] == b"400"
        assert gate._answer([*request, own])[2:4] == [b"200", b"OK"]
        assert gate._answer([b"1.0", b"8", b"", b"10.0.0.9", b"", b"NULL"])[2] == b"400"
        assert gate._answer([b"junk"])[2] == b"500"
        assert (gate.refused, gate.admitted) == (6, 1)
        assert len(reports) == 2  # the stranger once, the NULL client once
        assert "10.0.0.9" in reports[0] and "not authorized" in reports[0]
        assert "did not use CURVE" in reports[1]
    finally:
        gate.close()
        ctx.term()


def _keep(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    return image


def test_a_pipeline_reaches_a_curve_viewer_with_the_key_in_its_config(tmp_path: Path,
                                                                      runtime_dir: Path) -> None:
    """The step config's ``server_key`` reaches the workers' publishers and the runner's
    control client (reuse and flush); without it the viewer admits nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_hcs_stream.publisher import (
        NapariStreamingConfig,
        Pipeline,
        Step,
        SyntheticPlate,
        run_pipeline,
    )

    plate = SyntheticPlate(n_wells=6, sites=1, channels=("DAPI",), size=16)
    # a named viewer on loopback TCP that asks for CURVE: the name finds both ports, and a
    # producer uses CURVE only when given the key
    with serving(tcp_endpoint("curvy"), auth=True) as served:

        def pipeline(**streaming: object) -> Pipeline:
            return Pipeline("curve", [Step("keep", _keep, backend="disk", streaming=(
                NapariStreamingConfig(endpoint="curvy", **streaming)))],  # type: ignore[arg-type]
                output_dir=tmp_path)

        with ThreadPoolExecutor(2) as ex:
            refused = run_pipeline(pipeline(), plate, executor=ex, viewers=False)
        assert sum(p["sent"] for p in refused.producers.values()) == 0

        key = auth.key_pair()[0].decode()
        with ThreadPoolExecutor(2) as ex:  # viewers=True: found by ping, flushed at the end
            result = run_pipeline(pipeline(server_key=key, strict=True), plate, executor=ex)
        assert sum(p["sent"] for p in result.producers.values()) == 6
        assert not result.unavailable
        assert served.count() == 6  # the runner's flush answered: everything is there
