"""Stable Diffusion export stage: the four submodules + tokenizer.json + scheduler_config.json, with parity
vs PyTorch per submodule (fails the build over the recipe's tolerance). UNet/VAE attention becomes
onnxruntime's MultiHeadAttention (flash attention on CPU) unless export.fused_attention is false.

Each submodule is exported on its own with the TorchScript exporter: its node names are module paths such
as /unet/down_blocks.0/resnets.0/conv_shortcut/Conv, which is what a recipe's keep_float patterns select.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np

from ...runtime.artifact import make_session
from ...store import StageContext, StageSpec, ValidationFailed
from ..common import ORT_CUSTOM_OPSETS, component_bytes, model_dir_of, name_dims
from .submodules import (ALL, ALL_FILES, ALL_IO, COMPONENT_CONFIGS, CONFIGS_DIR, SCHEDULER_CONFIG, TOKENIZER_DIR,
                         TOKENIZER_JSON, dynamic_axes, example_inputs, exported, model_info)

EXTERNAL_DATA_BYTES = 1.8e9
# Texts on which the runtime's tokenization must equal transformers' CLIPTokenizer (export stage).
TOKENIZER_CHECK_TEXTS = ("", "a lighthouse on a rocky cliff at dusk, oil painting",
                         "A Lighthouse,  at DUSK!! 1984 \u2014 caf\u00e9 o'clock", "  spaces\tand\nnew lines  ",
                         "a red fox's den, 3 cubs; 12:30 pm - watercolor & ink", "zebra quokka xylophone")


def _fix_output_dims(path: Path, name: str, info: dict, batch: int, width: int, height: int, axes: dict) -> None:
    """Outputs' fixed dims as numbers, dynamic ones by their axis names: the exporter sometimes leaves generated
    names there (e.g. last_hidden_state's 77 as 'LayerNormalizationlast_hidden_state_dim_1')."""
    shapes = ALL[name].output_shapes(info, batch, width, height)
    name_dims(path, {out: [axes.get(out, {}).get(j, d) for j, d in enumerate(shape)]
                     for out, shape in zip(ALL[name].outputs, shapes)})


def one_pass_unet(name: str, p) -> bool:
    """The UNet of a recipe whose guidance is <= 1: exported for batch 1 only (no negative-prompt pass)."""
    return name == "unet" and p.unet_batch == 1


def traced_batch(name: str, p) -> int:
    return 2 if ALL[name].cfg_batch and not one_pass_unet(name, p) else 1


def axes_of(name: str, p) -> dict:
    return dynamic_axes(name, p.dynamic_batch and not one_pass_unet(name, p), p.dynamic_size)


def export_one(name: str, module, info: dict, out: Path, p: dict, token_ids: np.ndarray) -> None:
    """torch.onnx.export (TorchScript) of one submodule, then saved with one external-data file if needed."""
    import torch

    width, height = p.parity.sizes[0]
    batch = traced_batch(name, p)  # CFG batch for the traced example (1 for a one-pass UNet)
    if name == "unet" and p.dynamic_size:
        # Trace at a latent size that the UNet's up-sampling factor does not divide: diffusers then
        # takes its explicit-size path (upsample to the skip connection's size), which the graph keeps,
        # so any multiple-of-8 picture works, not only multiples of 8 x the up factor.
        f = info["vae_scale_factor"]
        side = (2 * info["unet_up_factor"] + 1) * f
        width = height = side
    fused = p.fused_attention and name != "text_encoder"  # CLIP's attention stays as exported
    example = example_inputs(name, info, batch, width, height, token_ids, seed=0)
    args = tuple(torch.from_numpy(v) for v in example.values())
    scratch = out / f".export-{name}"
    scratch.mkdir()
    try:
        with torch.no_grad():
            torch.onnx.export(module, args, str(scratch / "model.onnx"), input_names=ALL_IO[name]["inputs"],
                              output_names=ALL_IO[name]["outputs"], dynamic_axes=axes_of(name, p),
                              opset_version=p.opset, dynamo=False,
                              custom_opsets=ORT_CUSTOM_OPSETS if fused else None)
        _fix_output_dims(scratch / "model.onnx", name, info, batch, width, height, axes_of(name, p))
        n_bytes = sum(f.stat().st_size for f in scratch.iterdir())
        if p.external_data == "always" or n_bytes > EXTERNAL_DATA_BYTES:
            save_with_one_data_file(scratch / "model.onnx", out / ALL_FILES[name])
        else:
            (scratch / "model.onnx").rename(out / ALL_FILES[name])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        gc.collect()


def save_with_one_data_file(src: Path, dst: Path, size_threshold: int = 1024) -> None:
    """Rewrite an exported model as `dst` + one `dst.data` file, one tensor in memory at a time.

    The TorchScript exporter writes a model over 2 GB with one file per tensor; onnx.load + save_model
    would hold every weight at once (3.3 GB for the SD v1.4 UNet) beside the PyTorch module.
    Tensors of size_threshold bytes or more go to the data file, as onnx.save_model(size_threshold=...) does.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, set_external_data, uses_external_data

    proto = onnx.load(str(src), load_external_data=False)
    location = dst.name + ".data"
    with open(dst.parent / location, "wb") as data:
        for tensor in proto.graph.initializer:
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(src.parent))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= size_threshold:
                offset = data.tell()
                data.write(tensor.raw_data)
                set_external_data(tensor, location, offset=offset, length=len(tensor.raw_data))
                tensor.ClearField("raw_data")
    onnx.save(proto, str(dst))


def reference_outputs(name: str, module, info: dict, p: dict, token_ids: np.ndarray) -> list[tuple]:
    """(size, batch, inputs, PyTorch outputs) at every validate size, batch 2 then 1 (one of each if fixed):
    computed before the ONNX session opens, so the module and the session are never in memory together."""
    import torch

    batches = [2, 1] if p.dynamic_batch and not one_pass_unet(name, p) else [traced_batch(name, p)]
    sizes = p.parity.sizes if name != "text_encoder" else p.parity.sizes[:1]
    runs = []
    for width, height in sizes:
        for batch in batches:
            inputs = example_inputs(name, info, batch, width, height, token_ids, seed=1 + batch)
            with torch.no_grad():
                ref = module(*(torch.from_numpy(v) for v in inputs.values()))
            runs.append(([width, height], batch, inputs, [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]))
    return runs


def parity(references: list[tuple], session) -> dict:
    """Max abs diff ONNX vs PyTorch over reference_outputs' runs."""
    worst, runs = 0.0, []
    for size, batch, inputs, ref in references:
        ours = session.run(None, inputs)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref))
        scale = max(float(np.abs(r).max()) for r in ref)
        runs.append({"size": size, "batch": batch, "max_abs_diff": diff, "output_max_abs": scale})
        worst = max(worst, diff)
    return {"max_abs_diff": worst, "runs": runs}


