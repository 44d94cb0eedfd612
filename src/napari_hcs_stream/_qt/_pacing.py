"""How often the render tick runs: as often as ~30 Hz, as rarely as the max wait.

Refreshing napari costs main-thread time (slicing, texture upload, drawing: tens of
milliseconds for a 2048x2048 plane in software OpenGL) and, through the GIL, slows the
listener thread that copies frames in. So the tick spends at most about ``duty`` of the main
thread: after a tick that changed something, the next one starts ``cost / duty`` after it
started, within ``[min_ms, max_ms]``. Updates that arrive meanwhile are coalesced by the
assembler, nothing is lost, and ``max_ms`` bounds how long a continuously fed layer waits to
be redrawn. When the listener is saturated (producers send faster than it takes frames in)
the duty drops, since the main thread's napari work competes with it for the GIL. Plain
Python.
"""

from __future__ import annotations

from collections.abc import Callable

#: fastest tick (about 30 Hz: more is not seen).
MIN_MS = 33
#: the max wait: a busy layer is still redrawn at least this often.
MAX_MS = 250
#: share of the main thread the tick may take while frames stream in (the redraw that
#: follows costs about as much again), and while the listener cannot keep up.
DUTY = 0.4
SATURATED_DUTY = 0.1
#: listener load (share of its time spent receiving) from which it counts as saturated.
SATURATED = 0.85


class Pacer:
    """Smoothed cost of the last ticks -> the next tick interval."""

    def __init__(
        self,
        min_ms: int = MIN_MS,
        max_ms: int = MAX_MS,
        duty: float = DUTY,
        load: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.duty = duty
        self.load = load
        self.cost_ms = 0.0

    def record(self, cost_ms: float) -> None:
        """A tick that applied updates took ``cost_ms`` (its own time; the redraw follows it)."""
        self.cost_ms = cost_ms if self.cost_ms == 0.0 else 0.5 * (self.cost_ms + cost_ms)

    def idle(self) -> None:
        """Nothing to apply: be ready to react quickly to the next frame."""
        self.cost_ms *= 0.5

    @property
    def interval_ms(self) -> int:
        duty = SATURATED_DUTY if self.load() >= SATURATED else self.duty
        return int(min(self.max_ms, max(self.min_ms, self.cost_ms / duty)))
