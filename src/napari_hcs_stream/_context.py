"""ZeroMQ contexts for the data path, whose I/O threads batch rather than preempt.

Every message wakes ZeroMQ's I/O thread on both sides. With the default scheduling policy a
woken I/O thread preempts the Python thread that just sent (or is copying) a frame, so on a
machine with few cores each frame costs several extra context switches. Under Linux's
``SCHED_BATCH`` (a normal, unprivileged, fair-share policy that only gives up wakeup
preemption) the I/O thread runs once the core is free, and takes every message queued by then
in one go. It never starves: it keeps its fair share of the CPU, and an idle core still runs
it at once.

libzmq aborts the process if it cannot apply a policy to its I/O thread, so the policy is only
asked for when the calling thread runs under the normal policy and a throwaway thread of this
process has just been allowed the same switch (a sandbox may forbid it). Elsewhere (macOS,
Windows, a real-time caller) the context is a plain one.
"""

from __future__ import annotations

import os
import threading

import zmq

_SCHED_BATCH: int | None = getattr(os, "SCHED_BATCH", None)
_SCHED_OTHER: int | None = getattr(os, "SCHED_OTHER", None)
_batch_allowed: bool | None = None


def _probe_batch(policy: int) -> bool:
    """Whether a thread of this process may switch from the normal policy to ``policy``."""
    allowed = [False]

    def probe() -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))  # this thread only
            allowed[0] = True
        except (OSError, AttributeError, TypeError):
            pass

    thread = threading.Thread(target=probe, name="hcs-sched-probe", daemon=True)
    thread.start()
    thread.join()
    return allowed[0]


def data_context() -> zmq.Context:
    """A new context whose I/O thread uses SCHED_BATCH where that is safely possible."""
    global _batch_allowed
    ctx = zmq.Context()
    if _SCHED_BATCH is None or not hasattr(zmq, "THREAD_SCHED_POLICY"):
        return ctx
    try:
        normal = os.sched_getscheduler(0) == _SCHED_OTHER
    except (OSError, AttributeError):
        return ctx
    if normal:  # the I/O thread inherits this thread's policy and priority
        if _batch_allowed is None:
            _batch_allowed = _probe_batch(_SCHED_BATCH)
        if _batch_allowed:
            ctx.set(zmq.THREAD_SCHED_POLICY, _SCHED_BATCH)
    return ctx
