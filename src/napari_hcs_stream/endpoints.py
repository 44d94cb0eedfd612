"""Where a viewer listens, found by name rather than by a fixed port.

A viewer binds a data address (SUB) and a control address (ROUTER). By default both are
``ipc://`` sockets in a per-user runtime folder (mode 0700: other users cannot connect); a
discovery file ``<name>.json`` next to them records the real addresses (a TCP port chosen by
the OS included) and the viewer's pid, so producers find it by name. Nothing here ever kills a
process: a live endpoint is reported, a dead one is cleaned up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from . import __version__
from .protocol import PROTOCOL_VERSION

log = logging.getLogger("napari_hcs_stream")

ENV_RUNTIME_DIR = "NAPARI_HCS_STREAM_RUNTIME_DIR"
DEFAULT_NAME = "default"
#: an ipc:// path must fit ``sockaddr_un.sun_path`` (108 bytes on Linux, 104 on macOS).
MAX_IPC_PATH = 99
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class EndpointError(RuntimeError):
    """An endpoint that cannot be used; the text says why and what to do."""


class EndpointInUse(EndpointError):
    """Another live process already serves this address."""


@dataclass(frozen=True)
class Endpoint:
    """A viewer's name and its two addresses (data: SUB bind, control: ROUTER bind)."""

    name: str
    data: str
    control: str


