"""The command line's arguments: checked where they are typed, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_hcs_stream.cli import build_parser, format_status
from napari_hcs_stream.demo import build_pipeline
from napari_hcs_stream.labels import human_bytes
from napari_hcs_stream.publisher import compile_pipeline


def test_viewer_keep_runs_and_demo_downsample_are_parsed():
    parser = build_parser()
    assert parser.parse_args(["viewer", "--keep-runs", "3"]).keep_runs == 3
    assert parser.parse_args(["viewer"]).keep_runs is None  # the plugin setting decides
    assert parser.parse_args(["viewer", "--memory-cap", "1.5"]).memory_cap == 1.5
    assert parser.parse_args(["viewer", "--memory-cap", "0"]).memory_cap == 0
    assert parser.parse_args(["viewer"]).memory_cap is None
    assert parser.parse_args(["demo", "--downsample", "4"]).downsample == 4
    assert parser.parse_args(["demo"]).downsample is None


@pytest.mark.parametrize(("argv", "message"), [
    (["viewer", "--keep-runs", "-1"], "expected a whole number >= 0, got '-1'"),
    (["viewer", "--keep-runs", "lots"], "expected a whole number >= 0, got 'lots'"),
    (["viewer", "--memory-cap", "0.1"], "or a number of GiB from 0.25, got '0.1'"),
    (["viewer", "--memory-cap", "nan"], "or a number of GiB from 0.25, got 'nan'"),
    (["demo", "--downsample", "0"], "expected a whole number from 1 to 64, got '0'"),
    (["demo", "--downsample", "65"], "expected a whole number from 1 to 64, got '65'"),
])
def test_bad_numbers_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_downsample_reaches_every_stream(tmp_path: Path):
    compiled = compile_pipeline(build_pipeline("demo", tmp_path, downsample=4))
    streams = [s for plan in compiled.steps for s in plan.streams]
    assert streams and all(s.config.downsample == 4 for s in streams)
    plain = compile_pipeline(build_pipeline("demo", tmp_path))
    assert all(s.config.downsample is None for plan in plain.steps for s in plan.streams)


def test_status_reads_like_a_summary():
    layer = {"name": "DAPI · out [r2]", "run": "r2", "frames": 6, "nbytes": 3 << 20,
             "downsample": 2}
    reply = {
        "ok": True, "protocol": [1, 0], "ready": True, "pid": 4242, "version": "0.1.0",
        "endpoint": "lab",
        "state": {
            "layers": [layer, {**layer, "name": "GFP · out [r2]"}], "frames": 12,
            "nbytes": 6 << 20, "max_bytes": 12 << 30, "runs": ["r2"], "keep_runs": 1,
            "runs_dropped": 1, "downsample": 4, "lowered": ["r2"],
            "receiver": {"address": "ipc:///run/lab.data", "control_address": "ipc:///run/lab.ctl",
                         "last_error": "header is not JSON",
                         "producers": {"host:1:ab": {"received": 12, "dropped": 3, "torn": 1,
                                                     "rejected": 2, "waited_s": 0.25,
                                                     "closed": True}}},
        },
    }
    text = format_status(reply)
    assert text.splitlines()[0] == ("viewer on 'lab': napari-hcs-stream 0.1.0 (pid 4242), "
                                    "protocol 1.0, listening")
    assert "memory 6.0 MiB of 12.0 GiB in 2 layers (12 frames)" in text
    assert "keep runs: 1 (1 dropped); new layers at 1/4" in text
    assert "run r2: 2 layers, 12 frames, 1/2 (lowered to fit the memory cap)" in text
    row = next(line for line in text.splitlines() if "host:1:ab" in line).split()
    assert row[1:5] == ["12", "3", "1", "2"] and row[5] == "0.2s" and row[6] == "(closed)"
    assert text.endswith("last error: header is not JSON")
    quiet = format_status({"ready": False, "state": {}})
    assert "not ready" in quiet and "keep runs: all" in quiet and "full resolution" in quiet


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 << 20, 12 << 30, 5 << 40)] == [
        "0 B", "1023 B", "1.5 KiB", "3.0 MiB", "12.0 GiB", "5120.0 GiB"]
