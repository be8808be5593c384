"""Machinery every model family's build file shares: plans, sources, checks."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

from ..config import Recipe, resolve_named_config
from ..sources import folder_fingerprint, hub_snapshot, local_folder
from ..store import StageContext, StageSpec

PACKAGE = Path(__file__).resolve().parents[1]


def builder_digest(module_file: str, *package_files: str) -> str:
    """Digest of a family's build code (its module + the package files it names): editing it rebuilds."""
    files = [Path(module_file).resolve(), PACKAGE / "models" / "common.py", PACKAGE / "quantize.py"]
    files += [PACKAGE / f for f in package_files]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def spec_factory(recipe: Recipe, module: str, family: str, builder: str):
    """A `spec(stage, variant, params, upstream, publishes, doc)` for one recipe of one family.

    Each stage runs `<module>:<stage>_stage`; the builder digest is part of every stage's params.
    """
    extra = {"family": family, "recipe_file": recipe.path, "recipe_digest": recipe.text_digest}

    def spec(stage, variant, params, upstream, publishes=False, doc=""):
        return StageSpec(stage=stage, recipe=recipe.name, variant=variant, params={**params, "builder": builder},
                         fn=f"{module}:{stage}_stage", upstream=tuple(upstream), publishes=publishes, doc=doc,
                         extra=extra)

    return spec


def source_params(recipe: Recipe, project_dir: Path) -> dict:
    """The source's identity for the digest; a random source adds its family's own keys."""
    src = recipe.body.source
    if src.kind == "random":
        r = src.random
        config = r.config if isinstance(r.config, dict) else resolve_named_config(r.config, Path(recipe.path).parent)
        return {"kind": "random", "config": config, "seed": r.seed}
    if src.kind == "hub":
        return {"kind": "hub", "repo": src.hub.repo, "revision": src.hub.revision}
    folder = Path(src.path) if Path(src.path).is_absolute() else project_dir / src.path
    return {"kind": "path", "path": str(folder), "files": folder_fingerprint(folder)}


def existing_model_dir(params: dict, ctx: StageContext, hub_files: list[str]) -> tuple[Path, dict]:
    """A hub or path source's folder and its record for the manifest."""
    if params["kind"] == "hub":
        folder = hub_snapshot(params["repo"], params["revision"], hub_files)
        return folder, {"kind": "hub", "repo": params["repo"], "revision": params["revision"]}
    folder = local_folder(params["path"], ctx.project_dir)
    return folder, {"kind": "path", "path": str(folder)}


def model_dir_of(ctx: StageContext, spec: StageSpec, stage: str) -> Path:
    """The model folder an upstream stage recorded (relative to its own folder, or absolute)."""
    path = Path(ctx.upstream_record(spec, stage)["model_dir"])
    return path if path.is_absolute() else ctx.upstream_dir(spec, stage) / path


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def record_check(checks: list, name: str, value, limit, ok: bool) -> None:
    checks.append({"check": name, "value": value, "limit": limit, "passed": bool(ok)})


ORT_CUSTOM_OPSETS = {"com.microsoft": 1}  # torch.onnx.export's custom_opsets for the op below


@functools.cache
def ort_multihead_attention():
    """A torch.autograd.Function `apply(q, k, v, bias, heads, scale)` that exports as onnxruntime's
    com.microsoft::MultiHeadAttention (TorchScript exporter).

    q (B, S, D), k and v (B, T, D) with the heads side by side in D; bias None or an additive
    (B, heads, S, T) attention_bias. PyTorch computes it with scaled_dot_product_attention, so parity
    checks compare the export with the model's own math. Why the fused op: onnxruntime runs it in one
    kernel (a tiled flash-attention kernel when there is no bias) instead of writing the full score
    matrix between MatMul, Add and Softmax; each family's export.fused_attention says what it measured.
    """
    import torch
    import torch.nn.functional as F
    from torch.onnx._internal.torchscript_exporter.symbolic_helper import _is_none, _optional_input_placeholder_tensor

    class MultiHeadAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, bias, heads: int, scale: float):
            def split(x):
                return x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)

            out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias, scale=scale)
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[2])

        @staticmethod
        def symbolic(g, q, k, v, bias, heads, scale):
            inputs = [q, k, v]
            if bias is not None and not _is_none(bias):
                absent = _optional_input_placeholder_tensor(g)  # the op's packed-QKV bias and key_padding_mask
                inputs += [absent, absent, bias]
            out = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=heads, scale_f=scale)
            out.setType(q.type())  # (B, S, D): v has q's width in the models that use it
            return out

    return MultiHeadAttention