def private_dir(path: Path, env: str = ENV_RUNTIME_DIR) -> Path:
    """Create ``path`` mode 0700, or refuse it when someone else owns it (``env``: the
    variable that chooses another folder, named in the error)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise EndpointError(
            f"the folder {path} belongs to another user (uid {st.st_uid}); set {env} to a "
            "folder of your own"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def runtime_dir() -> Path:
    """$NAPARI_HCS_STREAM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/napari-hcs-stream, else /tmp."""
    env = os.environ.get(ENV_RUNTIME_DIR)
    if env:
        return private_dir(Path(env))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return private_dir(Path(xdg) / "napari-hcs-stream")
    return private_dir(Path(tempfile.gettempdir()) / f"napari-hcs-stream-{os.getuid()}")


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise EndpointError(
            f"endpoint name {name!r} is not valid: use 1 to 64 letters, digits, '.', '_' or "
            "'-' (or give an address such as ipc:///path or tcp://127.0.0.1:5555)"
        )
    return name


def _socket_dir(name: str) -> Path:
    """The runtime folder, or a short private one when its path would not fit an ipc path."""
    base = runtime_dir()
    if len(str(base / f"{name}.data")) <= MAX_IPC_PATH:
        return base
    return private_dir(Path("/tmp") / f"hcs-{os.getuid()}")


def default_endpoint(name: str = DEFAULT_NAME) -> Endpoint:
    """The ipc addresses a viewer called ``name`` binds unless told otherwise."""
    check_name(name)
    folder = _socket_dir(name)
    data, control = folder / f"{name}.data", folder / f"{name}.ctl"
    if len(str(control)) > MAX_IPC_PATH:
        raise EndpointError(
            f"the socket path {control} is longer than {MAX_IPC_PATH} characters (a limit of "
            f"unix sockets): use a shorter endpoint name or set {ENV_RUNTIME_DIR} to a short path"
        )
    return Endpoint(name, f"ipc://{data}", f"ipc://{control}")


def tcp_endpoint(name: str = DEFAULT_NAME, port: int = 0, host: str = "127.0.0.1") -> Endpoint:
    """Loopback TCP (port 0: the OS picks; control is the next port, or also OS-picked)."""
    check_name(name)
    return Endpoint(name, f"tcp://{host}:{port}", f"tcp://{host}:{port + 1 if port else 0}")


def control_for(data: str) -> str:
    """The control address that goes with an explicit data address."""
    if data.startswith("tcp://"):
        host, _, port = data[6:].rpartition(":")
        if not port.isdigit():
            raise EndpointError(f"{data!r} has no port: use tcp://HOST:PORT")
        return f"tcp://{host}:{int(port) + 1 if int(port) else 0}"
    if data.startswith("ipc://"):
        path = data[6:]
        return f"ipc://{path[:-5] if path.endswith('.data') else path}.ctl"
    if data.startswith("inproc://"):
        return data + ".ctl"
    raise EndpointError(f"unsupported address {data!r}: use ipc://PATH or tcp://HOST:PORT")


def resolve_endpoint(spec: str | Endpoint) -> Endpoint:
    """An endpoint name (looked up, else the default ipc addresses) or an explicit address."""
    if isinstance(spec, Endpoint):
        return spec
    if "://" in spec:
        return Endpoint(spec, spec, control_for(spec))
    return lookup_endpoint(spec) or default_endpoint(spec)


def endpoint_to_bind(spec: str | Endpoint) -> Endpoint:
    """What a viewer binds for ``spec``: a name's default ipc addresses, or the given ones.

    Raises :class:`EndpointInUse` when a live viewer has registered the name already.
    """
    if isinstance(spec, Endpoint):
        return spec
    if "://" in spec:
        return Endpoint(spec, spec, control_for(spec))
    live = lookup_endpoint(spec)
    pid = registered_pid(spec) if live else None
    if live is not None and pid != os.getpid():
        raise EndpointInUse(
            f"a viewer (pid {pid}) already listens on endpoint {spec!r} at {live.data}: use "
            "that viewer, another endpoint name, or close it first"
        )
    return default_endpoint(spec)


def _discovery_file(name: str) -> Path:
    return runtime_dir() / f"{check_name(name)}.json"


def register_endpoint(endpoint: Endpoint, pid: int | None = None) -> Path:
    """Write ``<rundir>/<name>.json`` atomically (mode 0600) so producers find us by name."""
    path = _discovery_file(endpoint.name)
    record = {"name": endpoint.name, "data": endpoint.data, "control": endpoint.control,
              "pid": os.getpid() if pid is None else pid, "version": __version__,
              "protocol": list(PROTOCOL_VERSION)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{endpoint.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp already made it 0600
            json.dump(record, fh)
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    return path


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(record, dict) and all(isinstance(record.get(k), str)
                                           for k in ("name", "data", "control"))
          and type(record.get("pid")) is int)
    return record if ok else None


def pid_alive(pid: int) -> bool:
    """Whether a process is running (signal 0 is never delivered: nothing is ever killed).

    A zombie (exited, not yet reaped by its parent: a viewer the pipeline launched and that
    crashed) counts as gone.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS): signal 0 is all we know
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def lookup_endpoint(name: str) -> Endpoint | None:
    """The endpoint a live viewer registered under ``name``; a dead viewer's file is removed."""
    path = _discovery_file(name)
    record = _read(path)
    if record is None:
        return None
    if not pid_alive(record["pid"]):
        log.info("removing the discovery file of dead viewer pid %s: %s", record["pid"], path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    return Endpoint(record["name"], record["data"], record["control"])


def registered_pid(name: str) -> int | None:
    record = _read(_discovery_file(name))
    return None if record is None else int(record["pid"])


def unregister_endpoint(name: str, pid: int | None = None) -> bool:
    """Remove the discovery file, but only if it is ours (``pid``, default this process)."""
    path = _discovery_file(name)
    record = _read(path)
    if record is None or record["pid"] != (os.getpid() if pid is None else pid):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def tcp_host(addr: str) -> str:
    """The host of ``tcp://HOST:PORT`` (IPv6 brackets removed)."""
    return addr[6:].rpartition(":")[0].strip("[]")


def is_local_address(addr: str) -> bool:
    """ipc, inproc and loopback tcp: a producer there can share memory with the viewer."""
    if addr.startswith(("ipc://", "inproc://")):
        return True
    if not addr.startswith("tcp://"):
        return False
    host = tcp_host(addr)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_ipc_bind(address: str) -> None:
    """Before binding an ipc path: remove a stale socket file, refuse one a live process serves.

    ZeroMQ silently takes over an existing ipc path, which would steal a running viewer's
    endpoint; a plain unix-socket connect tells a live listener from a leftover file.
    """
    if not address.startswith("ipc://"):
        return
    path = Path(address[6:])
    private_dir(path.parent)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    except OSError as exc:
        raise EndpointError(f"cannot check whether {path} is in use: {exc}") from None
    finally:
        probe.close()
    raise EndpointInUse(
        f"{address} is already served by a running process (another viewer?): use another "
        "endpoint name, or close that viewer"
    )



def bind_socket(sock: zmq.Socket[Any], address: str, what: str) -> tuple[str, int | None]:
    """Bind ``sock`` or close it and raise an ``OSError`` saying what could not ``what``.

    Returns the address actually bound (an OS-chosen TCP port filled in) and, for ipc, the
    socket file's inode (so cleanup only ever removes a file that is still ours).
    """
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close()
        raise OSError(f"cannot {what} {address}: {exc}") from None
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return bound, ipc_inode(bound)


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message can be received from ``sock`` now. Asked through ``ZMQ_EVENTS``,
    which keeps the GIL (a poll gives it away) and costs less than a failed receive."""
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def ipc_inode(address: str) -> int | None:
    """The inode of a bound ipc socket file, to recognise it as ours when cleaning up."""
    if not address.startswith("ipc://"):
        return None
    try:
        return Path(address[6:]).stat().st_ino
    except OSError:
        return None


def remove_ipc_file(address: str, inode: int | None) -> None:
    """Remove the socket file we bound (ZeroMQ leaves it), unless someone has re-bound it."""
    if inode is None:
        return
    path = Path(address[6:])
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()
