"""The tiny Stable Diffusion recipe end to end: export parity, calibration readers, static and dynamic int8,
quality metrics, the torch-free pipeline against diffusers' StableDiffusionPipeline on the same weights,
the CLI, and bad input.

References are diffusers' and transformers' own public APIs (StableDiffusionPipeline, its modules,
CLIPTokenizer), independent of the build's validation code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

from onnxforge.config import RecipeError, load_recipe
from onnxforge.runtime import artifact as art
from onnxforge.runtime.sd import EmptyPromptWarning, PromptTruncatedWarning, StableDiffusion

from conftest import REPO, new_project, run_cli

# Measured on the tiny model (torch 2.13 CPU, onnxruntime 1.32): submodule parity <= ~5e-6 (outputs
# O(1)); whole pictures vs diffusers <= ~2e-6 in [0, 1] pixels (at most 1 level in 8 bits) after 6 or 25
# steps, every scheduler.
PARITY_ATOL = 1e-4
IMAGE_ATOL = 1e-4
STEPS = 6
PROMPT = "a lighthouse on a rocky cliff at dusk, oil painting"
NEGATIVE = "blurry, grey"


@pytest.fixture(scope="module")
def fp32(sd_tiny):
    return art.load(sd_tiny.variant("fp32", "sd-tiny"))


@pytest.fixture(scope="module")
def int8(sd_tiny):
    return art.load(sd_tiny.variant("int8", "sd-tiny"))


@pytest.fixture(scope="module")
def int8_dynamic(sd_tiny):
    return art.load(sd_tiny.variant("int8-dynamic", "sd-tiny"))


def _stage_dir(project, manifest, stage, variant="all"):
    digest = next(s["digest"] for s in manifest["stages"] if s["stage"] == stage)
    return project.artifacts / "sd-tiny" / ".stages" / f"{stage}-{variant}-{digest}"


@pytest.fixture(scope="module")
def source_dir(sd_tiny, fp32):
    return _stage_dir(sd_tiny, fp32.manifest, "source") / "model"


@pytest.fixture(scope="module")
def calib_dir(sd_tiny, int8):
    return _stage_dir(sd_tiny, int8.manifest, "calibrate")


@pytest.fixture(scope="module")
def pipe(source_dir):
    """diffusers' own pipeline on the source checkpoint (the same weights the artifacts were built from)."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(source_dir, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sd(fp32):
    return StableDiffusion(fp32)


def _diffusers_scheduler(name, config):
    import diffusers

    return {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler,
            "euler": diffusers.EulerDiscreteScheduler}.get(name, diffusers.DPMSolverMultistepScheduler).from_config(config)


def _diffusers_image(pipe, scheduler, latents, prompt=PROMPT, negative=NEGATIVE, guidance=7.5, width=64, height=64):
    pipe.scheduler = _diffusers_scheduler(scheduler, pipe.scheduler.config)
    with torch.no_grad():
        out = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance, width=width,
                   height=height, latents=torch.from_numpy(latents), output_type="np")
    return out.images[0]


# ---- the build ------------------------------------------------------------------------


def test_three_variants_published_with_four_components(fp32, int8, int8_dynamic):
    for a in (fp32, int8, int8_dynamic):
        m = a.manifest
        assert m["artifact"]["family"] == "sd" and m["validation"]["passed"] is True
        assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
        c = m["components"]
        assert c["text_encoder"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 77]}]
        assert c["text_encoder"]["outputs"][0]["shape"] == ["batch", 77, 32]
        assert [(i["name"], i["dtype"], i["shape"]) for i in c["unet"]["inputs"]] == [
            ("sample", "float32", ["batch", 4, "latent_height", "latent_width"]), ("timestep", "float32", ["batch"]),
            ("encoder_hidden_states", "float32", ["batch", 77, 32])]
        assert c["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, "height", "width"]
        assert [o["name"] for o in c["vae_encoder"]["outputs"]] == ["latent_mean", "latent_std"]
        rt = m["runtime"]
        assert rt["kind"] == "sd" and rt["vae_scale_factor"] == 8 and rt["size_multiple"] == 8
        assert rt["max_length"] == 77 and rt["scheduler"] == "pndm" and rt["scaling_factor"] == pytest.approx(0.18215)
        assert rt["scheduler_config"]["beta_schedule"] == "scaled_linear"
        assert (a.dir / rt["tokenizer"]).is_file() and (a.dir / "scheduler_config.json").is_file()
    # The tiny recipe stores the fp32 UNet with external data, as the real one must be.
    files = [f["file"] for f in fp32.manifest["components"]["unet"]["files"]]
    assert files == ["unet.onnx", "unet.onnx.data"]


def test_published_external_data_is_a_copy_so_stages_can_still_read_it(sd_tiny, fp32):
    # onnx refuses external data with several hard links; the quantize stage reads the export's, so the
    # export's stays single. Publishing links the validated files (onnxruntime alone reads a published
    # artifact): the published .data is the validate stage's, not a third copy on disk.
    exported = _stage_dir(sd_tiny, fp32.manifest, "export", "fp32") / "unet.onnx"
    validated = _stage_dir(sd_tiny, fp32.manifest, "validate", "fp32") / "unet.onnx.data"
    assert (fp32.dir / "unet.onnx.data").stat().st_ino == validated.stat().st_ino
    # 2: validate + publish; more when an `export-layout` folder (tests/test_clients.py) links it too
    assert (fp32.dir / "unet.onnx.data").stat().st_nlink >= 2
    assert exported.with_suffix(".onnx.data").stat().st_nlink == 1
    assert len(onnx.load(str(exported)).graph.initializer) > 0  # loads with its external data


def test_fp32_parity_vs_pytorch_recorded_per_submodule(fp32):
    v = fp32.manifest["validation"]
    checks = {c["check"]: c for c in v["checks"]}
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        c = checks[f"{name} max abs diff vs PyTorch"]
        assert c["passed"] and c["value"] <= c["limit"] == PARITY_ATOL
        runs = v["parity"][name]["runs"]
        assert {r["batch"] for r in runs} == {1, 2}
        if name != "text_encoder":  # both validate sizes, one of them not square
            assert {tuple(r["size"]) for r in runs} == {(64, 64), (96, 48)}
    export = next(s for s in fp32.manifest["stages"] if s["stage"] == "export")
    assert set(export["parity_max_abs_diff"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}


def test_attention_is_exported_as_onnxruntime_multihead_attention(fp32):
    for name in ("unet", "vae_decoder", "vae_encoder"):
        ops = {n.op_type for n in onnx.load(str(fp32.component_path(name)), load_external_data=False).graph.node}
        assert "MultiHeadAttention" in ops and "Softmax" not in ops, name


def test_export_attention_processor_computes_what_diffusers_does(source_dir):
    """The processor behind fused_attention, in PyTorch, against diffusers' default one on the same weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from onnxforge.families.sd.submodules import ort_attention_processor

    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(source_dir / "unet").eval()
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))
    vae = AutoencoderKL.from_pretrained(source_dir / "vae").eval()
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        want = unet(*args).sample, vae.decode(latents).sample
        unet.set_attn_processor(ort_attention_processor())
        vae.set_attn_processor(ort_attention_processor())
        got = unet(*args).sample, vae.decode(latents).sample
    for w, o in zip(want, got):
        assert torch.allclose(w, o, atol=1e-5, rtol=0)  # float32 reassociation only


def test_second_build_does_nothing(sd_tiny):
    out = sd_tiny.doit("build").stdout
    assert [line for line in out.splitlines() if line.startswith(".  ")] == []


# ---- export parity vs diffusers' modules (independent of the build's checks) -----------------


def test_every_submodule_matches_its_pytorch_module_at_a_new_size(fp32, pipe):
    """80x112 px was never traced nor validated: latents 10x14, which the UNet's 2x up-sampling must
    restore from 5x7 (diffusers' explicit-size path, kept in the graph)."""
    rng = np.random.default_rng(7)
    ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="np").input_ids.astype(np.int64)
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
    ours = fp32.session("text_encoder").run(None, {"input_ids": ids})[0]
    assert np.abs(ours - ref).max() <= PARITY_ATOL

    sample = rng.standard_normal((2, 4, 14, 10), dtype=np.float32)
    t = np.asarray([801.0, 801.0], np.float32)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(sample), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ours)).sample.numpy()
    got = fp32.session("unet").run(None, {"sample": sample, "timestep": t, "encoder_hidden_states": ours})[0]
    assert got.shape == (2, 4, 14, 10) and np.abs(got - ref).max() <= PARITY_ATOL

    z = rng.standard_normal((1, 4, 14, 10), dtype=np.float32)
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    got = fp32.session("vae_decoder").run(None, {"latent_sample": z})[0]
    assert got.shape == (1, 3, 112, 80) and np.abs(got - ref).max() <= PARITY_ATOL

    x = rng.uniform(-1, 1, (2, 3, 112, 80)).astype(np.float32)
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(x)).latent_dist
    mean, std = fp32.session("vae_encoder").run(None, {"sample": x})
    assert np.abs(mean - dist.mean.numpy()).max() <= PARITY_ATOL and np.abs(std - dist.std.numpy()).max() <= PARITY_ATOL


