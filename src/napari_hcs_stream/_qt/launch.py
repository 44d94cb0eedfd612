"""Open napari with the HCS Stream widget docked and listening (``napari-hcs-stream viewer``)."""

from __future__ import annotations

import os


def run_viewer(endpoint: str = "default", *, title: str | None = None,
               keep_runs: int | None = None, memory_cap_gib: float | None = None) -> int:
    """Start napari, dock the widget, listen on ``endpoint``, and run the Qt event loop.

    ``keep_runs``: keep only the newest runs this many (0: all; None: the user's setting).
    ``memory_cap_gib``: the memory cap of streamed layers (0: half the machine's memory;
    None: the user's setting).
    """
    import napari

    from ._settings import ENV_KEEP_RUNS, ENV_MEMORY_CAP

    os.environ.setdefault("NAPARI_HCS_STREAM_ENDPOINT", endpoint)
    if keep_runs is not None:
        os.environ[ENV_KEEP_RUNS] = str(keep_runs)
    if memory_cap_gib is not None:
        os.environ[ENV_MEMORY_CAP] = str(memory_cap_gib)
    viewer = napari.Viewer(title=title or f"napari-hcs-stream: {endpoint}")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-hcs-stream", "HCS Stream")
    if not widget.is_listening:
        widget.start(endpoint)
    napari.run()
    return 0
