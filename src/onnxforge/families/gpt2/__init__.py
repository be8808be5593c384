"""GPT-2: a word -> a creative image prompt. Variants base, kv, pruned, kv-int8 (see build.py)."""

from ...store import publish_stage
from ..family import Family
from . import bench, build
from .recipe import Gpt2Recipe

FAMILY = Family(
    name="gpt2",
    recipe=Gpt2Recipe,
    plan=build.plan,
    stages={"source": build.source_stage, "prune": build.prune_stage, "export": build.export_stage,
            "quantize": build.quantize_stage, "validate": build.validate_stage, "publish": publish_stage},
    runtime_kind=build.RUNTIME_KIND,
    command="generate",
    bench=bench,
    toolchain=("torch", "transformers", "tokenizers", "onnxscript"),
    description="GPT-2 text generator",
    layout_note='optimum opens it as it is: ORTModelForCausalLM.from_pretrained("{dir}") (base: add use_cache=False; '
                'pruned: not at all, see the README)',
)