def test_runtime_tokenizer_matches_cliptokenizer(sd, pipe):
    texts = [PROMPT, "", "A Fox's den — 3 cubs!!  café", (PROMPT + " ") * 12]
    for text in texts:
        ids, _ = sd.tokenizer(text, warn=False)
        ref = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids[0].tolist() == ref


# ---- calibration readers ---------------------------------------------------------------------


def test_calibration_readers_yield_what_each_model_expects(fp32, calib_dir):
    from onnxforge.families.sd.calibrate import calibration_reader

    meta = json.loads((calib_dir / "calibration.json").read_text())
    assert len(meta["calibrate"]) == 4 and len(meta["held_out"]) == 2 and not set(meta["calibrate"]) & set(meta["held_out"])
    steps = meta["unet_calls_per_prompt"]
    assert steps == 11  # PNDM, 10 steps: the warm-up step is evaluated twice
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        session = fp32.session(name)
        for split, n_prompts in (("calibrate", 4), ("held_out", 2)):
            for unet_batch in ((2, 1) if name == "unet" else (2,)):
                reader = calibration_reader(calib_dir, name, split, unet_batch)
                expected = n_prompts * (steps * (2 if unet_batch == 1 else 1) if name == "unet" else 1)
                assert len(reader) == expected
                items = list(iter(reader.get_next, None))
                assert len(items) == expected
                for item in (items[0], items[-1]):
                    assert list(item) == [i.name for i in session.get_inputs()]
                    for spec in session.get_inputs():
                        arr = item[spec.name]
                        assert arr.dtype == (np.int64 if spec.type == "tensor(int64)" else np.float32)
                        assert len(arr.shape) == len(spec.shape)
                        assert all(d == s for d, s in zip(arr.shape, spec.shape) if isinstance(s, int))
                session.run(None, items[0])  # the model runs on them
                reader.rewind()
                assert reader.get_next().keys() == items[0].keys()
    # Batches as the pipeline runs the UNet: [negative, prompt] halves, or each alone with unet_batch 1.
    two = calibration_reader(calib_dir, "unet", "calibrate", 2).item(0)
    one = calibration_reader(calib_dir, "unet", "calibrate", 1)
    assert two["sample"].shape[0] == 2 and one.item(0)["sample"].shape[0] == 1
    np.testing.assert_array_equal(np.concatenate([one.item(0)["sample"], one.item(1)["sample"]]), two["sample"])


def test_unet_calibration_covers_early_middle_and_late_timesteps(calib_dir):
    from onnxforge.families.sd.calibrate import calibration_reader

    reader = calibration_reader(calib_dir, "unet", "calibrate", 2)
    timesteps = [float(item["timestep"][0]) for item in reader]
    per_prompt = np.asarray(timesteps).reshape(4, -1)
    for row in per_prompt:  # every trajectory, whole, noisiest first
        assert row[0] > 900 and row[-1] < 100 and any(300 < t < 700 for t in row)
        assert list(row) == sorted(row, reverse=True)
    assert (per_prompt == per_prompt[0]).all()
    samples = [item["sample"] for item in calibration_reader(calib_dir, "unet", "calibrate", 2)]
    assert np.abs(samples[0] - samples[5]).max() > 0.1  # the latents move along the trajectory


def test_calibration_set_is_diffusers_own_trajectory(calib_dir, pipe):
    """Prompt 0 through StableDiffusionPipeline with the recorded settings ends at the recorded latents."""
    meta = json.loads((calib_dir / "calibration.json").read_text())
    s = meta["settings"]
    pipe.scheduler = _diffusers_scheduler(s["scheduler"], pipe.scheduler.config)
    with torch.no_grad():
        latents = pipe(meta["prompts"][0], negative_prompt=s["negative_prompt"], num_inference_steps=s["steps"],
                       guidance_scale=s["guidance_scale"], width=s["size"][0], height=s["size"][1],
                       generator=torch.Generator().manual_seed(s["seed"]), output_type="latent").images.numpy()
    recorded = np.load(calib_dir / "vae_decoder" / "latent_sample.npy")[0]
    np.testing.assert_allclose(recorded * pipe.vae.config.scaling_factor, latents, atol=1e-5)
    ids = np.load(calib_dir / "text_encoder" / "input_ids.npy")[0]
    assert ids[1].tolist() == pipe.tokenizer(meta["prompts"][0], padding="max_length", max_length=77).input_ids
    assert ids[0].tolist() == pipe.tokenizer("", padding="max_length", max_length=77).input_ids