def clip_token_ids(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    return np.asarray(tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"],
                      dtype=np.int64)


def export_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    from ...runtime.sd import ClipTokenizer

    p = spec.params
    model_dir = model_dir_of(ctx, spec, "source")
    info = model_info(model_dir)
    slow = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    token_ids = clip_token_ids(slow, [p.parity.prompt, ""], info["max_length"])

    # Tokenizer: tokenizer.json for the runtime (converted from the repo's vocab.json + merges.txt), beside the
    # repo's own tokenizer files, which transformers' CLIPTokenizer reads in other loaders (optimum's pipeline).
    (out / TOKENIZER_DIR).mkdir()
    for f in sorted((model_dir / "tokenizer").iterdir()):
        if f.is_file() and f.name != "tokenizer.json":
            shutil.copyfile(f, out / TOKENIZER_DIR / f.name)
    fast = CLIPTokenizerFast.from_pretrained(model_dir / "tokenizer")
    fast.backend_tokenizer.save(str(out / TOKENIZER_JSON))
    info.update(bos_id=slow.bos_token_id, eos_id=slow.eos_token_id, pad_id=slow.pad_token_id, unet_batch=p.unet_batch)
    shutil.copy(model_dir / "scheduler" / "scheduler_config.json", out / SCHEDULER_CONFIG)
    (out / CONFIGS_DIR).mkdir()
    for name in COMPONENT_CONFIGS:
        shutil.copyfile(model_dir / name / "config.json", out / CONFIGS_DIR / f"{name}.json")

    # The runtime's tokenization == CLIPTokenizer's on the validation prompt, the calibration prompts
    # and a prompt longer than the text encoder reads.
    rt_tok = ClipTokenizer(out / TOKENIZER_JSON, info["max_length"], info["bos_id"], info["eos_id"], info["pad_id"])
    texts = [p.parity.prompt, *TOKENIZER_CHECK_TEXTS, " ".join(TOKENIZER_CHECK_TEXTS * 4)]  # the last: > 77 tokens
    mismatches = [t for t in texts if not np.array_equal(rt_tok(t, warn=False)[0][0], clip_token_ids(slow, [t], info["max_length"])[0])]

    parities, sizes = {}, {}
    for name in exported(model_dir):
        module = ALL[name].torch_module(model_dir, p.fused_attention)
        export_one(name, module, info, out, p, token_ids)
        references = reference_outputs(name, module, info, p, token_ids)
        del module  # before the session loads the weights again (issue 10, item 17)
        gc.collect()
        session = make_session(out / ALL_FILES[name], low_memory=True)
        parities[name] = parity(references, session)
        parities[name]["atol"] = getattr(p.parity.atol, name)
        sizes[name] = component_bytes(out, ALL_FILES[name])
        del references, session
        gc.collect()
    failed = [f"{n}: max abs diff {r['max_abs_diff']:.3g} > {r['atol']:g}" for n, r in parities.items()
              if not r["max_abs_diff"] <= r["atol"]]
    if mismatches:
        failed.append(f"tokenizer.json disagrees with CLIPTokenizer on {len(mismatches)} text(s), e.g. {mismatches[0][:60]!r}")
    if failed:
        raise ValidationFailed("export does not match PyTorch: " + "; ".join(failed))
    return {"model_dir": str(model_dir), "info": info, "parity": parities,
            "recorded": {"parity_max_abs_diff": {n: r["max_abs_diff"] for n, r in parities.items()},
                         "bytes": sizes, "tokenizer_texts_checked": len(texts)}}
