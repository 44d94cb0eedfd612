"""The pipeline side: publish images and labels to a viewer (imports neither Qt nor napari)."""

from __future__ import annotations

from ._publisher import DeliveryError, Publisher, PublisherStats, ring_geometry
from .compiler import CompiledPipeline, StepPlan, StreamPlan, ViewerSpec, compile_pipeline
from .config import (
    GlobalConfig,
    MaterializationConfig,
    NapariStreamingConfig,
    StreamingConfig,
    resolve,
)
from .pipeline import (
    Pipeline,
    RunResult,
    Step,
    StepError,
    close_publishers,
    run_pipeline,
    run_site,
)
from .plate import Plate, SyntheticPlate
from .wells import WellFilter, WellFilterError

__all__ = ["DeliveryError", "Publisher", "PublisherStats", "ring_geometry"]
# the pipeline side: configs, well filter, compiler, runner, plates (docs/pipeline.md)
__all__ += [
    "CompiledPipeline",
    "GlobalConfig",
    "MaterializationConfig",
    "NapariStreamingConfig",
    "Pipeline",
    "Plate",
    "RunResult",
    "Step",
    "StepError",
    "StepPlan",
    "StreamPlan",
    "StreamingConfig",
    "SyntheticPlate",
    "ViewerSpec",
    "WellFilter",
    "WellFilterError",
    "close_publishers",
    "compile_pipeline",
    "resolve",
    "run_pipeline",
    "run_site",
]