def test_calibration_cache_is_shared_by_recipes_with_the_same_inputs(sd_tiny, int8):
    """A second recipe with the same source and calibration settings reuses the cached set."""
    text = (REPO / "recipes" / "sd-tiny.yaml").read_text().replace("default: true", "default: false")
    (sd_tiny.recipes / "sd-tiny-twin.yaml").write_text(text)
    try:
        proc = sd_tiny.doit("calibrate:sd-tiny-twin")
        twin = next((sd_tiny.artifacts / "sd-tiny-twin" / ".stages").glob("calibrate-all-*"))
        record = json.loads((twin / "stage.json").read_text())
        assert record["reused"] is True and record["recorded"]["reused_cache"] is True
        ours = next(s for s in int8.manifest["stages"] if s["stage"] == "calibrate")
        assert record["digest"] == ours["digest"] and ours["calibration_digest"] == ours["digest"]
        a, b = twin / "unet" / "sample.npy", _stage_dir(sd_tiny, int8.manifest, "calibrate") / "unet" / "sample.npy"
        assert os.stat(a).st_ino == os.stat(b).st_ino  # the same file on disk, not a recomputed copy
        assert "calibrate:sd-tiny-twin done" in proc.stdout
    finally:
        (sd_tiny.recipes / "sd-tiny-twin.yaml").unlink()


# ---- quantization ----------------------------------------------------------------------------


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _weight_is_quantized(model, node) -> bool:
    prod = _producers(model).get(node.input[1])
    return prod is not None and prod.op_type == "DequantizeLinear"


