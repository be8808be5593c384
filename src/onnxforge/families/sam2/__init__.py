"""SAM 2.1 (Hiera encoder): image encoder with high-resolution features + batched prompt decoder; variants
name an encoder input size and int8 or not (see build.py). Its artifacts run on the SAM runtime."""

from ...store import publish_stage
from ..family import Family
from ..sam import bench
from . import build
from .recipe import Sam2Recipe

FAMILY = Family(
    name="sam2",
    recipe=Sam2Recipe,
    plan=build.plan,
    stages={"source": build.source_stage, "export": build.export_stage, "quantize": build.quantize_stage,
            "validate": build.validate_stage, "publish": publish_stage},
    runtime_kind=build.RUNTIME_KIND,
    command="segment",
    bench=bench,
    toolchain=("torch", "transformers"),
    description="SAM 2.1 model",
)
