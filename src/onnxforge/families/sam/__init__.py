"""Segment Anything: image encoder + prompt decoder; variants fp32 and int8 (see build.py)."""

from ...store import publish_stage
from ..family import Family
from . import bench, build
from .recipe import SamRecipe

FAMILY = Family(
    name="sam",
    recipe=SamRecipe,
    plan=build.plan,
    stages={"source": build.source_stage, "export": build.export_stage, "quantize": build.quantize_stage,
            "validate": build.validate_stage, "publish": publish_stage},
    runtime_kind=build.RUNTIME_KIND,
    command="segment",
    bench=bench,
    toolchain=("torch", "transformers"),
    description="Segment Anything model",
)