def test_static_int8_is_qdq_and_keeps_the_sensitive_parts_float(int8):
    from collections import Counter

    unet = onnx.load(str(int8.component_path("unet")))
    ops = Counter(n.op_type for n in unet.graph.node)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"]
    sensitive = ("conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding", "downsamplers.0",
                 "proj_in", "proj_out")
    kept = [n for n in unet.graph.node if any(f"/{k}/" in n.name for k in sensitive)
            and n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(kept) >= 8 and not any(_weight_is_quantized(unet, n) for n in kept)
    assert {k for n in kept for k in sensitive if f"/{k}/" in n.name} == set(sensitive)
    convs = [n for n in unet.graph.node if n.op_type == "Conv" and n not in kept]
    assert convs and all(_weight_is_quantized(unet, n) for n in convs)
    # dynamic_op_types: every other weight MatMul became dynamic int8 after the static pass.
    consts = {i.name for i in unet.graph.initializer}
    assert ops["MatMulInteger"] > 0
    assert not [n.name for n in unet.graph.node if n.op_type == "MatMul" and n.input[1] in consts and n not in kept]
    # Attention is onnxruntime's fused MultiHeadAttention, on float inputs.
    prod = _producers(unet)
    mha = [n for n in unet.graph.node if n.op_type == "MultiHeadAttention"]
    assert mha and not any(i in prod and prod[i].op_type == "DequantizeLinear" for n in mha for i in n.input)
    quant = next(s for s in int8.manifest["stages"] if s["stage"] == "quantize")
    rec = quant["submodules"]["unet"]
    assert rec["mode"] == "static" and rec["dynamic_op_types"] == ["MatMul"]
    assert rec["keep_float"]["conv_in"] == 1 and rec["keep_float"]["time_emb_proj"] >= 4
    assert rec["keep_float"]["*/downsamplers.*"] == 1 and rec["calibration_inputs"] == 4 * 11
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        model = onnx.load(str(int8.component_path(name)))
        assert any(n.op_type == "DequantizeLinear" for n in model.graph.node), name


def test_dynamic_int8_quantizes_weight_matmuls_only(fp32, int8_dynamic):
    for name in ("text_encoder", "unet"):
        ops = {n.op_type for n in onnx.load(str(int8_dynamic.component_path(name))).graph.node}
        assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, name
        assert "ConvInteger" not in ops
    # The time embedding's Gemms stay float (onnxruntime renames Gemms before it applies exclusions).
    unet = onnx.load(str(int8_dynamic.component_path("unet")), load_external_data=False)
    time_nodes = [n for n in unet.graph.node if "/time_embedding/" in n.name or "/time_emb_proj/" in n.name]
    assert time_nodes and not [n.name for n in time_nodes if n.op_type == "MatMulInteger"]
    sha = lambda a, n: a.manifest["components"][n]["files"][0]["sha256"]  # noqa: E731
    assert sha(fp32, "vae_decoder") == sha(int8_dynamic, "vae_decoder")  # float: the very same file
    q = next(s for s in int8_dynamic.manifest["stages"] if s["stage"] == "quantize")["submodules"]
    assert q["unet"]["bytes"] < q["unet"]["fp32_bytes"] and q["vae_decoder"]["mode"] == "float"


def _graph_and_weights(path):
    """A model as comparable values: its nodes, its value infos and its initializers' arrays by name."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    nodes = [(n.op_type, str(n)) for n in m.graph.node]
    infos = [str(v) for v in m.graph.value_info]
    return nodes, infos, {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}, list(m.opset_import)


@pytest.mark.parametrize("name, reduce_range, after_static", [("unet", True, False), ("text_encoder", False, False),
                                                            ("unet", True, True)])
def test_streamed_dynamic_int8_writes_what_quantize_dynamic_writes(sd_tiny, fp32, int8, calib_dir, tmp_path,
                                                                   monkeypatch, name, reduce_range, after_static):
    """A model over STREAM_THRESHOLD (the SD v1.4 UNet) is quantized one weight at a time instead of by
    onnxruntime's quantize_dynamic. On the tiny models, quantized as the variants do (int8-dynamic: its
    keep-float exclusions and the Gemm renaming; int8: the dynamic MatMul pass over the static QDQ
    UNet), both give the same nodes, the same initializers bit for bit, and so the same outputs
    (compared exactly: tolerance 0)."""
    from onnxforge import quantize
    from onnxforge.families.common import link_component
    from onnxforge.families.sd.calibrate import calibration_reader
    from onnxforge.families.sd.submodules import FILES, SUBMODULES
    from onnxforge.runtime.artifact import make_session

    src_dir = tmp_path / "fp32"
    src_dir.mkdir()
    link_component(fp32.component_path(name).parent, src_dir, FILES[name], copy_data=True)
    src = src_dir / FILES[name]
    excluded, _ = quantize.resolve_keep_float(src, SUBMODULES[name].keep_float, strict=False, what=name)
    if after_static:  # as the int8 variant's quantize stage, from its calibration ranges
        ranges = _stage_dir(sd_tiny, int8.manifest, "quantize", "int8") / f"{name}.ranges.json"
        quantize.static_int8(src, src_dir / "static.onnx", None, op_types=["Conv", "Gemm"], reduce_range=True,
                             nodes_to_exclude=excluded, ranges_cache=ranges)
        src = src_dir / "static.onnx"
    outputs, streamed = {}, []
    original = quantize.streamed_dynamic_int8
    monkeypatch.setattr(quantize, "streamed_dynamic_int8", lambda *a, **k: streamed.append(a[1]) or original(*a, **k))
    monkeypatch.setattr(quantize, "EXTERNAL_DATA_THRESHOLD", 0)  # onnxruntime saves as it does the full-size UNet
    for how, threshold in (("library", float("inf")), ("streamed", 0)):
        monkeypatch.setattr(quantize, "STREAM_THRESHOLD", threshold)
        (tmp_path / how).mkdir()
        quantize.dynamic_int8(src, tmp_path / how / FILES[name], op_types=["MatMul"], reduce_range=reduce_range,
                              nodes_to_exclude=excluded)
        outputs[how] = _graph_and_weights(tmp_path / how / FILES[name])
    lib_nodes, lib_infos, lib_weights, lib_opsets = outputs["library"]
    nodes, infos, weights, opsets = outputs["streamed"]
    ops = [n[0] for n in nodes]
    assert ops.count("MatMulInteger") >= 4 and ops.count("DynamicQuantizeLinear") >= 2
    assert ("DequantizeLinear" in ops) == after_static
    assert nodes == lib_nodes and infos == lib_infos and opsets == lib_opsets
    assert list(weights) == list(lib_weights)
    for key, array in lib_weights.items():
        assert weights[key].dtype == array.dtype and np.array_equal(weights[key], array), key
    assert streamed == [tmp_path / "streamed" / FILES[name]]  # two different writers
    item = calibration_reader(calib_dir, name, "held_out", 2).item(0)
    got = [make_session(tmp_path / how / FILES[name], threads=1).run(None, item) for how in ("library", "streamed")]
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)


def recipe_variant(name: str) -> dict:
    """A variant of the shipped sd-tiny recipe, as written (its floors are the numbers the tests hold it to)."""
    return yaml.safe_load((REPO / "recipes" / "sd-tiny.yaml").read_text())["variants"][name]


def test_quality_is_measured_and_recorded_for_every_quantized_variant(int8, int8_dynamic):
    for a, name, subs in ((int8, "int8", ("text_encoder", "unet", "vae_decoder", "vae_encoder")),
                          (int8_dynamic, "int8-dynamic", ("text_encoder", "unet"))):
        v, floors = a.manifest["validation"], recipe_variant(name)
        assert set(v["submodules"]) == set(subs)
        for sub in subs:
            r = v["submodules"][sub]
            assert r["cosine_min"] <= r["cosine_mean"] <= 1 and r["inputs"] >= 1
            assert r["cosine_mean"] >= floors[sub]["min_cosine"] and r["snr_db_mean"] >= floors[sub]["min_snr_db"], (name, sub, r)
        unet = v["submodules"]["unet"]
        assert unet["inputs"] == 12 and max(unet["timesteps"]) > 900 and min(unet["timesteps"]) < 100
        img = v["images"]
        assert len(img["per_image"]) == 2 and img["settings"]["steps"] == 10
        assert img["psnr_db_mean"] >= floors["min_psnr_db"] and floors["min_ssim"] <= img["ssim_mean"] <= 1, (name, img)
        assert all((a.dir / f).is_file() for f in img["files"])
        assert v["clip_score"]["note"].startswith("skipped: CLIP model 'openai/clip-vit-base-patch32' is not available locally")
        # every floor of the recipe is a check in the manifest, and each passed
        assert len(v["checks"]) == 2 * len(subs) + 2 and all(c["passed"] for c in v["checks"])


def test_clip_score_with_a_local_clip_model(source_dir, tmp_path):
    """CLIP score is computed when quality.clip_model names a local folder (here a tiny random CLIP)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from onnxforge.families.sd.validate import clip_scores

    tok = CLIPTokenizer.from_pretrained(source_dir / "tokenizer")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config={**small, "vocab_size": len(tok)}, projection_dim=16,
                         vision_config={**small, "image_size": 32, "patch_size": 8})).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(tmp_path / "clip")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(2)]
    scores, note = clip_scores("clip", images, [PROMPT, "a red fox"], tmp_path)
    assert note == "computed with clip" and len(scores) == 2 and all(0 <= s <= 100 for s in scores)
    scores, note = clip_scores("no/such-clip", images, [PROMPT, "a red fox"], tmp_path)
    assert scores is None and note.startswith("skipped: CLIP model 'no/such-clip' is not available locally")


def _naive_ssim(a, b, data_range=255.0):
    """SSIM straight from the paper's definition, window by window (slow, independent of the vectorized one)."""
    r, sigma = 5, 1.5
    k1d = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w = np.outer(k1d, k1d)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        for i in range(r, x.shape[0] - r):
            for j in range(r, x.shape[1] - r):
                px, py = x[i - r:i + r + 1, j - r:j + r + 1], y[i - r:i + r + 1, j - r:j + r + 1]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_quality_metric_functions():
    from onnxforge.quantize import cosine, psnr, snr_db, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 20, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
    assert ssim(a, b) == pytest.approx(_naive_ssim(a, b), abs=1e-9) and ssim(a, b) == pytest.approx(ssim(b, a))
    mse = ((a.astype(float) - b) ** 2).mean()
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    x = rng.standard_normal(1000)
    assert cosine(x, 3 * x) == pytest.approx(1.0) and cosine(x, -x) == pytest.approx(-1.0)
    assert snr_db(x, x + 0.1 * x) == pytest.approx(20.0) and snr_db(x, x) == float("inf")
    with pytest.raises(ValueError, match=r"ssim: images of 8x8 px are smaller than the 11 px window"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"psnr: shapes differ"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))


