"""The package as users get it: npe2 finds the manifest (editable and wheel), the hub metadata."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_MANIFEST = ROOT / "src" / "napari_hcs_stream" / "napari.yaml"


def test_root_manifest_is_the_packaged_one():
    root = ROOT / "napari.yaml"
    assert root.is_file()
    assert root.read_bytes() == PACKAGE_MANIFEST.read_bytes()


def test_npe2_discovers_the_installed_plugin_and_its_widget():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover()
    manifest = pm.get_manifest("napari-hcs-stream")
    widgets = {w.display_name: w.command for w in manifest.contributions.widgets or []}
    assert widgets == {"HCS Stream": "napari-hcs-stream.stream_widget"}
    command = next(c for c in manifest.contributions.commands if c.id == widgets["HCS Stream"])
    assert command.python_name == "napari_hcs_stream._qt.widget:StreamWidget"


def test_npe2_validate_with_imports():
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent))
    if npe2 is None:
        pytest.skip("npe2 command not installed next to this python")
    proc = subprocess.run([npe2, "validate", "napari-hcs-stream", "--imports"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hub_metadata():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "Framework :: napari" in meta["classifiers"]
    assert meta["entry-points"]["napari.manifest"] == {
        "napari-hcs-stream": "napari_hcs_stream:napari.yaml"
    }
    assert set(meta["dependencies"]) == {"numpy>=1.24", "pyzmq>=25"}  # a worker needs no Qt
    assert {"Bug Tracker", "Source Code", "User Support"} <= set(meta["urls"])


@pytest.mark.slow
def test_wheel_ships_the_manifest_and_entry_point(tmp_path: Path):
    pytest.importorskip("hatchling")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("napari_hcs_stream-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "napari_hcs_stream/napari.yaml" in names
        assert "napari_hcs_stream/py.typed" in names
        assert zf.read("napari_hcs_stream/napari.yaml") == PACKAGE_MANIFEST.read_bytes()
        (eps,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(eps).decode()
    assert "[napari.manifest]" in text
    assert "napari-hcs-stream = napari_hcs_stream:napari.yaml" in text
