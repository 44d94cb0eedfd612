"""Deferred ``flush`` requests: answered once the viewer has *shown* what was sent.

A pipeline calls flush with the last sequence number each producer sent. Two things must hold
before the answer: the listener has seen every one of those sequence numbers (received, or
counted as dropped, torn or rejected: nothing is waited for that can no longer come), and the
render tick has applied every frame committed up to that moment. The second is a generation
count: when the first condition is met we note how many frames were committed; the render tick
reports how many it had applied. Plain Python, no Qt: the listener thread calls it every loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Reply = Callable[[Any, dict[str, Any]], None]

#: flush waits at most this long whatever the client asks (a stuck flush must end).
MAX_TIMEOUT_S = 3600.0


@dataclass
class _Pending:
    token: Any
    until: dict[str, int]
    deadline: float
    timeout: float
    target: int | None = None  # commit count to wait for, once every seq was seen


class FlushBook:
    """The flush requests waiting for frames or for the screen."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._pending: list[_Pending] = []
        self._clock = clock

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, token: Any, until: Any, timeout: Any) -> str | None:
        """Queue a request; a malformed one gets its error text back instead."""
        if not isinstance(until, Mapping) or not all(
            isinstance(p, str) and isinstance(s, int) and not isinstance(s, bool)
            for p, s in until.items()
        ):
            return "flush needs 'until': an object of producer id -> last sequence number"
        try:
            seconds = float(timeout)
        except (TypeError, ValueError):
            return f"flush 'timeout_s' must be a number of seconds, got {timeout!r}"
        if not 0 <= seconds <= MAX_TIMEOUT_S:
            return f"flush 'timeout_s' must be between 0 and {MAX_TIMEOUT_S:.0f} s"
        self._pending.append(_Pending(token, dict(until), self._clock() + seconds, seconds))
        return None

    def check(
        self, seen: Mapping[str, int], committed: int, rendered: int, reply: Reply
    ) -> None:
        """Answer every request whose frames are on screen, or whose time is up."""
        if not self._pending:
            return
        now = self._clock()
        keep: list[_Pending] = []
        for p in self._pending:
            if p.target is None and not _missing(p.until, seen):
                p.target = committed
            if p.target is not None and rendered >= p.target:
                reply(p.token, {"ok": True, "rendered": rendered})
            elif now >= p.deadline:
                reply(p.token, self._timed_out(p, seen, rendered))
            else:
                keep.append(p)
        self._pending = keep

    def fail_all(self, reply: Reply, reason: str) -> None:
        for p in self._pending:
            reply(p.token, {"ok": False, "error": reason})
        self._pending.clear()

    @staticmethod
    def _timed_out(p: _Pending, seen: Mapping[str, int], rendered: int) -> dict[str, Any]:
        missing = _missing(p.until, seen)
        if missing:
            what = ", ".join(
                f"{prod}: seq {want} (last seen {seen.get(prod, 'none')})"
                for prod, want in missing.items()
            )
            error = f"flush timed out after {p.timeout:g} s waiting for frames from {what}"
        else:
            error = (
                f"flush timed out after {p.timeout:g} s: every frame arrived but only "
                f"{rendered} of {p.target} are rendered yet"
            )
        return {
            "ok": False,
            "error": error,
            "missing": {prod: {"until": want, "seen": seen.get(prod)}
                        for prod, want in missing.items()},
            "render_pending": not missing,
        }


def _missing(until: Mapping[str, int], seen: Mapping[str, int]) -> dict[str, int]:
    return {prod: want for prod, want in until.items() if seen.get(prod, -1) < want}
