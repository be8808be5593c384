"""A toy model family, registered from this folder alone (ONNXFORGE_FAMILIES=toyfamily): proof that a new
family is one package handed to the registry. Its "model" multiplies its input by a seeded random vector;
it has a source, an export, a validate stage (ONNX vs numpy) and the shared publish stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from onnxforge.config import Recipe, RecipeBody, Strict
from onnxforge.families.common import builder_digest, fail_on, publish_spec, record_check, spec_factory
from onnxforge.families.family import Family
from onnxforge.store import StageContext, StageParams, StageSpec, publish_stage


class ToyVariant(Strict):
    scale: float = 1.0


class ToyRuntime(Strict):
    greeting: str = "hello"


class ToyRecipe(RecipeBody):
    family: Literal["toy"]
    width: int = Field(default=8, ge=1, le=1024)
    seed: int = 0
    runtime: ToyRuntime = ToyRuntime()
    # A stage the plan asks for although the family defines none (tests that it is an error, not skipped).
    extra_stage: str | None = None
    variants: dict[str, ToyVariant]


BUILDER = builder_digest(__file__)


class SourceParams(StageParams):
    width: int
    seed: int


class ExportParams(StageParams):
    scale: float


class ValidateParams(StageParams):
    checks: tuple[str, ...]


def plan(recipe: Recipe, project_dir: Path) -> dict[str, StageSpec]:
    body: ToyRecipe = recipe.body
    spec = spec_factory(recipe, BUILDER)
    source = spec("source", None, SourceParams(width=body.width, seed=body.seed), [], doc="draw the weights")
    out = {}
    for name, v in body.variants.items():
        export = spec("export", name, ExportParams(scale=v.scale), [source], doc="write the ONNX graph")
        upstream = [spec(body.extra_stage, name, StageParams(), [export])] if body.extra_stage else [export]
        validate = spec("validate", name, ValidateParams(checks=("parity",)), upstream, doc="ONNX vs numpy")
        out[name] = publish_spec(spec, name, validate, body.runtime.model_dump())
    return out


def source_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    w = np.random.default_rng(spec.params.seed).standard_normal(spec.params.width).astype(np.float32)
    np.save(out / "weights.npy", w)
    return {"source": {"kind": "random", "seed": spec.params.seed}}


def export_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.load(ctx.upstream_dir(spec, "source") / "weights.npy") * np.float32(spec.params.scale)
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "toy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w.size])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(out / "toy.onnx"))
    np.save(out / "reference.npy", w)
    return {}


def validate_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    import onnxruntime as ort

    from onnxforge.store import link_or_copy

    src = ctx.upstream_dir(spec, "export")
    link_or_copy(src / "toy.onnx", out / "toy.onnx")
    w = np.load(src / "reference.npy")
    x = np.random.default_rng(1).standard_normal((2, w.size)).astype(np.float32)
    y = ort.InferenceSession(str(out / "toy.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    checks: list = []
    diff = float(np.abs(y - x * w).max())
    record_check(checks, "max abs diff vs numpy", diff, 1e-6, diff <= 1e-6)
    results = {"checks": checks}
    fail_on(checks, results)
    (out / "facts.json").write_text(json.dumps({"width": int(w.size)}))
    return {"components": {"model": "toy.onnx"}, "validation": results, "runtime": {"kind": "toy", "width": int(w.size)}}


FAMILY = Family(name="toy", recipe=ToyRecipe, plan=plan,
                stages={"source": source_stage, "export": export_stage, "validate": validate_stage,
                        "publish": publish_stage},
                runtime_kind="toy", command="(none: a test family)", toolchain=())
