"""Compile-time detection of streaming configs and the materialization-aware filter.

``FILTER_TABLE`` is the table of ``docs/pipeline.md``, row for row: each row is one test.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from napari_hcs_stream.publisher.compiler import (
    CompiledPipeline,
    ViewerSpec,
    compile_pipeline,
    find_streaming_configs,
)
from napari_hcs_stream.publisher.config import (
    GlobalConfig,
    MaterializationConfig,
    NapariStreamingConfig,
    StreamingConfig,
)
from napari_hcs_stream.publisher.pipeline import Pipeline, Step
from napari_hcs_stream.publisher.plate import SyntheticPlate, plate_wells
from napari_hcs_stream.publisher.wells import WellFilterError

P96 = plate_wells(96)


def identity(image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    return image


class OtherViewerConfig(StreamingConfig):
    """A config for some future viewer: the compiler must find it without knowing it."""

    viewer_kind = "other"


def compile_one(step: Step, *, final: bool = False, tmp: Path = Path("/nonexistent"),
                defaults: GlobalConfig | None = None, pipeline_streaming=None):
    """Compile ``step`` (followed by a plain memory step unless ``final``) and return its plan."""
    steps = [step] if final else [step, Step("tail", identity)]
    pipe = Pipeline("p", steps, streaming=pipeline_streaming, output_dir=tmp)
    compiled = compile_pipeline(pipe, defaults=defaults)
    return compiled, compiled.steps[0]


NAPARI = NapariStreamingConfig()
CKPT = MaterializationConfig(checkpoint=True)

# (id, step kwargs, final, defaults, pipeline streaming) -> (main, checkpoint, reason pattern,
# wells that stream or None for all)
FILTER_TABLE = [
    ("memory, no config", {"backend": "memory"}, False, None, None,
     (False, False, "no streaming config", None)),
    ("memory, config", {"backend": "memory", "streaming": NAPARI}, False, None, None,
     (False, False, "memory-only step without a checkpoint", None)),
    ("disk, config", {"backend": "disk", "streaming": NAPARI}, False, None, None,
     (True, False, r"streams its output \(disk\)", None)),
    ("zarr, config", {"backend": "zarr", "streaming": NAPARI}, False, None, None,
     (True, False, r"streams its output \(zarr\)", None)),
    ("memory + checkpoint, config", {"materialization": CKPT, "streaming": NAPARI}, False, None,
     None, (False, True, r"streams its checkpoint \(disk\)", None)),
    ("memory + checkpoint=False, config",
     {"materialization": MaterializationConfig(checkpoint=False), "streaming": NAPARI}, False,
     None, None, (False, False, "memory-only step without a checkpoint", None)),
    ("disk + checkpoint, config", {"backend": "disk", "materialization": CKPT, "streaming": NAPARI},
     False, None, None, (True, True, "streams its output .* and its checkpoint", None)),
    ("disk + checkpoint, outputs=main",
     {"backend": "disk", "materialization": CKPT,
          "streaming": NapariStreamingConfig(outputs="main")},
     False, None, None, (True, False, r"streams its output \(disk\) to", None)),
    ("disk + checkpoint, outputs=checkpoint",
     {"backend": "disk", "materialization": CKPT,
          "streaming": NapariStreamingConfig(outputs="checkpoint")},
     False, None, None, (False, True, r"streams its checkpoint \(disk\) to", None)),
    ("disk, outputs=checkpoint, no checkpoint",
     {"backend": "disk", "streaming": NapariStreamingConfig(outputs="checkpoint")},
     False, None, None,
     (False, False, "not streamed: outputs='checkpoint' but the step persists", None)),
    ("disk, config disabled",
     {"backend": "disk", "streaming": NapariStreamingConfig(enabled=False)},
     False, None, None, (False, False, r"disabled \(enabled=False\)", None)),
    ("disk, disabled by the pipeline", {"backend": "disk", "streaming": NAPARI}, False, None,
     NapariStreamingConfig(enabled=False), (False, False, "disabled", None)),
    ("disk, well filter row:B",
     {"backend": "disk", "streaming": NapariStreamingConfig(well_filter="row:B")},
     False, None, None, (True, False, "wells row:B", [f"B{c:02d}" for c in range(1, 13)])),
    ("disk, well filter exclude col:01",
     {"backend": "disk", "streaming": NapariStreamingConfig(well_filter="col:01",
                                                          well_filter_mode="exclude")},
     False, None, None, (True, False, "wells all but col:01",
                         [w for w in P96 if not w.endswith("01")])),
    ("disk, well filter from the pipeline", {"backend": "disk", "streaming": NAPARI}, False,
     None, NapariStreamingConfig(well_filter=3), (True, False, "wells 3", P96[:3])),
    ("disk, config only on the pipeline", {"backend": "disk"}, False, None,
     NapariStreamingConfig(), (False, False, "no streaming config", None)),
    ("final memory step, config", {"streaming": NAPARI}, True, None, None,
     (True, False, "final step, written to disk as the pipeline's result", None)),
    ("final memory step, persist_final_step=False", {"streaming": NAPARI}, True,
     GlobalConfig(persist_final_step=False), None,
     (False, False, "memory-only step without a checkpoint", None)),
    ("final memory step, no config", {}, True, None, None,
     (False, False, r"no streaming config \(writes its output \(disk\)\): not streamed", None)),
]


@pytest.mark.parametrize(
    ("step_kwargs", "final", "defaults", "pipeline_streaming", "expected"),
    [row[1:] for row in FILTER_TABLE],
    ids=[row[0] for row in FILTER_TABLE],
)
def test_filter_table(step_kwargs, final, defaults, pipeline_streaming, expected, tmp_path,
                      monkeypatch):
    if step_kwargs.get("backend") == "zarr" and importlib.util.find_spec("zarr") is None:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "zarr" else real(name, *a))
    main, checkpoint, reason, wells = expected
    compiled, plan = compile_one(Step("s", identity, **step_kwargs), final=final,
                                 tmp=tmp_path, defaults=defaults,
                                 pipeline_streaming=pipeline_streaming)
    assert (plan.stream_main, plan.stream_checkpoint) == (main, checkpoint)
    assert re.search(reason, plan.reason), plan.reason
    if main or checkpoint:
        assert compiled.viewers == [ViewerSpec("napari", "default", True, "auto")]
        got = P96 if plan.well_filter is None else plan.well_filter.apply(P96)
        assert got == (wells or P96)
        assert plan.streaming is not None and plan.streaming.enabled
    else:
        assert compiled.viewers == []
        assert plan.streaming is None


def test_final_memory_step_is_written_to_disk(tmp_path):
    _, plan = compile_one(Step("s", identity), final=True, tmp=tmp_path)
    assert plan.final and plan.backend == "disk"
    assert plan.output_dir == tmp_path / plan.output_dir.parent.name / "s"
    _, kept = compile_one(Step("s", identity), final=True, tmp=tmp_path,
                          defaults=GlobalConfig(persist_final_step=False))
    assert kept.backend == "memory" and kept.output_dir is None


def test_output_and_checkpoint_folders(tmp_path):
    step = Step("my step/1", identity, backend="disk",
                materialization=MaterializationConfig(output_dir=tmp_path / "ck"))
    pipe = Pipeline("p", [step, Step("t", identity)], output_dir=tmp_path / "out")
    compiled = compile_pipeline(pipe, run_id="run-1")
    plan = compiled.steps[0]
    assert plan.output_dir == tmp_path / "out" / "run-1" / "my_step_1"
    assert plan.checkpoint_dir == tmp_path / "ck" / "run-1" / "my_step_1.checkpoint"
    assert plan.source == "my step/1" and plan.checkpoint_source == "my step/1 (checkpoint)"
    own = Step("own", identity, backend="disk", output_dir=tmp_path / "elsewhere")
    plan2 = compile_pipeline(Pipeline("p", [own], output_dir=tmp_path), run_id="r").steps[0]
    assert plan2.output_dir == tmp_path / "elsewhere" / "r" / "own"


# -- detection -------------------------------------------------------------------------------
def test_detection_finds_configs_in_any_attribute_and_any_subclass(tmp_path):
    plain = Step("plain", identity, backend="disk")
    usual = Step("usual", identity, backend="disk", streaming=NapariStreamingConfig())
    odd = Step("odd", identity, backend="disk")
    odd.show_me_this_in_napari_please = NapariStreamingConfig(endpoint="odd")  # type: ignore[attr-defined]
    other = Step("other", identity, backend="disk")
    other.viewer = OtherViewerConfig(endpoint="other")  # type: ignore[attr-defined]
    assert find_streaming_configs(plain) == []
    assert [a for a, _ in find_streaming_configs(usual)] == ["streaming"]
    assert find_streaming_configs(odd) == [("show_me_this_in_napari_please",
                                            NapariStreamingConfig(endpoint="odd"))]
    pipe = Pipeline("p", [plain, usual, odd, other], output_dir=tmp_path)
    compiled = compile_pipeline(pipe)
    assert [p.stream_main for p in compiled.steps] == [False, True, True, True]
    assert compiled.steps[2].streams[0].attribute == "show_me_this_in_napari_please"
    assert type(compiled.steps[3].streaming) is OtherViewerConfig
    assert compiled.viewers == [
        ViewerSpec("napari", "default", True, "auto"),
        ViewerSpec("napari", "odd", True, "auto"),
        ViewerSpec("other", "other", True, "auto"),
    ]


def test_detection_in_a_step_subclass_class_attribute(tmp_path):
    class ShownStep(Step):
        napari = NapariStreamingConfig(endpoint="cls")

    step = ShownStep("s", identity, backend="disk")
    assert find_streaming_configs(step) == [("napari", NapariStreamingConfig(endpoint="cls"))]
    compiled = compile_pipeline(Pipeline("p", [step], output_dir=tmp_path))
    assert [v.endpoint for v in compiled.viewers] == ["cls"]


def test_several_configs_on_one_step(tmp_path):
    step = Step("s", identity, backend="disk", streaming=NapariStreamingConfig(endpoint="a"))
    step.second = NapariStreamingConfig(endpoint="b", well_filter="row:A")  # type: ignore[attr-defined]
    compiled = compile_pipeline(Pipeline("p", [step], output_dir=tmp_path))
    plan = compiled.steps[0]
    assert [s.endpoint for s in plan.streams] == ["a", "b"]
    assert "[streaming]" in plan.reason and "[second]" in plan.reason
    assert [v.endpoint for v in compiled.viewers] == ["a", "b"]
    step.second = NapariStreamingConfig(endpoint="a")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="several streaming configs for the viewer 'a'"):
        compile_pipeline(Pipeline("p", [step], output_dir=tmp_path))


def test_no_config_anywhere_needs_no_viewer(tmp_path):
    pipe = Pipeline("p", [Step("a", identity, backend="disk"), Step("b", identity)],
                    streaming=NapariStreamingConfig(), output_dir=tmp_path)
    compiled = compile_pipeline(pipe)
    assert compiled.viewers == []
    assert not compiled.streams
    assert all(not p.streams for p in compiled.steps)


def test_one_viewer_per_endpoint(tmp_path):
    steps = [
        Step("a", identity, backend="disk", streaming=NapariStreamingConfig(persistent=False)),
        Step("b", identity, backend="disk",
             streaming=NapariStreamingConfig(transport="frames")),
        Step("c", identity, backend="disk", streaming=NapariStreamingConfig(endpoint="two")),
        Step("d", identity, streaming=NapariStreamingConfig(endpoint="never")),  # memory
        Step("e", identity),
    ]
    compiled = compile_pipeline(Pipeline("p", steps, output_dir=tmp_path,
                                         streaming=NapariStreamingConfig(persistent=False)))
    assert compiled.viewers == [
        ViewerSpec("napari", "default", False, "auto"),  # transports disagree: auto
        ViewerSpec("napari", "two", False, "auto"),
    ]


def test_viewer_persistent_if_any_step_wants_it(tmp_path):
    steps = [Step("a", identity, backend="disk", streaming=NapariStreamingConfig()),
             Step("b", identity, backend="disk",
                  streaming=NapariStreamingConfig(persistent=False, transport="shm"))]
    compiled = compile_pipeline(Pipeline("p", steps, output_dir=tmp_path))
    assert compiled.viewers == [ViewerSpec("napari", "default", True, "auto")]


def test_viewer_kinds_must_not_share_an_endpoint(tmp_path):
    steps = [Step("a", identity, backend="disk", streaming=NapariStreamingConfig()),
             Step("b", identity, backend="disk", streaming=OtherViewerConfig())]
    with pytest.raises(ValueError, match="different viewers"):
        compile_pipeline(Pipeline("p", steps, output_dir=tmp_path))


# -- compile-time errors ----------------------------------------------------------------------
def test_missing_output_folder_is_a_compile_error():
    with pytest.raises(ValueError, match="no output folder is set"):
        compile_pipeline(Pipeline("p", [Step("a", identity, backend="disk")]))
    with pytest.raises(ValueError, match="the final step's result is always written"):
        compile_pipeline(Pipeline("p", [Step("last", identity)]))
    compiled = compile_pipeline(Pipeline("p", [Step("a", identity)]),
                                defaults=GlobalConfig(persist_final_step=False))
    assert compiled.steps[0].output_dir is None


def test_global_output_folder(tmp_path):
    compiled = compile_pipeline(Pipeline("p", [Step("a", identity)]),
                                defaults=GlobalConfig(output_dir=tmp_path), run_id="r")
    assert compiled.steps[0].output_dir == tmp_path / "r" / "a"


def test_zarr_without_the_package_is_a_compile_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "zarr" else real(name, *a))
    with pytest.raises(ValueError, match="zarr package is not installed"):
        compile_pipeline(Pipeline("p", [Step("a", identity, backend="zarr")],
                                  output_dir=tmp_path))
    ck = MaterializationConfig(backend="zarr")
    with pytest.raises(ValueError, match="pip install zarr"):
        compile_pipeline(Pipeline("p", [Step("a", identity, materialization=ck)],
                                  output_dir=tmp_path))


def test_run_id(tmp_path):
    pipe = Pipeline("My screen #4", [Step("a", identity)], output_dir=tmp_path)
    auto = compile_pipeline(pipe).run_id
    assert re.match(r"^My_screen_4-\d{8}-\d{6}-[0-9a-f]{6}$", auto), auto
    assert compile_pipeline(pipe, run_id="plate-7").run_id == "plate-7"
    for bad in ("", "../x", "a b", "-x", "x" * 200):
        with pytest.raises(ValueError, match="run_id"):
            compile_pipeline(pipe, run_id=bad)


def test_compile_argument_types(tmp_path):
    with pytest.raises(TypeError, match="takes a Pipeline"):
        compile_pipeline([Step("a", identity)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GlobalConfig"):
        compile_pipeline(Pipeline("p", [Step("a", identity)], output_dir=tmp_path),
                         defaults=NapariStreamingConfig())  # type: ignore[arg-type]


def test_pipeline_and_step_validation():
    with pytest.raises(ValueError, match="no steps"):
        Pipeline("p", [])
    with pytest.raises(ValueError, match="distinct"):
        Pipeline("p", [Step("a", identity), Step("a", identity)])
    with pytest.raises(ValueError, match="distinct"):
        Pipeline("p", [Step("a b", identity), Step("a/b", identity)])  # same folder
    with pytest.raises(TypeError, match="Step objects"):
        Pipeline("p", [identity])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="streaming must be a StreamingConfig"):
        Pipeline("p", [Step("a", identity)], streaming={"endpoint": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        Step("a", identity, backend="s3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        Step("a", identity, kind="points")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        Step("a", "identity")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="MaterializationConfig"):
        Step("a", identity, materialization=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NapariStreamingConfig"):
        Step("a", identity, streaming=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        Step("", identity)
    with pytest.raises(TypeError):
        Step("a", identity, "disk")  # type: ignore[misc]  # options are keyword-only


# -- binding to a plate -----------------------------------------------------------------------
def test_for_plate_binds_first_n_and_checks_filters(tmp_path):
    step = Step("a", identity, backend="disk", streaming=NapariStreamingConfig(well_filter=2))
    compiled = compile_pipeline(Pipeline("p", [step], output_dir=tmp_path))
    plate = SyntheticPlate(n_wells=24, sites=1, size=32, only_wells=("B02", "A03", "D06"))
    bound = compiled.for_plate(plate)
    wf = bound.steps[0].well_filter
    assert "A03" in wf and "B02" in wf and "D06" not in wf
    bad = Step("a", identity, backend="disk", streaming=NapariStreamingConfig(well_filter="H12"))
    compiled = compile_pipeline(Pipeline("p", [bad], output_dir=tmp_path))
    with pytest.raises(WellFilterError, match="outside this 24-well plate"):
        compiled.for_plate(plate)


def test_compiled_plan_pickles(tmp_path):
    step = Step("a", identity, backend="disk", materialization=CKPT,
                streaming=NapariStreamingConfig(well_filter="row:A,col:2"))
    compiled = compile_pipeline(Pipeline("p", [step], output_dir=tmp_path))
    again = pickle.loads(pickle.dumps(compiled))  # noqa: S301 (our own bytes)
    assert isinstance(again, CompiledPipeline)
    assert again.steps[0].func is identity
    assert again.steps[0].streams == compiled.steps[0].streams
    assert "a: streams its output (disk) and its checkpoint (disk)" in compiled.describe()


def test_a_viewer_has_one_server_key(tmp_path):
    from napari_hcs_stream import auth

    key = auth.key_pair()[0].decode()
    far = "tcp://10.1.2.3:5555"
    steps = [Step("a", identity, backend="disk",
                  streaming=NapariStreamingConfig(endpoint=far, server_key=key)),
             Step("b", identity, backend="disk", streaming=NapariStreamingConfig(endpoint=far))]
    compiled = compile_pipeline(Pipeline("p", steps, output_dir=tmp_path))
    assert compiled.viewers == [ViewerSpec("napari", far, True, "auto", server_key=key)]
    other = auth.parse_key("rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7")
    steps[1] = Step("b", identity, backend="disk",
                    streaming=NapariStreamingConfig(endpoint=far, server_key=other.decode()))
    with pytest.raises(ValueError, match="2 different server keys"):
        compile_pipeline(Pipeline("p", steps, output_dir=tmp_path))
