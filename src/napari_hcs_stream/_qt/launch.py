"""Open napari with the HCS Stream widget docked and listening (``napari-hcs-stream viewer``)."""

from __future__ import annotations

import os


def run_viewer(endpoint: str = "default", *, title: str | None = None,
               keep_runs: int | None = None) -> int:
    """Start napari, dock the widget, listen on ``endpoint``, and run the Qt event loop.

    ``keep_runs``: keep only the newest runs this many (0: all; None: the user's setting).
    """
    import napari

    from ._settings import ENV_KEEP_RUNS

    os.environ.setdefault("NAPARI_HCS_STREAM_ENDPOINT", endpoint)
    if keep_runs is not None:
        os.environ[ENV_KEEP_RUNS] = str(keep_runs)
    viewer = napari.Viewer(title=title or f"napari-hcs-stream: {endpoint}")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-hcs-stream", "HCS Stream")
    if not widget.is_listening:
        widget.start(endpoint)
    napari.run()
    return 0
