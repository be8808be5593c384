"""Stable Diffusion quantize stage: per variant, per submodule: float, static int8 (QDQ, calibrated),
dynamic int8, or static for some op types then dynamic for others (UNet: Conv static, MatMul dynamic)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ...config import RecipeError
from ...store import StageContext, StageSpec, find_upstream
from ..common import component_bytes, link_component
from .calibrate import calibration_reader
from .submodules import FILES, SUBMODULES


def quant_params(q) -> dict:
    """A submodule's quantization settings for the stage digest; keep_float None becomes the defaults."""
    d = q.model_dump(mode="json")
    d.pop("min_cosine"), d.pop("min_snr_db")
    d["keep_float_given"] = q.keep_float is not None
    return d


def quantize_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    from ...quantize import activation_matmuls, dynamic_int8, resolve_keep_float, static_int8

    export_dir = ctx.upstream_dir(spec, "export")
    calib_dir = ctx.upstream_dir(spec, "calibrate")
    unet_batch = find_upstream(spec, "calibrate").params.unet_batch
    records = {}
    work = out / ".work"
    work.mkdir()
    try:
        for name in SUBMODULES:
            q = spec.params.submodules[name]
            fp32_bytes = component_bytes(export_dir, FILES[name])
            if q["mode"] == "float":
                link_component(export_dir, out, FILES[name])
                records[name] = {"mode": "float", "bytes": fp32_bytes}
                continue
            # Quantize from links in a scratch folder: onnxruntime writes temporary files beside its input.
            link_component(export_dir, work, FILES[name], copy_data=True)
            src = work / FILES[name]
            patterns = q["keep_float"] if q["keep_float_given"] else SUBMODULES[name].keep_float
            try:
                excluded, counts = resolve_keep_float(src, patterns, strict=q["keep_float_given"],
                                                      what=f"variants.{spec.variant}.{name}")
            except ValueError as exc:
                raise RecipeError(str(exc)) from None
            rec = {"mode": q["mode"], "op_types": q["op_types"], "keep_float": counts, "kept_float_nodes": len(excluded)}
            if q["mode"] == "dynamic":
                dynamic_int8(src, out / FILES[name], op_types=q["op_types"], per_channel=q["per_channel"],
                             reduce_range=q["reduce_range"], nodes_to_exclude=excluded, weight_type=q["weight_type"])
            else:
                if q["weight_matmuls_only"] and "MatMul" in q["op_types"]:
                    attention = activation_matmuls(src)
                    excluded += [n for n in attention if n not in excluded]
                    rec["activation_matmuls_kept_float"] = len(attention)
                reader = calibration_reader(calib_dir, name, "calibrate", unet_batch)
                rec["calibration_inputs"] = len(reader)
                then_dynamic = q["dynamic_op_types"]
                static_out = work / f"static-{FILES[name]}" if then_dynamic else out / FILES[name]
                static_int8(src, static_out, reader, op_types=q["op_types"],
                            activation_type=q["activation_type"], weight_type=q["weight_type"],
                            per_channel=q["per_channel"], reduce_range=q["reduce_range"],
                            calibrate_method=q["calibrate_method"], nodes_to_exclude=excluded,
                            ranges_cache=out / f"{name}.ranges.json")
                if then_dynamic:
                    rec["dynamic_op_types"] = then_dynamic
                    dynamic_int8(static_out, out / FILES[name], op_types=then_dynamic, reduce_range=q["reduce_range"],
                                 nodes_to_exclude=excluded, weight_type=q["weight_type"])
            rec["bytes"] = component_bytes(out, FILES[name])
            rec["fp32_bytes"] = fp32_bytes
            rec["quantized_nodes"] = _count_quantized(out / FILES[name])
            records[name] = rec
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for leftover in out.glob("*-inferred.onnx"):
        leftover.unlink()
    return {"submodules": records, "recorded": {"submodules": records,
                                                "calibration_digest": ctx.upstream_record(spec, "calibrate")["digest"]}}


def _count_quantized(path: Path) -> dict:
    import onnx

    from collections import Counter

    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    keys = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
            "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv")
    return {k: ops[k] for k in keys if ops[k]}
