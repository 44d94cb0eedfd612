"""Open napari with the HCS Stream widget docked and listening (``napari-hcs-stream viewer``)."""

from __future__ import annotations

import os


def run_viewer(endpoint: str = "default", *, title: str | None = None) -> int:
    """Start napari, dock the widget, listen on ``endpoint``, and run the Qt event loop."""
    import napari

    os.environ.setdefault("NAPARI_HCS_STREAM_ENDPOINT", endpoint)
    viewer = napari.Viewer(title=title or f"napari-hcs-stream: {endpoint}")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-hcs-stream", "HCS Stream")
    if not widget.is_listening:
        widget.start(endpoint)
    napari.run()
    return 0
