"""CURVE keys: a viewer reachable from other machines admits only the producers it knows.

A viewer binds loopback TCP or ``ipc://`` unless asked otherwise, and there only this
machine's users can connect (ipc sockets live in a 0700 folder). A viewer that binds any other
interface (``tcp://0.0.0.0:5555``, a LAN address) requires ZeroMQ CURVE on both its sockets:
connections are encrypted, and a client is admitted only if its public key was authorized on
the viewer's machine. Anything else is refused during the handshake, counted and reported
with the key to authorize; it never reaches the receiver.

Each user has one key pair per machine, made on first use, in :func:`keys_dir`
(``$NAPARI_HCS_STREAM_KEYS_DIR``, else ``~/.config/napari-hcs-stream/keys``; mode 0700) as
ZeroMQ certificate files (the format of ``zmq.auth``; the secret file is mode 0600):

* ``id.key`` / ``id.key_secret``: this machine's key pair, used as a viewer and as a producer;
* ``authorized/*.key``: the public keys of producers (and control clients) this machine's
  viewers admit, besides this machine's own key.

A producer needs the viewer's public key (``server_key=`` or ``$NAPARI_HCS_STREAM_SERVER_KEY``,
40 characters of Z85 text, or the path of a ``.key`` file). ``napari-hcs-stream keys`` prints
this machine's public key; ``napari-hcs-stream keys authorize KEY`` admits a producer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.certs import load_certificate
from zmq.utils import z85

from .endpoints import bind_socket, is_local_address, private_dir, tcp_host

log = logging.getLogger(__name__)

ENV_KEYS_DIR = "NAPARI_HCS_STREAM_KEYS_DIR"
ENV_SERVER_KEY = "NAPARI_HCS_STREAM_SERVER_KEY"
ZAP_ADDRESS = "inproc://zeromq.zap.01"  # where libzmq sends ZAP requests (RFC 27)
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REPORT_EVERY_S = 10.0


class AuthError(ValueError):
    """A key that cannot be used; the text says why and what to do."""


def keys_dir() -> Path:
    """The user's key folder, created mode 0700 (refused if someone else owns it)."""
    env = os.environ.get(ENV_KEYS_DIR)
    if env:
        return private_dir(Path(env), ENV_KEYS_DIR)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return private_dir(Path(config) / "napari-hcs-stream" / "keys", ENV_KEYS_DIR)


def authorized_dir() -> Path:
    return private_dir(keys_dir() / "authorized", ENV_KEYS_DIR)


