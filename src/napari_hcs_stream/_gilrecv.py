"""Take a message's first part from libzmq without giving the GIL away.

pyzmq releases the GIL around every receive, even a non-blocking one that returns within a
microsecond. In napari's process the listener thread shares the GIL with the main thread, and
a thread that gave the GIL up waits up to the interpreter's switch interval (5 ms) to get it
back whenever the main thread is running Python (slicing, vispy, Qt callbacks). So each frame
header received through pyzmq could cost the listener milliseconds while napari redraws.
Measured on the development VM (2 cores, a shown viewer, 512x512 frames, 18 interleaved runs
of 3000 frames): median ingest 3800-4100 frames/s through pyzmq, 4800-5000 with this module.

:class:`HeaderReceiver` calls libzmq's ``zmq_recv(ZMQ_DONTWAIT)`` through
``ctypes.PyDLL`` (calls that keep the GIL) on the socket's own handle
(``Socket.underlying``), into a buffer it owns, and returns the part as ``bytes``.
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
ZMQ_RCVMORE = 13


class _Lib:
    """The few libzmq functions the receive needs, with their C signatures."""

    def __init__(self, dll: ctypes.PyDLL) -> None:
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        self.recv = _fn(dll.zmq_recv, c_int, vp, vp, ctypes.c_size_t, c_int)
        self.getsockopt = _fn(dll.zmq_getsockopt, c_int, vp, c_int, vp, vp)
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


class OversizePart(Exception):
    """A first part longer than the receiver's buffer: its bytes are gone (only the size is
    known), and ``more`` says whether parts of the same message follow."""

    def __init__(self, size: int, more: bool) -> None:
        super().__init__(f"a {size}-byte part")
        self.size = size
        self.more = more


class HeaderReceiver:
    """Receives first parts of up to ``capacity`` bytes from one socket, in the socket's
    thread. Two calls into libzmq per part (``zmq_recv`` into a buffer of ours, then
    ``ZMQ_RCVMORE``): about 2.5 us here, against 1.6 us for pyzmq's GIL-releasing receive."""

    def __init__(self, lib: _Lib, socket: zmq.Socket, capacity: int) -> None:
        self._lib = lib
        self._socket = socket
        self._handle = socket.underlying
        self.capacity = capacity
        self._buf = ctypes.create_string_buffer(capacity)
        self._view = memoryview(self._buf).cast("B")
        self._addr = ctypes.addressof(self._buf)
        self._more = ctypes.c_int()
        self._size = ctypes.c_size_t()
        self._more_addr = ctypes.addressof(self._more)
        self._size_addr = ctypes.addressof(self._size)
        self._closed = False

    def __call__(self) -> tuple[bytes, bool] | None:
        """The next message's first part and whether more parts follow, or None if none waits.

        Raises :class:`OversizePart` for a part longer than ``capacity`` (its bytes are
        dropped), and pyzmq's exception for any other error (a closed context raises
        :class:`zmq.ContextTerminated`, as pyzmq's own receive would).
        """
        if self._socket.closed or self._closed:  # the handle may point to freed memory
            raise zmq.ZMQError(errno.ENOTSOCK)
        lib, handle = self._lib, self._handle
        n = lib.recv(handle, self._addr, self.capacity, ZMQ_DONTWAIT)
        if n < 0:
            self._raise(lib.errno())
            return None
        self._size.value = ctypes.sizeof(ctypes.c_int)
        if lib.getsockopt(handle, ZMQ_RCVMORE, self._more_addr, self._size_addr) != 0:
            self._raise(lib.errno())
        more = bool(self._more.value)
        if n > self.capacity:
            raise OversizePart(n, more)
        return self._view[:n].tobytes(), more

    @staticmethod
    def _raise(code: int) -> None:
        if code in (errno.EAGAIN, errno.EINTR):
            return
        if code == zmq.ETERM:
            raise zmq.ContextTerminated()
        raise zmq.ZMQError(code)

    def close(self) -> None:
        """Release the buffer's view; idempotent. Nothing in libzmq is held between calls."""
        self._closed = True
        self._view.release()


def header_receiver(socket: zmq.Socket, capacity: int) -> HeaderReceiver | None:
    """A GIL-keeping receiver of first parts up to ``capacity`` bytes for ``socket``, or None
    where pyzmq must do it."""
    lib = _lib()
    return None if lib is None else HeaderReceiver(lib, socket, capacity)
