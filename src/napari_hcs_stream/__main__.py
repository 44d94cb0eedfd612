"""``python -m napari_hcs_stream``: the same as the ``napari-hcs-stream`` command."""

from napari_hcs_stream.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