# ---- the runtime pipeline vs diffusers -------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "dpm++2m"])
def test_pipeline_matches_diffusers(sd, pipe, scheduler):
    """Same weights, same starting latents, prompt + negative prompt with guidance: the same picture."""
    latents = sd.initial_latents(11, 64, 64)
    ours = sd.generate(PROMPT, NEGATIVE, steps=STEPS, scheduler=scheduler, width=64, height=64, seed=11)
    ref = _diffusers_image(pipe, scheduler, latents)
    assert ours.pixels.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours.pixels - ref).max() <= IMAGE_ATOL
    # diffusers' expected-slice idea: the bottom-right 3x3 of the last channel
    np.testing.assert_allclose(ours.pixels[-3:, -3:, -1], ref[-3:, -3:, -1], atol=IMAGE_ATOL)
    assert np.asarray(ours.image).std() > 1  # not a blank picture


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_lcm_pipeline_matches_diffusers(sd, pipe, monkeypatch, guidance):
    """Issue 12: the LCM scheduler in the runtime loop. LCM re-noises between steps; the runtime draws the start
    latents and then that noise from one numpy Generator seeded with the run's seed, so diffusers is fed the same
    draws (its randn for the scheduler replaced by the replayed numpy stream): the same picture."""
    import diffusers
    from diffusers.schedulers import scheduling_lcm

    steps, seed = 4, 21
    replay = np.random.default_rng(seed)
    latents = sd.initial_latents(replay, 64, 64)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(
        replay.standard_normal(tuple(shape), dtype=np.float32)))
    ours = sd.generate(PROMPT, NEGATIVE, steps=steps, scheduler="lcm", guidance_scale=guidance, width=64, height=64,
                       seed=seed)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance, width=64,
                   height=64, latents=torch.from_numpy(latents), output_type="np").images[0]
    assert np.abs(ours.pixels - ref).max() <= IMAGE_ATOL
    assert ours.settings["scheduler"] == "lcm" and ours.timings["unet_steps"] == steps
    # The step noise comes from the seed: same start latents, another seed, another picture.
    other = sd.generate(PROMPT, NEGATIVE, steps=steps, scheduler="lcm", guidance_scale=guidance, seed=seed + 1,
                        latents=latents)
    assert np.abs(other.pixels - ours.pixels).max() > 1e-3


def test_pipeline_matches_diffusers_non_square_and_without_guidance(sd, pipe):
    latents = sd.initial_latents(5, 96, 48)
    ours = sd.generate(PROMPT, steps=STEPS, guidance_scale=1.0, width=96, height=48, scheduler="euler", latents=latents)
    ref = _diffusers_image(pipe, "euler", latents, negative=None, guidance=1.0, width=96, height=48)
    assert ours.image.size == (96, 48) and np.abs(ours.pixels - ref).max() <= IMAGE_ATOL


def test_long_prompt_is_truncated_with_a_warning_like_diffusers(sd, pipe):
    long = " ".join([PROMPT] * 10)
    latents = sd.initial_latents(2, 64, 64)
    with pytest.warns(PromptTruncatedWarning, match=r"prompt is \d+ tokens but the text encoder reads 75: truncated, dropping"):
        ours = sd.generate(long, steps=STEPS, latents=latents, scheduler="ddim")
    ref = _diffusers_image(pipe, "ddim", latents, prompt=long, negative="")
    assert np.abs(ours.pixels - ref).max() <= IMAGE_ATOL
    assert any("prompt truncated to 75 tokens" in n for n in ours.notes)


def test_empty_prompt_means_an_unconditional_sample(sd, pipe):
    latents = sd.initial_latents(4, 64, 64)
    with pytest.warns(EmptyPromptWarning, match=r"empty prompt: an unconditional sample"):
        ours = sd.generate("", steps=STEPS, latents=latents, scheduler="pndm")
    ref = _diffusers_image(pipe, "pndm", latents, prompt="", negative="")
    assert np.abs(ours.pixels - ref).max() <= IMAGE_ATOL


def test_seed_decides_the_picture(sd):
    a = sd.generate(PROMPT, seed=1, steps=3)
    b = sd.generate(PROMPT, seed=1, steps=3)
    c = sd.generate(PROMPT, seed=2, steps=3)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.abs(a.pixels - c.pixels).max() > 0.01
    d = sd.generate(PROMPT, steps=3)  # no seed: a random one, recorded
    assert isinstance(d.settings["seed"], int)
    np.testing.assert_array_equal(np.asarray(sd.generate(PROMPT, seed=d.settings["seed"], steps=3).image), np.asarray(d.image))


def test_low_memory_loads_one_submodule_at_a_time(fp32, sd):
    lean = StableDiffusion(fp32, low_memory=True)
    assert lean.loaded == []
    seen = []
    result = lean.generate(PROMPT, seed=3, steps=3, callback=lambda i, t, x: seen.append(lean.loaded))
    assert seen and all(s == ["unet"] for s in seen) and lean.loaded == []
    assert lean.session_loads == {"text_encoder": 1, "unet": 1, "vae_decoder": 1, "vae_encoder": 0}
    assert sd.loaded == ["text_encoder", "unet", "vae_decoder"]  # default: all at once, kept
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(sd.generate(PROMPT, seed=3, steps=3).image))


def test_quantized_variants_draw_pictures_close_to_fp32(sd, int8, int8_dynamic):
    from onnxforge.quantize import psnr

    ref = np.asarray(sd.generate(PROMPT, seed=0, steps=4).image)
    for a in (int8, int8_dynamic):
        img = np.asarray(StableDiffusion(a).generate(PROMPT, seed=0, steps=4).image)
        # the floor the build holds this variant to (on its own quality images), here on another prompt
        floor = next(c["limit"] for c in a.manifest["validation"]["checks"] if c["check"].startswith("image PSNR"))
        assert psnr(ref, img) >= floor