def _write_certificate(path: Path, public: bytes, secret: bytes | None, *,
                       keep_existing: bool = False) -> None:
    """A ZeroMQ certificate file (``zmq.auth.load_certificate`` reads it), never world
    readable; written next to its final name and moved there, so a reader never sees half.
    ``keep_existing``: if ``path`` exists by then (another process was first), keep it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write("#   ZeroMQ CURVE certificate (napari-hcs-stream)\n")
            fh.write("metadata\ncurve\n")
            fh.write(f'    public-key = "{public.decode("ascii")}"\n')
            if secret is not None:
                fh.write(f'    secret-key = "{secret.decode("ascii")}"\n')
        if keep_existing:
            with contextlib.suppress(FileExistsError):  # never replace a key in use
                os.link(tmp, path)
        else:
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def key_pair() -> tuple[bytes, bytes]:
    """This machine's ``(public, secret)`` Z85 keys, made on first use (by whichever process
    comes first: the others load that one)."""
    folder = keys_dir()
    secret_file = folder / "id.key_secret"
    if not secret_file.exists():
        public, secret = zmq.curve_keypair()
        _write_certificate(secret_file, public, secret, keep_existing=True)
        log.info("CURVE key pair of this machine: %s", secret_file)
    public_file = folder / "id.key"
    if secret_file.stat().st_mode & 0o077:
        raise PermissionError(f"{secret_file} is readable by others: chmod 600 it")
    public, maybe_secret = load_certificate(secret_file)
    if maybe_secret is None:
        raise AuthError(f"{secret_file} holds no secret key")
    if not public_file.exists():  # the public half, to hand to others
        _write_certificate(public_file, public, None, keep_existing=True)
    return public, maybe_secret


def parse_key(key: str | bytes | os.PathLike[str]) -> bytes:
    """A public key as Z85 bytes, from 40 characters of Z85 text or a ``.key`` file."""
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
    text = text.strip()
    if _Z85_KEY.fullmatch(text):
        try:
            if len(z85.decode(text.encode("ascii"))) == 32:
                return text.encode("ascii")
        except ValueError:
            pass
    path = Path(text).expanduser()
    if path.is_file():
        try:
            public, _secret = load_certificate(path)
        except (OSError, ValueError) as exc:
            raise AuthError(f"{path} is not a ZeroMQ certificate: {exc}") from None
        return public
    raise AuthError(f"{text[:60]!r} is neither a public key (40 characters of Z85 text) nor a "
                    "key file")


def authorize(key: str | bytes | os.PathLike[str], name: str | None = None) -> Path:
    """Admit a producer's public key to this machine's viewers; returns the file written.

    Viewers read the authorized keys when they start listening.
    """
    public = parse_key(key)
    name = name or "key-" + public.decode("ascii")[:8].translate(
        {ord(c): "_" for c in ".-:+=^!/*?&<>()[]{}@%$#"})
    if not _NAME.fullmatch(name):
        raise AuthError(f"{name!r} is not a usable name: letters, digits, '_', '.', '-'")
    path = authorized_dir() / f"{name}.key"
    _write_certificate(path, public, None)
    return path


def authorized_keys() -> dict[bytes, str]:
    """``{public key: name}`` of every authorized key file (unreadable files are skipped)."""
    keys: dict[bytes, str] = {}
    for path in sorted(authorized_dir().glob("*.key")):
        try:
            public, _secret = load_certificate(path)
        except (OSError, ValueError) as exc:
            log.warning("skipping authorized key %s: %s", path, exc)
            continue
        keys[public] = path.stem
    return keys


def requires_auth(address: str) -> bool:
    """TCP beyond this machine: CURVE is required (ipc and loopback stay open to this
    machine's own producers)."""
    return address.startswith("tcp://") and not is_local_address(address)


def server_key_for(address: str, given: str | bytes | os.PathLike[str] | None = None, *,
                   this_machine: bool = False) -> bytes | None:
    """The viewer's public key a client of ``address`` uses, or None for no CURVE.

    ``given`` always wins (a viewer may require CURVE on loopback too). Otherwise only an
    address that requires it gets a key: ``$NAPARI_HCS_STREAM_SERVER_KEY``, else this
    machine's own when the viewer is known to run here under this user (``this_machine``: it
    was found by its name; or the address is a wildcard such as ``tcp://0.0.0.0:5555``, which
    only this machine can connect to); else :class:`AuthError`, saying what to give.
    """
    if given is not None:
        return parse_key(given)
    if not requires_auth(address):
        return None  # an environment key meant for a remote viewer must not break local ones
    env = os.environ.get(ENV_SERVER_KEY)
    if env:
        return parse_key(env)
    if this_machine or tcp_host(address) in ("0.0.0.0", "::", "*"):  # reached only from here
        return key_pair()[0]
    raise AuthError(f"the viewer at {address} requires CURVE: pass server_key= (its public key: "
                    f"`napari-hcs-stream keys` on the viewer's machine) or set {ENV_SERVER_KEY}")


def secure_client(sock: zmq.Socket[Any], server: bytes) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the viewer whose key is
    ``server``, identified by this machine's key pair."""
    public, secret = key_pair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server


class Gatekeeper:
    """A context's ZAP handler (RFC 27): admits CURVE clients whose key is authorized.

    Bind it before the server socket it guards, poll :attr:`socket` with the others and call
    :meth:`handle_pending` when readable (libzmq holds a connection's handshake until the
    answer). ``on_refused`` receives a message naming the key to authorize. Keys are read
    once, at creation.
    """

    def __init__(self, context: zmq.Context[Any],
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.public, self._secret = key_pair()
        self.allowed = authorized_keys()
        self.allowed.setdefault(self.public, "this machine")  # the same user, by construction
        self.on_refused = on_refused
        self.admitted = 0
        #: handshakes refused; each key's refusals are reported (logged, ``on_refused``) at
        #: most every REPORT_EVERY_S, since a refused client keeps retrying.
        self.refused = 0
        self._reported: dict[bytes | None, float] = {}
        sock = context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ADDRESS)
        except zmq.ZMQError as exc:
            sock.close()
            raise OSError(f"cannot start CURVE authentication: {exc}") from None
        self.socket: zmq.Socket[Any] | None = sock
        if len(self.allowed) == 1:
            log.warning("only this machine's own key is authorized (%s is empty): producers "
                        "elsewhere will be refused; run `napari-hcs-stream keys authorize KEY`",
                        authorized_dir())

    @classmethod
    def needed(cls, context: zmq.Context[Any], address: str, auth: bool | None,
               on_refused: Callable[[str], None] | None = None) -> Gatekeeper | None:
        """A gate for a server about to bind ``address``, if it needs one: ``auth`` says,
        or (None) whether the address is TCP beyond loopback."""
        wanted = requires_auth(address) if auth is None else auth
        return cls(context, on_refused) if wanted else None

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (before it binds) a CURVE server with this machine's key pair."""
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def handle_pending(self) -> int:
        """Answer every waiting ZAP request; never blocks."""
        sock = self.socket
        n = 0
        while sock is not None:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            sock.send_multipart(self._answer(frames))
        return n

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        key = frames[6] if len(frames) > 6 and len(frames[6]) == 32 else None
        public = z85.encode(key) if key is not None else None
        if version == b"1.0" and mechanism == b"CURVE" and public in self.allowed:
            self.admitted += 1
            return [b"1.0", request_id, b"200", b"OK", public, b""]
        refusal = [b"1.0", request_id, b"400", b"not authorized", b"", b""]
        self.refused += 1
        # a refused client retries its handshake every 0.1 s: each key is reported (logged
        # and passed on) at most every REPORT_EVERY_S
        now, last = time.monotonic(), self._reported.get(public)
        if last is not None and now - last < REPORT_EVERY_S:
            return refusal
        if len(self._reported) >= 1024:  # random keys must not grow it without end
            self._reported.clear()
        self._reported[public] = now
        who = address.decode("ascii", "replace") or "a client"
        if public is None:
            reason = f"refused {who}: it did not use CURVE (set the viewer's key on it)"
        else:
            text = public.decode("ascii")
            reason = (f"refused {who}: key {text} is not authorized (on this machine: "
                      f"napari-hcs-stream keys authorize '{text}')")
        log.warning("%s", reason)
        if self.on_refused is not None:
            self.on_refused(reason)
        return refusal

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None


def bind_server(context: zmq.Context[Any], sock: zmq.Socket[Any], address: str,
                auth: bool | None, on_refused: Callable[[str], None] | None,
                what: str) -> tuple[Gatekeeper | None, str, int | None]:
    """Bind a server socket (the viewer's data or control socket), behind a CURVE gate when
    :meth:`Gatekeeper.needed` says so: ``(gate or None, bound address, ipc inode)``. A failed
    bind closes the socket and the gate and raises ``OSError`` saying what could not ``what``.
    """
    gate = Gatekeeper.needed(context, address, auth, on_refused)
    if gate is not None:
        gate.secure(sock)
    try:
        bound, inode = bind_socket(sock, address, what)
    except OSError:
        if gate is not None:
            gate.close()
        raise
    return gate, bound, inode
