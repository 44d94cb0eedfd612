"""Take a message's first part from libzmq without giving the GIL away.

pyzmq releases the GIL around every receive, even a non-blocking one that returns within a
microsecond. In napari's process the listener thread shares the GIL with the main thread, and
a thread that gave the GIL up waits up to the interpreter's switch interval (5 ms) to get it
back whenever the main thread is running Python (slicing, vispy, Qt callbacks). So each frame
header received through pyzmq could cost the listener milliseconds while napari redraws.
Measured on the development VM (2 cores, a shown viewer, 512x512 frames, 18 interleaved runs
of 3000 frames): median ingest 3800-4100 frames/s through pyzmq, 4800-5000 with this module.

:class:`HeaderReceiver` calls libzmq's ``zmq_msg_recv(ZMQ_DONTWAIT)`` through
``ctypes.PyDLL`` (calls that keep the GIL) on the socket's own handle
(``Socket.underlying``), into one ``zmq_msg_t`` it owns, and returns the part as ``bytes``.
Only first parts (headers, a few hundred bytes) are taken this way; later parts (pixel
frames) are still received by pyzmq as zero-copy ``Frame`` objects, whose memory lives as long
as Python holds them. libzmq keeps a message's progress in the socket, so the two may take
turns within one message.

The library is the one pyzmq already loaded (found in ``/proc/self/maps``), used only if its
version equals pyzmq's and every symbol is there. Anywhere else (no ``/proc``, another build,
a sandbox) :func:`header_receiver` returns None and the caller receives through pyzmq.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import zmq

log = logging.getLogger(__name__)

ZMQ_DONTWAIT = 1
#: ``sizeof(zmq_msg_t)`` in every libzmq 4.x (``unsigned char _[64]``, pointer aligned).
_MSG_WORDS = 8


class _Lib:
    """The few libzmq functions the receive needs, with their C signatures."""

    def __init__(self, dll: ctypes.PyDLL) -> None:
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        self.msg_init = _fn(dll.zmq_msg_init, c_int, vp)
        self.msg_close = _fn(dll.zmq_msg_close, c_int, vp)
        self.msg_recv = _fn(dll.zmq_msg_recv, c_int, vp, vp, c_int)
        self.msg_data = _fn(dll.zmq_msg_data, vp, vp)
        self.msg_size = _fn(dll.zmq_msg_size, ctypes.c_size_t, vp)
        self.msg_more = _fn(dll.zmq_msg_more, c_int, vp)
        self.errno = _fn(dll.zmq_errno, c_int)


def _fn(f: Any, restype: Any, *argtypes: Any) -> Any:
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


def _loaded_libzmq() -> str | None:
    """Path of the libzmq mapped into this process (pyzmq's, bundled or system), if any."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and Path(path).name.startswith("libzmq"):
                    return "/" + path
    except OSError:
        return None
    return None


@functools.cache
def _lib() -> _Lib | None:
    if not sys.platform.startswith("linux") or os.environ.get("NAPARI_HCS_STREAM_PYZMQ_RECV"):
        return None
    import zmq.backend  # loads pyzmq's extension, and with it libzmq

    path = _loaded_libzmq()
    if path is None:
        return None
    try:
        dll = ctypes.PyDLL(path)
        lib = _Lib(dll)
        major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        version = _fn(dll.zmq_version, None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
        version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    except (OSError, AttributeError) as exc:
        log.debug("receiving through pyzmq: %s is not usable (%s)", path, exc)
        return None
    if (major.value, minor.value, patch.value) != zmq.zmq_version_info():
        log.debug("receiving through pyzmq: %s is libzmq %d.%d.%d, pyzmq uses %s", path,
                  major.value, minor.value, patch.value, zmq.zmq_version())
        return None
    return lib


class HeaderReceiver:
    """Receives first parts from one socket, in the socket's thread; :meth:`close` when done."""

    def __init__(self, lib: _Lib, socket: zmq.Socket) -> None:
        self._lib = lib
        self._socket = socket
        self._handle = socket.underlying
        self._msg = (ctypes.c_uint64 * _MSG_WORDS)()
        self._addr = ctypes.addressof(self._msg)
        self._open = lib.msg_init(self._addr) == 0
        if not self._open:
            raise OSError("zmq_msg_init failed")

    def __call__(self) -> tuple[bytes, bool] | None:
        """The next message's first part and whether more parts follow, or None if none waits.

        Errors other than "nothing waiting" raise pyzmq's exception for them (a closed
        context raises :class:`zmq.ContextTerminated`, as pyzmq's own receive would).
        """
        if self._socket.closed or not self._open:  # its handle may be freed memory by now
            raise zmq.ZMQError(errno.ENOTSOCK)
        lib, addr = self._lib, self._addr
        if lib.msg_recv(addr, self._handle, ZMQ_DONTWAIT) < 0:
            code = lib.errno()
            if code in (errno.EAGAIN, errno.EINTR):
                return None
            if code == zmq.ETERM:
                raise zmq.ContextTerminated()
            raise zmq.ZMQError(code)
        data = ctypes.string_at(lib.msg_data(addr), lib.msg_size(addr))
        return data, bool(lib.msg_more(addr))

    def close(self) -> None:
        """Free the last part held; idempotent. Call before the socket's context ends."""
        if self._open:
            self._open = False
            self._lib.msg_close(self._addr)


def header_receiver(socket: zmq.Socket) -> HeaderReceiver | None:
    """A GIL-keeping receiver for ``socket``, or None where pyzmq must do it."""
    lib = _lib()
    if lib is None:
        return None
    try:
        return HeaderReceiver(lib, socket)
    except OSError as exc:
        log.debug("receiving through pyzmq: %s", exc)
        return None
