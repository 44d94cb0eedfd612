"""Stream high-content-screening pipeline results, live, into napari.

Importing this package imports neither Qt nor napari: the pipeline side
(:mod:`napari_hcs_stream.publisher`) and the wire protocol run on workers without a GUI stack.
The napari plugin lives in :mod:`napari_hcs_stream._qt` and is loaded by npe2 on demand.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
