"""The command line's arguments: checked where they are typed, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_hcs_stream.cli import build_parser
from napari_hcs_stream.demo import build_pipeline
from napari_hcs_stream.publisher import compile_pipeline


def test_viewer_keep_runs_and_demo_downsample_are_parsed():
    parser = build_parser()
    assert parser.parse_args(["viewer", "--keep-runs", "3"]).keep_runs == 3
    assert parser.parse_args(["viewer"]).keep_runs is None  # the plugin setting decides
    assert parser.parse_args(["demo", "--downsample", "4"]).downsample == 4
    assert parser.parse_args(["demo"]).downsample is None


@pytest.mark.parametrize(("argv", "message"), [
    (["viewer", "--keep-runs", "-1"], "expected a whole number >= 0, got '-1'"),
    (["viewer", "--keep-runs", "lots"], "expected a whole number >= 0, got 'lots'"),
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
