"""Stable Diffusion: text encoder, UNet, VAE decoder and encoder; variants choose float, static or dynamic
int8 per submodule. submodules.py is the table every stage reads; one module per stage."""

from ...store import publish_stage
from ..family import Family
from . import bench, calibrate, export, layout, plan, quantize, source, validate
from .recipe import SdRecipe

FAMILY = Family(
    name="sd",
    recipe=SdRecipe,
    plan=plan.plan,
    stages={"source": source.source_stage, "export": export.export_stage, "calibrate": calibrate.calibrate_stage,
            "quantize": quantize.quantize_stage, "validate": validate.validate_stage, "publish": publish_stage},
    runtime_kind=validate.RUNTIME_KIND,
    command="imagine",
    bench=bench,
    toolchain=("torch", "transformers", "diffusers", "tokenizers"),
    description="Stable Diffusion pipeline",
    export_layout=layout.export_layout,
)