def test_runtime_imports_no_torch(fp32, tmp_path):
    code = ("import sys\nfrom onnxforge.runtime.sd import StableDiffusion\n"
            f"StableDiffusion({str(fp32.dir)!r}).generate('a fox', seed=1, steps=2).save({str(tmp_path / 'x.png')!r})\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'optimum') if m in sys.modules)\n"
            "sys.exit(f'imported {heavy}' if heavy else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- CLI -------------------------------------------------------------------------------------------


def test_cli_imagine_saves_png_with_metadata(fp32, tmp_path):
    out = tmp_path / "fox.png"
    proc = run_cli("imagine", "a red fox in snow", "--artifact", str(fp32.dir), "--seed", "3", "--steps", "4",
                   "--size", "64x48", "--scheduler", "euler", "--negative", "blurry", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"saved {out} (64x48, seed 3, 4 euler steps" in proc.stdout
    image = Image.open(out)
    assert image.size == (64, 48) and image.mode == "RGB"
    meta = image.text
    assert meta["prompt"] == "a red fox in snow" and meta["negative_prompt"] == "blurry"
    assert meta["seed"] == "3" and meta["steps"] == "4" and meta["scheduler"] == "euler" and meta["size"] == "64x48"
    versions = json.loads(meta["artifact"])
    assert versions["version"] == fp32.manifest["artifact"]["version"] and versions["variant"] == "fp32"
    assert set(versions["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    # The same settings give the same picture (through the API too).
    again = StableDiffusion(fp32).generate("a red fox in snow", "blurry", seed=3, steps=4, width=64, height=48,
                                           scheduler="euler")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(again.image))


def test_cli_imagine_by_recipe_and_variant_with_json(sd_tiny, tmp_path):
    out = tmp_path / "q.png"
    proc = run_cli("imagine", "a quiet harbor", "--artifacts", str(sd_tiny.artifacts), "--variant", "int8-dynamic",
                   "--seed", "1", "--steps", "2", "--low-memory", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["image"] == str(out) and record["seed"] == 1 and "int8-dynamic" in record["artifact"]
    assert record["timings"]["unet_steps"] == 3  # PNDM: 2 steps run the UNet 3 times


def test_cli_warns_on_long_and_empty_prompts(fp32, tmp_path):
    proc = run_cli("imagine", " ".join([PROMPT] * 10), "--artifact", str(fp32.dir), "--steps", "1", "--seed", "0",
                   "--out", str(tmp_path / "a.png"))
    assert proc.returncode == 0 and re.search(r"onnxforge imagine: warning: prompt is \d+ tokens .* truncated", proc.stderr)
    proc = run_cli("imagine", "", "--artifact", str(fp32.dir), "--steps", "1", "--seed", "0", "--out", str(tmp_path / "b.png"))
    assert proc.returncode == 0 and "warning: empty prompt: an unconditional sample" in proc.stderr


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 65}, r"width 65 is not a multiple of 8 \(the VAE works on 8x8 pixel blocks\); try 64 or 72"),
    ({"height": 100}, r"height 100 is not a multiple of 8 .* try 96 or 104"),
    ({"width": 16}, r"width 16 is outside the supported range 32\.\.256 px"),
    ({"height": 1024}, r"height 1024 is outside the supported range 32\.\.256 px"),
    ({"width": 64.0}, r"width must be a whole number of pixels, got 64\.0"),
    ({"steps": 0}, r"steps must be a whole number from 1 to 200, got 0"),
    ({"steps": -3}, r"steps must be a whole number from 1 to 200, got -3"),
    ({"steps": 100000}, r"steps must be a whole number from 1 to 200, got 100000"),
    ({"steps": 2.5}, r"steps must be a whole number from 1 to 200, got 2\.5"),
    ({"scheduler": "lms"}, r"unknown scheduler 'lms'; choose one of: pndm, ddim, euler, dpm\+\+2m, lcm"),
    ({"scheduler": "PNDM"}, r"unknown scheduler 'PNDM'"),
    ({"guidance_scale": -1}, r"guidance scale must be a number from 0 to 50"),
    ({"seed": -5}, r"seed must be a whole number >= 0, got -5"),
    ({"latents": np.zeros((1, 4, 4, 4), np.float32)}, r"latents of shape \(1, 4, 4, 4\) do not fit 64x64 px: expected \(1, 4, 8, 8\)"),
])
def test_bad_settings_are_refused_before_any_work(sd, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        sd.generate(PROMPT, **kwargs)
    assert "\n" not in str(info.value)


def test_prompt_must_be_text(sd):
    with pytest.raises(ValueError, match=r"prompt must be text, got NoneType"):
        sd.generate(None)


@pytest.mark.parametrize("args, match", [
    (["--size", "65x64"], r"width 65 is not a multiple of 8"),
    (["--size", "16"], r"width 16 is outside the supported range 32\.\.256 px"),
    (["--size", "big"], r"--size 'big': expected WIDTHxHEIGHT or one number"),
    (["--steps", "0"], r"steps must be a whole number from 1 to 200, got 0"),
    (["--steps", "5000"], r"steps must be a whole number from 1 to 200, got 5000"),
    (["--scheduler", "lms"], r"unknown scheduler 'lms'; choose one of: pndm, ddim, euler, dpm\+\+2m, lcm"),
    (["--out", "x.jpg"], r"--out x\.jpg: the picture is saved as PNG"),
])
def test_cli_bad_input_is_one_line_with_exit_2(fp32, tmp_path, args, match):
    out_args = [] if "--out" in args else ["--out", str(tmp_path / "x.png")]
    proc = run_cli("imagine", "a fox", "--artifact", str(fp32.dir), *args, *out_args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("onnxforge imagine: error:") and re.search(match, lines[0]), lines
    assert not (tmp_path / "x.png").exists()


def test_cli_missing_artifact(tmp_path):
    proc = run_cli("imagine", "a fox", "--artifacts", str(tmp_path), "--variant", "int8")
    assert proc.returncode == 2 and "no artifact at" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def artifact_copy(fp32, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(fp32.dir, dst)
    return dst


@pytest.mark.parametrize("damage, match", [
    ("delete", r"unet\.onnx\.data: file named by the manifest \(component unet\) is missing"),
    ("truncate", r"unet\.onnx\.data: \d+ bytes, manifest says \d+: the file was changed or truncated"),
    ("corrupt", r"unet\.onnx\.data: sha256 does not match the manifest"),
])
def test_damaged_unet_external_data_is_refused_naming_the_file(artifact_copy, tmp_path, damage, match):
    data = artifact_copy / "unet.onnx.data"
    if damage == "delete":
        data.unlink()
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    else:
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    with pytest.raises(art.ArtifactError, match=match):
        StableDiffusion(artifact_copy)
    proc = run_cli("imagine", "a fox", "--artifact", str(artifact_copy), "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and re.search(match, proc.stderr) and len(proc.stderr.strip().splitlines()) == 1


def test_not_an_sd_artifact(artifact_copy):
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    manifest["runtime"]["kind"] = "sam"
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(art.ArtifactError, match=r"is a Segment Anything model \(recipe sd-tiny, .*, but onnxforge imagine needs a Stable Diffusion pipeline; "
                       r"use it with `onnxforge segment --artifact"):
        StableDiffusion(artifact_copy)


# ---- build-time failures: floors, node names, calibration prompts ----------------------------------


@pytest.fixture(scope="module")
def scratch_project(sd_tiny, tmp_path_factory):
    """A copy of the built project (hard links: no rebuild, no extra disk), to break things in."""
    root = tmp_path_factory.mktemp("sd-scratch")
    project = new_project(root / "p", {"sd-tiny": (REPO / "recipes" / "sd-tiny.yaml").read_text()})
    # doit rewrites its state file in place: that one is copied, so the original project's stays as it was.
    shutil.copytree(sd_tiny.artifacts, project.artifacts, dirs_exist_ok=True,
                    copy_function=lambda src, dst: shutil.copy2(src, dst) if src.endswith(".db") else os.link(src, dst))
    return project


def _with_variants(extra: str) -> str:
    return (REPO / "recipes" / "sd-tiny.yaml").read_text() + extra


def test_a_variant_below_its_floors_fails_the_build_with_the_numbers(scratch_project):
    scratch_project.recipes.joinpath("sd-tiny.yaml").write_text(_with_variants(
        "  strict:\n    unet: {mode: dynamic, op_types: [MatMul], min_cosine: 0.99, min_snr_db: 300}\n"
        "    text_encoder: {mode: dynamic}\n    min_psnr_db: 200\n    min_ssim: 0.5\n"))
    proc = scratch_project.doit("validate:sd-tiny-strict", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    assert re.search(r"validate:sd-tiny-strict: failed, nothing published: unet output SNR dB vs fp32 \(mean, held-out "
                     r"inputs\): [\d.]+ \(limit 300\.0\); image PSNR dB vs fp32 pipeline \(mean\): [\d.]+ \(limit 200\.0\)",
                     text)
    assert "cosine" not in text.split("nothing published:")[1].split("\n")[0]  # only the failed floors are named
    assert not (scratch_project.artifacts / "sd-tiny" / "strict" / "LATEST").exists()


def test_a_damaged_unet_fails_the_shipped_int8_floors(scratch_project):
    """The int8 floors bite: the same variant with every UNet node quantized (no float time embedding,
    conv_in/out, shortcuts; static MatMuls) fails them, on the UNet's own floors first."""
    damaged = recipe_variant("int8")
    damaged["unet"] = {**damaged["unet"], "op_types": ["Conv", "Gemm", "MatMul"], "dynamic_op_types": [], "keep_float": []}
    scratch_project.recipes.joinpath("sd-tiny.yaml").write_text(
        _with_variants("  damaged: " + json.dumps(damaged) + "\n"))
    proc = scratch_project.doit("publish:sd-tiny-damaged", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    line = next(x for x in text.splitlines() if x.startswith("validate:sd-tiny-damaged: failed, nothing published: "))
    unet = damaged["unet"]
    assert re.search(rf"unet output cosine vs fp32 \(mean, held-out inputs\): [\d.]+ \(limit {unet['min_cosine']}\)", line), line
    assert re.search(rf"unet output SNR dB vs fp32 \(mean, held-out inputs\): [\d.]+ \(limit {unet['min_snr_db']}\)", line), line
    assert not (scratch_project.artifacts / "sd-tiny" / "damaged" / "LATEST").exists()


def test_keep_float_naming_missing_nodes_fails_naming_them(scratch_project):
    scratch_project.recipes.joinpath("sd-tiny.yaml").write_text(_with_variants(
        "  badnodes:\n    unet: {mode: dynamic, keep_float: [conv_in, down_blocks.9/resnets.0, 'op:Softmax']}\n"))
    proc = scratch_project.doit("quantize:sd-tiny-badnodes", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    assert ("quantize:sd-tiny-badnodes: variants.badnodes.unet: keep_float pattern 'down_blocks.9/resnets.0' "
            "matches no node of unet.onnx") in text


def test_keep_float_patterns(fp32):
    from onnxforge.quantize import match_nodes, resolve_keep_float

    path = fp32.component_path("unet")
    model = onnx.load(str(path), load_external_data=False)
    assert match_nodes(model, "conv_in") == ["/unet/conv_in/Conv"]
    mha = [n.name for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert match_nodes(model, "op:MultiHeadAttention") == mha != []
    assert match_nodes(model, "*time_emb_proj/Gemm") == match_nodes(model, "time_emb_proj") != []
    assert match_nodes(model, "onv_in") == []  # a module path matches whole segments, not substrings
    excluded, counts = resolve_keep_float(path, ["conv_in", "conv_out", "nothing_here"], strict=False, what="x")
    assert counts == {"conv_in": 1, "conv_out": 1, "nothing_here": 0} and len(excluded) == 2
    with pytest.raises(ValueError, match=r"x: keep_float pattern 'time_emb_prj' matches no node of unet\.onnx "
                                         r"\(\d+ nodes\); close: time_emb_proj"):
        resolve_keep_float(path, ["time_emb_prj"], strict=True, what="x")
    with pytest.raises(ValueError, match=r"keep_float pattern 'op:MultiHeadAtention' matches no node.*"
                                         r"close: op:MultiHeadAttention"):
        resolve_keep_float(path, ["op:MultiHeadAtention"], strict=True, what="x")


@pytest.mark.parametrize("content, match", [
    (None, r"calibration/cal\.txt: calibration prompts file not found \(recipe key calibration\.prompts\)"),
    ("# only a comment\n\n   \n", r"calibration/cal\.txt: calibration prompts file has no prompts"),
    ("one prompt\ntwo prompts\n", r"calibration/cal\.txt: 2 prompt\(s\), but calibration\.held_out is 2: need at least 3"),
])
def test_calibration_prompts_missing_or_empty_fail_the_calibrate_stage(scratch_project, content, match):
    # The tiny tokenizer trains on sd-prompts.txt: point calibration at another file, leave the source alone.
    text = _with_variants("").replace("  prompts: calibration/sd-prompts.txt", "  prompts: calibration/cal.txt")
    scratch_project.recipes.joinpath("sd-tiny.yaml").write_text(text)
    prompts = scratch_project.dir / "calibration" / "cal.txt"
    prompts.unlink(missing_ok=True)
    if content is not None:
        prompts.write_text(content)
    proc = scratch_project.doit("calibrate:sd-tiny", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text and re.search(match, text), text[-2000:]
    assert ".  source:sd-tiny" not in proc.stdout  # the source was up to date: only calibration ran


# ---- recipes -----------------------------------------------------------------------------------------


def test_shipped_sd_recipes_load():
    from onnxforge.config import load_recipes

    recipes = load_recipes(REPO / "recipes")
    hub = recipes["sd-v1-4"].body
    assert hub.source.hub.repo == "CompVis/stable-diffusion-v1-4"
    assert hub.source.hub.revision == "133a221b8aa7292a167afc5127cb63fb5005638b"
    assert hub.variants["int8"].unet.mode == "static" and hub.variants["int8-dynamic"].unet.mode == "dynamic"
    random = recipes["sd-v1-4-random"].body.source.random
    assert random.config == "sd-v1-4"
    cfg = json.loads((REPO / "recipes" / "configs" / "sd-v1-4.json").read_text())
    assert cfg["unet"]["block_out_channels"] == [320, 640, 1280, 1280] and cfg["text_encoder"]["hidden_size"] == 768
    assert cfg["vae"]["block_out_channels"] == [128, 256, 512, 512] and cfg["scheduler"]["_class_name"] == "PNDMScheduler"
    assert recipes["sd-tiny"].body.default is True


SD_HEAD = ("family: sd\nsource:\n  random: {config: {}, seed: 0, tokenizer: {train_on: calibration/sd-prompts.txt, "
           "vocab_size: 500}}\n")


@pytest.mark.parametrize("body, match", [
    (SD_HEAD + "variants: {}\n", r"name at least one variant"),
    (SD_HEAD + "variants: {fp32: {unet: {mode: int4}}}\n", r"variants\.fp32\.unet\.mode: Input should be 'float', 'static' or 'dynamic'"),
    (SD_HEAD + "variants: {fp32: {unet: {modes: static}}}\n", r"variants\.fp32\.unet\.modes: unknown key"),
    (SD_HEAD + "variants: {'Bad Name': {}}\n", r"variants\.Bad Name\.\[key\]: String should match pattern"),
    (SD_HEAD + "variants: {fp32: {}}\nruntime: {size: [500, 512]}\n", r"runtime\.size\.0: Input should be a multiple of 8"),
    (SD_HEAD + "variants: {fp32: {}}\nruntime: {min_size: 512, max_size: 256}\n", r"min_size 512 is larger than max_size 256"),
    (SD_HEAD + "variants: {fp32: {}}\nruntime: {steps: 300}\n", r"steps 300 exceeds max_steps 200"),
    (SD_HEAD + "variants: {fp32: {}}\ncalibration: {max_prompts: 3, held_out: 3}\n", r"held_out \(3\) must be smaller than max_prompts \(3\)"),
    (SD_HEAD + "variants: {fp32: {}}\nquality: {images: 3}\n", r"quality\.images \(3\) exceeds calibration\.held_out \(2\)"),
    (SD_HEAD + "variants: {fp32: {}}\ncalibration: {scheduler: lms}\n", r"calibration\.scheduler: Input should be 'pndm', 'ddim', 'euler', 'dpm\+\+2m' or 'lcm'"),
    (SD_HEAD + "variants: {fp32: {}}\nvalidate: {sizes: [[64, 60]]}\n", r"validate\.sizes\.0\.1: Input should be a multiple of 8"),
    (SD_HEAD + "variants: {q: {unet: {mode: dynamic, dynamic_op_types: [MatMul]}}}\n",
     r"variants\.q\.unet: dynamic_op_types is for mode static \(then dynamic\); with mode dynamic use op_types"),
    (SD_HEAD + "variants: {q: {unet: {mode: static, op_types: [Conv, MatMul], dynamic_op_types: [MatMul]}}}\n",
     r"\['MatMul'\] in both op_types and dynamic_op_types"),
])
def test_bad_sd_recipe_is_one_line(tmp_path, body, match):
    path = tmp_path / "broken.yaml"
    path.write_text(body)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_uncached_hub_recipe_fails_fast_naming_the_repo(tmp_path):
    project = new_project(tmp_path / "p", {"sd-v1-4": (REPO / "recipes" / "sd-v1-4.yaml").read_text()})
    hf = tmp_path / "hf"
    proc = project.doit("build", "recipes=sd-v1-4", check=False, HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"),
                        HF_HUB_OFFLINE="1")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    assert "source:sd-v1-4: CompVis/stable-diffusion-v1-4@133a221b8aa7 is not in the Hugging Face cache" in text


def test_path_source_must_look_like_the_hub_repo(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    body = "family: sd\nsource: {path: model}\nvariants: {fp32: {}}\n"
    project = new_project(tmp_path / "p", {"sd-local": body})
    shutil.move(str(tmp_path / "model"), project.dir / "model")
    proc = project.doit("build", "recipes=sd-local", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text
    assert re.search(r"not a Stable Diffusion folder laid out like the Hub repo \(missing scheduler/scheduler_config\.json", text)


# ---- benchmark script (structure only: benchmarks never assert timings) ----------------------------


def test_bench_sd_writes_json_table_and_chart(fp32, int8_dynamic, tmp_path):
    from onnxforge.bench import bench_variants

    report = bench_variants({"fp32": fp32.dir, "int8-dynamic": int8_dynamic.dir}, tmp_path, update_manifests=False,
                            settings={"sizes": "64", "runs": 1, "warmup": 0, "image_steps": 2, "low_memory": True})
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["settings"]["low_memory"] is True and saved["family"] == "sd"
    assert saved["variants"].keys() == {"fp32", "int8-dynamic"}
    for r in saved["variants"].values():
        subs = r["submodules"]
        assert set(subs) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
        assert subs["unet"]["64"]["ms"]["n"] == 1 and subs["unet"]["64"]["peak_rss_mib"] > 0
        assert "77 tokens" in subs["text_encoder"]
        assert r["image"]["steps"] == 2 and r["image"]["size"] == 64 and r["image"]["unet_calls"] == 3
        assert r["image"]["low_memory"] is True
        assert r["size_mib"] > 0 and set(r["component_mib"]) == set(subs)
    assert saved["variants"]["int8-dynamic"]["modes"]["unet"] == "dynamic"
    assert "unet@64 speedup" in report["ratios"]["int8-dynamic"] and "size_fraction" in report["ratios"]["int8-dynamic"]
    assert "fp32" in (tmp_path / "bench.md").read_text() and "low-memory" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_one_file_per_tensor_export_is_gathered_into_one_data_file(tmp_path):
    """Issue 10, item 17: the TorchScript exporter's one-file-per-tensor output (a model over 2 GB) becomes
    model + one .data file tensor by tensor, with the same weights (the full-size UNet no longer loads whole)."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from onnxforge.families.sd.export import save_with_one_data_file

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 32), dtype=np.float32), rng.standard_normal((32, 8), dtype=np.float32)
    small = np.float32([0.5, -1.0])  # under the threshold: stays inline
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"]),
         helper.make_node("Mul", ["y0", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.resize(small, 8), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "scratch").mkdir()
    onnx.save_model(model, str(tmp_path / "scratch" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list((tmp_path / "scratch").iterdir())) == 3  # model + w1 + w2 (s is 32 bytes: inline)

    save_with_one_data_file(tmp_path / "scratch" / "model.onnx", tmp_path / "unet.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch", "unet.onnx", "unet.onnx.data"]
    shutil.rmtree(tmp_path / "scratch")  # nothing may still point there
    loaded = onnx.load(str(tmp_path / "unet.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert np.array_equal(weights["w1"], w1) and np.array_equal(weights["w2"], w2)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    y = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, (x @ w1 @ w2) * np.resize(small, 8), rtol=1e-5, atol=1e-5)
