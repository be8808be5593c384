"""Build machinery every model family shares: plans, sources, checks, publishing. Knows no family by name."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

from ..config import Recipe, resolve_named_config
from ..sources import POCKET_MANIFEST, folder_fingerprint, hub_snapshot, local_folder, verify_pocket_folder
from typing import Literal

from ..store import PublishParams, StageContext, StageParams, StageSpec, link_or_copy, onnx_files

PACKAGE = Path(__file__).resolve().parents[1]


def builder_digest(family_dir: str, *package_files: str) -> str:
    """Digest of a family's build code (every .py in its package + the shared build files + the package
    files it names, e.g. its runtime): editing any of them rebuilds. bench.py only measures built
    artifacts (benchmarks, budget checks), so editing it rebuilds nothing."""
    folder = Path(family_dir).resolve()
    folder = folder if folder.is_dir() else folder.parent
    files = sorted(p for p in folder.glob("*.py") if p.name != "bench.py")
    files += [PACKAGE / "families" / "common.py", PACKAGE / "quantize.py"]
    files += [PACKAGE / f for f in package_files]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def spec_factory(recipe: Recipe, builder: str):
    """A `spec(stage, variant, params, upstream, doc)` for one recipe; its family's `stages[stage]` builds it.

    params: the stage's typed StageParams; the builder digest is part of every stage's digest.
    """
    extra = {"recipe_file": recipe.path, "recipe_digest": recipe.text_digest}

    def spec(stage, variant, params: StageParams, upstream, doc=""):
        return StageSpec(stage=stage, recipe=recipe.name, variant=variant, params=params, builder=builder,
                         family=recipe.body.family, upstream=tuple(upstream), publishes=stage == "publish", doc=doc,
                         extra=extra)

    return spec


def publish_spec(spec, variant: str, validate: StageSpec, runtime_defaults: dict) -> StageSpec:
    """The publishing stage after a variant's validate stage: the recipe's runtime defaults live only
    here, so changing one re-publishes without re-validating (store.publish_stage)."""
    return spec("publish", variant, PublishParams(runtime=runtime_defaults), [validate], doc="publish with runtime defaults")


class SourceParams(StageParams):
    """Where the weights come from (one of the recipe's hub / path / random); families add their own keys."""

    kind: Literal["random", "hub", "path", "train"]
    config: dict | None = None  # random: the model config (a named config resolved)
    seed: int | None = None
    repo: str | None = None  # hub
    revision: str | None = None
    path: str | None = None  # path: the folder, and a cheap fingerprint of its files
    files: list | None = None


def fail_on(checks: list, results: dict) -> None:
    """Mark the results passed, or stop the build naming every failed check: nothing is published."""
    from ..store import ValidationFailed

    failed = [c for c in checks if not c["passed"]]
    results["passed"] = not failed
    if failed:
        detail = "; ".join(f"{c['check']}: {c['value']} (limit {c['limit']})" for c in failed)
        raise ValidationFailed(f"failed, nothing published: {detail}")


def source_params(recipe: Recipe, project_dir: Path) -> dict:
    """The source's identity for the digest; a random source adds its family's own keys."""
    src = recipe.body.source
    if src.kind in ("random", "train"):
        r = getattr(src, src.kind)
        if getattr(r, "config", None) is None:  # a train source without a model config (sd, sam): its keys
            return {"kind": src.kind, "config": r.model_dump(mode="json"), "seed": r.seed}
        config = r.config if isinstance(r.config, dict) else resolve_named_config(r.config, Path(recipe.path).parent)
        return {"kind": src.kind, "config": config, "seed": r.seed}
    if src.kind == "hub":
        return {"kind": "hub", "repo": src.hub.repo, "revision": src.hub.revision}
    folder = Path(src.path) if Path(src.path).is_absolute() else project_dir / src.path
    if (folder / POCKET_MANIFEST).is_file():  # committed pocket weights: their listed digests, not mtimes (a
        # fresh clone's checkout times), so every clone builds the same version ids
        return {"kind": "path", "path": str(src.path), "files": [sha256_or_missing(folder / POCKET_MANIFEST)]}
    return {"kind": "path", "path": str(folder), "files": folder_fingerprint(folder)}


def existing_model_dir(params: SourceParams, ctx: StageContext, hub_files: list[str]) -> tuple[Path, dict]:
    """A hub or path source's folder and its record for the manifest."""
    if params.kind == "hub":
        folder = hub_snapshot(params.repo, params.revision, hub_files)
        return folder, {"kind": "hub", "repo": params.repo, "revision": params.revision}
    folder = local_folder(params.path, ctx.project_dir)
    record = {"kind": "path", "path": str(folder)}
    pocket = verify_pocket_folder(folder)  # local_folder verified it; here its record goes to the manifest
    if pocket is not None:
        record["pocket"] = {"command": pocket["command"], "training": pocket["training"]}
    return folder, record


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


def link_component(src_dir: Path, dst_dir: Path, onnx_file: str, copy_data: bool = False) -> None:
    """Hard-link an ONNX file and its external data into another folder; copy_data: copy the external
    data instead (onnx.load refuses external data with several hard links, as a possible hard-link attack)."""
    import shutil

    for i, f in enumerate(onnx_files(src_dir / onnx_file)):
        if copy_data and i > 0:
            shutil.copyfile(f, dst_dir / f.name)
        else:
            link_or_copy(f, dst_dir / f.name)


def component_bytes(folder: Path, onnx_file: str) -> int:
    return sum(f.stat().st_size for f in onnx_files(folder / onnx_file))


def name_dims(path: Path, dims: dict[str, list]) -> None:
    """Give an ONNX file's inputs/outputs readable dims: a str becomes a named (dynamic) dim, an int a fixed
    one. Exporters leave generated names (torch.export's formulas, 'LayerNormalization..._dim_1')."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    for value in list(proto.graph.input) + list(proto.graph.output):
        for dim, new in zip(value.type.tensor_type.shape.dim, dims.get(value.name, ())):
            if isinstance(new, str):
                dim.dim_param = new
            else:
                dim.dim_value = new
    onnx.save(proto, str(path))


def sha256_or_missing(path: Path) -> str:
    """A local input file's digest for a stage's parameters ("missing" lets the stage itself say what is wrong)."""
    from ..runtime.artifact import sha256_file

    return sha256_file(path) if path.is_file() else "missing"
