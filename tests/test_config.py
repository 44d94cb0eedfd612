"""Configs: field-by-field inheritance over three levels, and errors where they are written."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from napari_hcs_stream.publisher.config import (
    DEFAULTS,
    GlobalConfig,
    MaterializationConfig,
    NapariStreamingConfig,
    StreamingConfig,
    resolve,
)
from napari_hcs_stream.publisher.wells import WellFilter, WellFilterError


def test_global_defaults():
    r = resolve()
    assert isinstance(r, NapariStreamingConfig)
    assert (r.enabled, r.endpoint, r.persistent, r.strict, r.transport, r.outputs) == (
        True, "default", True, False, "auto", "all")
    assert r.well_filter is None and r.well_filter_mode == "include"
    assert r.modes["channel"] == "layer" and r.modes["well"] == "stack"
    assert r.colormaps["DAPI"] == "blue"
    assert r.channel_names == {}


def test_an_empty_step_config_inherits_everything():
    assert resolve(NapariStreamingConfig()) == resolve()


def test_three_levels_field_by_field():
    step = NapariStreamingConfig(endpoint="step-viewer", colormaps={"GFP": "cyan"})
    pipeline = NapariStreamingConfig(endpoint="pipeline-viewer", well_filter="row:B",
                                     persistent=False, modes={"site": "layer"})
    defaults = GlobalConfig(streaming=NapariStreamingConfig(strict=True, transport="frames",
                                                            persistent=True))
    r = resolve(step, pipeline, defaults=defaults)
    assert r.endpoint == "step-viewer"  # step beats pipeline
    assert r.persistent is False  # pipeline beats global
    assert r.well_filter == WellFilter.parse("row:B")  # from the pipeline, parsed
    assert r.strict is True and r.transport == "frames"  # from the global level
    assert r.enabled is True and r.outputs == "all"  # built-in defaults fill the rest
    assert r.colormaps["GFP"] == "cyan" and r.colormaps["DAPI"] == "blue"  # merged by key
    assert r.modes["site"] == "layer" and r.modes["channel"] == "layer"
    assert r.downsample is None  # nobody asked: the viewer's own setting decides
    assert resolve(step, NapariStreamingConfig(downsample=4)).downsample == 4
    assert resolve(NapariStreamingConfig(downsample=1),
                   NapariStreamingConfig(downsample=4)).downsample == 1


def test_false_is_a_value_not_inherit():
    r = resolve(NapariStreamingConfig(enabled=False), NapariStreamingConfig(enabled=True))
    assert r.enabled is False


def test_none_levels_are_skipped():
    assert resolve(None, NapariStreamingConfig(endpoint="x"), None).endpoint == "x"


def test_result_has_the_most_specific_class():
    class MyConfig(StreamingConfig):
        pass

    r = resolve(MyConfig(endpoint="mine"), NapariStreamingConfig(colormaps={"A": "red"}))
    assert type(r) is MyConfig
    assert r.endpoint == "mine" and not hasattr(r, "colormaps")
    r2 = resolve(NapariStreamingConfig(), StreamingConfig(endpoint="base"))
    assert type(r2) is NapariStreamingConfig and r2.endpoint == "base"


def test_mode_from_another_level_applies_to_the_filter():
    r = resolve(NapariStreamingConfig(well_filter="row:A"),
                NapariStreamingConfig(well_filter_mode="exclude"))
    assert r.well_filter.mode == "exclude" and r.well_filter_mode == "exclude"
    assert "A01" not in r.well_filter and "B01" in r.well_filter


def test_a_filter_object_keeps_its_mode_unless_a_level_sets_one():
    f = WellFilter.parse("row:A", mode="exclude")
    assert resolve(NapariStreamingConfig(well_filter=f)).well_filter.mode == "exclude"
    r = resolve(NapariStreamingConfig(well_filter=f),
                NapariStreamingConfig(well_filter_mode="include"))
    assert r.well_filter.mode == "include"  # an explicit field beats the object's own mode


def test_same_level_mode_conflict_is_an_error():
    f = WellFilter.parse("row:A", mode="exclude")
    with pytest.raises(ValueError, match="set only one"):
        NapariStreamingConfig(well_filter=f, well_filter_mode="include")


def test_partial_global_config_is_completed():
    g = GlobalConfig(streaming=StreamingConfig(endpoint="lab"))
    assert g.streaming.endpoint == "lab" and g.streaming.enabled is True
    r = resolve(NapariStreamingConfig(), defaults=g)
    assert r.endpoint == "lab" and r.colormaps["DAPI"] == "blue"
    assert GlobalConfig(materialization=MaterializationConfig()).materialization.backend == "disk"


def test_configs_are_frozen_and_copy_what_they_are_given():
    spots = ["A01", "B02"]
    colours = {"DAPI": "blue"}
    cfg = NapariStreamingConfig(well_filter=spots, colormaps=colours)
    spots.append("C03")
    colours["GFP"] = "green"
    assert cfg.well_filter == ("A01", "B02") and cfg.colormaps == {"DAPI": "blue"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.enabled = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve(cfg).endpoint = "x"  # type: ignore[misc]
    assert dataclasses.replace(cfg, enabled=False).enabled is False


def test_configs_pickle():
    cfg = resolve(NapariStreamingConfig(well_filter="row:A", channel_names={0: "Nuclei"}))
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # noqa: S301 (our own bytes)
    m = MaterializationConfig(backend="disk", output_dir="out")
    assert pickle.loads(pickle.dumps(m)) == m  # noqa: S301 (our own bytes)


def test_explicit_addresses_are_accepted():
    assert NapariStreamingConfig(endpoint="tcp://127.0.0.1:5555").endpoint.startswith("tcp")
    assert NapariStreamingConfig(endpoint="ipc:///tmp/x.data").endpoint.startswith("ipc")


def test_modes_are_normalised():
    assert NapariStreamingConfig(modes={"channel": "STACK"}).modes == {"channel": "stack"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"enabled": "yes"}, TypeError, "enabled must be True or False"),
        ({"enabled": 1}, TypeError, "enabled must be True or False"),
        ({"persistent": 0}, TypeError, "persistent"),
        ({"strict": "no"}, TypeError, "strict"),
        ({"endpoint": 5}, TypeError, "endpoint must be a viewer name"),
        ({"endpoint": ""}, ValueError, "endpoint"),
        ({"endpoint": "my viewer!"}, ValueError, "not valid"),
        ({"transport": "tcp"}, ValueError, "transport must be one of"),
        ({"well_filter_mode": "only"}, ValueError, "well_filter_mode"),
        ({"outputs": "everything"}, ValueError, "outputs"),
        ({"well_filter": 2.5}, TypeError, "well_filter must be"),
        ({"well_filter": True}, TypeError, "well_filter must be"),
        ({"well_filter": "Z99"}, WellFilterError, "Z99"),
        ({"well_filter": "row:A,,B03"}, WellFilterError, "stray comma"),
        ({"well_filter": 0}, WellFilterError, "N > 0"),
        ({"modes": "stack"}, TypeError, "modes must be a dict"),
        ({"modes": {"plate": "stack"}}, ValueError, "not a component"),
        ({"modes": {"channel": "tile"}}, ValueError, "'stack', 'layer'"),
        ({"modes": {"channel": 1}}, TypeError, "must be a string"),
        ({"colormaps": {1: "red"}}, TypeError, "key 1"),
        ({"colormaps": {"DAPI": None}}, TypeError, "must be a string"),
        ({"channel_names": {True: "x"}}, TypeError, "key True"),
        ({"downsample": 0}, ValueError, "downsample must be from 1"),
        ({"downsample": 65}, ValueError, "downsample must be from 1"),
        ({"downsample": 2.0}, TypeError, "downsample must be a whole number"),
        ({"downsample": True}, TypeError, "downsample must be a whole number"),
    ],
)
def test_streaming_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        NapariStreamingConfig(**kwargs)


def test_base_config_validation_and_well_filter_error_is_a_value_error():
    with pytest.raises(ValueError, match="bad well filter token"):
        StreamingConfig(well_filter="row:Q9")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "s3"}, ValueError, "backend must be one of"),
        ({"backend": "memory"}, ValueError, "backend must be one of"),
        ({"checkpoint": "yes"}, TypeError, "checkpoint must be True or False"),
        ({"output_dir": 5}, TypeError, "output_dir must be a folder path"),
    ],
)
def test_materialization_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        MaterializationConfig(**kwargs)


def test_materialization_paths():
    assert MaterializationConfig(output_dir="x/y").output_dir == Path("x/y")
    assert MaterializationConfig().checkpoint is True


def test_global_config_validation():
    with pytest.raises(TypeError, match=r"GlobalConfig\.streaming"):
        GlobalConfig(streaming=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"GlobalConfig\.materialization"):
        GlobalConfig(materialization={"backend": "disk"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="persist_final_step"):
        GlobalConfig(persist_final_step="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="resolve"):
        resolve({"endpoint": "x"})  # type: ignore[arg-type]
    assert DEFAULTS.output_dir is None and DEFAULTS.persist_final_step is True


def test_server_key_is_checked_and_inherited(tmp_path: Path) -> None:
    from napari_hcs_stream import auth

    key = auth.key_pair()[0].decode()
    assert NapariStreamingConfig(server_key=f"  {key}\n").server_key == key
    key_file = tmp_path / "viewer.key"
    key_file.write_bytes((auth.keys_dir() / "id.key").read_bytes())
    assert NapariStreamingConfig(server_key=str(key_file)).server_key == key  # a key file
    with pytest.raises(ValueError, match="server_key: 'not-a-key' is neither a public key"):
        NapariStreamingConfig(server_key="not-a-key")
    with pytest.raises(TypeError, match="server_key must be"):
        NapariStreamingConfig(server_key=key.encode())  # type: ignore[arg-type]
    step = NapariStreamingConfig(endpoint="tcp://10.0.0.7:5555")
    assert resolve(step, NapariStreamingConfig(server_key=key)).server_key == key
    assert resolve(step).server_key is None  # the environment or this machine's key
