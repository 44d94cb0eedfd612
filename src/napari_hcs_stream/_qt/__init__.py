"""The napari side of the plugin: everything that imports Qt or napari lives under here.

``widget`` (the dock widget npe2 opens), ``listener`` (the receiving thread), ``render`` (the
main-thread timer applying assembler updates to layers) and ``overlay`` (the dimension-label
text). Imports are lazy so ``napari_hcs_stream._qt.launch`` stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .listener import ListenerThread
    from .widget import StreamWidget

__all__ = ["ListenerThread", "StreamWidget"]


def __getattr__(name: str) -> Any:
    if name == "StreamWidget":
        from .widget import StreamWidget

        return StreamWidget
    if name == "ListenerThread":
        from .listener import ListenerThread

        return ListenerThread
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
