"""Issue 17: the artifacts opened by the ecosystem's own loaders, used as real clients (optimum-onnx 0.1.0).

GPT-2: optimum's ORTModelForCausalLM opens a version folder as it is (config, generation config and tokenizer
files are published with the model) and its greedy `generate` gives our runtime's tokens: kv, kv-int8, and
base with use_cache=False. The pruned variant does not load: optimum builds the first step's empty cache from
config.n_head, and pruning keeps fewer heads per layer (the test asserts onnxruntime's exact refusal).
Stable Diffusion: `onnxforge export-layout` links an artifact into the folder optimum's ORTStableDiffusionPipeline
reads; with the same scheduler, prompt and initial latents it draws our runtime's picture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from optimum.onnxruntime import ORTModelForCausalLM, ORTStableDiffusionPipeline
from transformers import AutoTokenizer

from onnxforge.runtime import artifact as art
from onnxforge.runtime.sd import StableDiffusion
from onnxforge.runtime.text import TextGenerator

from conftest import REPO, run_cli

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")


def _stage_params(manifest: dict, stage: str) -> dict:
    return next(s for s in manifest["stages"] if s["stage"] == stage)["params"]


def _one_line_error(proc, pattern: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(pattern, err), err


# ---- GPT-2: ORTModelForCausalLM ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["base", "kv", "pruned", "kv-int8"])
def test_gpt2_artifacts_publish_the_files_transformers_reads_listed_and_hashed(tiny, variant):
    folder = tiny.variant(variant)
    listed = {r["file"]: r for r in json.loads((folder / art.MANIFEST).read_text())["files"]}
    for name in HF_FILES:
        assert name in listed, f"{variant}: {name} not in the manifest's files"
        assert listed[name]["sha256"] == art.sha256_file(folder / name)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    if variant == "pruned":  # the pruned model's own config: what transformers needs to rebuild it
        assert config["pruned_heads"] and config["n_inner"]


def test_a_changed_config_file_is_refused_like_any_other_file(tiny, tmp_path):
    folder = shutil.copytree(tiny.variant("kv"), tmp_path / "kv")
    (folder / "generation_config.json").write_text("{}\n")
    with pytest.raises(art.ArtifactError, match=r"generation_config\.json: \d+ bytes, manifest says"):
        TextGenerator(folder)


def test_transformers_tokenizer_from_the_artifact_encodes_as_the_runtime(tiny):
    folder = tiny.variant("kv")
    texts = (REPO / "calibration" / "eval-text.txt").read_text().splitlines() + [
        "", "  two  spaces\tand a tab", "caf\u00e9 \u2014 na\u00efve \U0001f600", "<|endoftext|>The end"]
    gen, tok = TextGenerator(folder), AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "GPT2TokenizerFast" and tok.model_max_length == gen.lm.context_length
    assert [tok(t)["input_ids"] for t in texts] == [gen.encode(t) for t in texts]


def _greedy_both(folder: Path, model) -> tuple[list[int], list[int], int]:
    """Our runtime's greedy tokens and optimum's `generate(do_sample=False)`, from the validate stage's prompt."""
    manifest = json.loads((folder / art.MANIFEST).read_text())
    p = _stage_params(manifest, "validate")
    gen = TextGenerator(folder)
    ids = gen.encode(p["greedy_prompt"])
    ours = gen.lm.greedy(ids, p["greedy_tokens"])
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=p["greedy_tokens"], do_sample=False)
    return ours, out[0, len(ids):].tolist(), gen.eos_id


@pytest.mark.parametrize("variant", ["kv", "kv-int8", "base"])
def test_optimum_causal_lm_gives_our_greedy_tokens(tiny, variant):
    """Exact equality: the same graph on the same onnxruntime, greedy. A model without cache (base) loads with
    use_cache=False. transformers stops at EOS where our greedy goes on: the tokens up to it must agree."""
    folder = tiny.variant(variant)
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=variant != "base")
    assert model.can_use_cache == (variant != "base")
    ours, theirs, eos = _greedy_both(folder, model)
    assert theirs == ours[:len(theirs)]
    assert len(theirs) == len(ours) or theirs[-1] == eos, (ours, theirs)


def test_optimum_needs_use_cache_false_for_the_variant_without_cache(tiny):
    model = ORTModelForCausalLM.from_pretrained(tiny.variant("base"))  # optimum's default: use_cache=True
    with pytest.raises(ValueError, match=r"`use_cache=True` was passed to the model but the loaded model does not "
                                         r"support pkv cache reuse"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)


def test_optimum_cannot_run_the_pruned_variant_and_says_why(tiny):
    """optimum (modeling_decoder.py) builds the first step's empty past with config.n_head heads of
    n_embd / n_head; the pruned graph's past has the heads pruning kept. onnxruntime refuses the shape."""
    folder = tiny.variant("pruned")
    manifest = json.loads((folder / art.MANIFEST).read_text())
    kept = next(s for s in manifest["stages"] if s["stage"] == "prune")["heads_kept_per_layer"]
    n_head = json.loads((folder / "config.json").read_text())["n_head"]
    assert kept < n_head
    assert TextGenerator(folder).lm.greedy([1, 2, 3], 4)  # our runtime runs it
    model = ORTModelForCausalLM.from_pretrained(folder)  # loading works; the first step fails
    with pytest.raises(Exception, match=rf"(?s)Got invalid dimensions for input: past_key_values\.\d+\.key .*"
                                        rf"Got: {n_head} Expected: {kept}"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)


# ---- Stable Diffusion: export-layout + ORTStableDiffusionPipeline ---------------------------------


@pytest.fixture(scope="module")
def layouts(sd_tiny, tmp_path_factory) -> dict[str, Path]:
    """`onnxforge export-layout` of each sd-tiny variant, through the CLI."""
    root = tmp_path_factory.mktemp("optimum-layouts")
    out = {}
    for variant in ("fp32", "int8", "int8-dynamic"):
        proc = run_cli("export-layout", "--artifact", str(sd_tiny.artifacts / "sd-tiny" / variant),
                       "--out", str(root / variant))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert re.match(rf"wrote {re.escape(str(root / variant))}: \d+ files linked to .*left out: vae_encoder\n"
                        r"load it with ORTStableDiffusionPipeline\.from_pretrained", proc.stdout), proc.stdout
        out[variant] = root / variant
    return out


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_export_layout_links_every_file_of_optimums_layout(sd_tiny, layouts, variant):
    artifact = sd_tiny.variant(variant, recipe="sd-tiny")
    manifest = json.loads((artifact / art.MANIFEST).read_text())
    layout = layouts[variant]
    index = json.loads((layout / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", manifest["runtime"]["scheduler_config"]["_class_name"]]
    assert index["_onnxforge"]["version"] == manifest["artifact"]["version"]
    expected = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae_decoder"}
    for folder, component in expected.items():
        comp = manifest["components"][component]
        assert os.path.samefile(layout / folder / "model.onnx", artifact / comp["file"])  # a link, not a copy
        for rec in comp["files"][1:]:  # external data keeps the name the ONNX file gives it
            assert os.path.samefile(layout / folder / Path(rec["file"]).name, artifact / rec["file"])
        assert (layout / folder / "config.json").is_file()
    assert os.path.samefile(layout / "scheduler" / "scheduler_config.json", artifact / "scheduler_config.json")
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {f.name for f in (layout / "tokenizer").iterdir()}
    assert not (layout / "vae_encoder").exists()  # see layout.py: optimum reads another VAE encoder output
    assert manifest["components"]["unet"]["outputs"][0]["name"] == "out_sample"


@pytest.mark.parametrize("variant", ["fp32", "int8", "int8-dynamic"])
def test_optimum_pipeline_draws_our_picture(sd_tiny, layouts, variant):
    """optimum's pipeline (diffusers' PNDM in torch) vs `onnxforge imagine` (our numpy PNDM), same prompt,
    guidance, steps and initial latents.

    Text: optimum encodes the prompt and the negative prompt in two batch-1 calls, our runtime in one batch-2
    call; each must equal our text encoder on that prompt alone. Tolerances: fp32 pixels within 1e-4 (measured
    9e-7). Quantized: the first step's latents within 1e-5 (measured 2e-7) where the text encoder has fixed int8
    scales (a dynamic one picks its scales per call, so a batch of 2 and two of 1 differ: 0.08 measured), and the
    picture within the PSNR floor the recipe holds the variant to against fp32: the schedulers' last-bit float
    differences can move an activation across an int8 rounding step, which a random-weight UNet amplifies
    (measured: int8 41 dB over a 34 dB floor, int8-dynamic 63 dB over 48 dB)."""
    artifact = sd_tiny.variant(variant, recipe="sd-tiny")
    manifest = json.loads((artifact / art.MANIFEST).read_text())
    settings = dict(steps=10, guidance_scale=7.5, width=64, height=64)
    prompt = "a lighthouse at dusk, oil painting"
    sd = StableDiffusion(artifact)
    ours_steps: list[np.ndarray] = []
    ours = sd.generate(prompt, seed=0, scheduler="pndm", callback=lambda i, t, x: ours_steps.append(x.copy()),
                       **settings)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)  # what seed 0 draws
    assert sd.initial_latents(0, 64, 64).tobytes() == latents.tobytes()

    pipe = ORTStableDiffusionPipeline.from_pretrained(layouts[variant])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    embeds, negative = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    for text, theirs in ((prompt, embeds), ("", negative)):
        alone = sd.session("text_encoder").run(None, {"input_ids": sd.tokenizer(text)[0]})[0]
        assert np.abs(theirs.numpy() - alone).max() <= 1e-6
    theirs_steps: list[np.ndarray] = []

    def keep(p, i, t, kwargs):
        theirs_steps.append(kwargs["latents"].numpy().copy())
        return kwargs

    image = pipe(prompt, num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                 width=64, height=64, latents=torch.from_numpy(latents), output_type="np",
                 callback_on_step_end=keep).images[0]
    assert len(theirs_steps) == len(ours_steps)
    diff = image - ours.pixels
    if variant == "fp32":
        assert np.abs(diff).max() <= 1e-4
        return
    text_mode = next(s for s in manifest["stages"] if s["stage"] == "quantize")["params"]["submodules"]["text_encoder"]
    if text_mode["mode"] != "dynamic":
        assert np.abs(theirs_steps[0] - ours_steps[0]).max() <= 1e-5
    floor = _stage_params(manifest, "validate")["floors"]["min_psnr_db"]
    psnr = 10 * np.log10(1.0 / np.mean(diff.astype(np.float64) ** 2))
    assert psnr >= floor, (psnr, floor)


# ---- bad input ---------------------------------------------------------------------------------------


def test_export_layout_refuses_another_familys_artifact(tiny, tmp_path):
    proc = run_cli("export-layout", "--artifact", str(tiny.artifacts / "gpt2-tiny" / "kv"), "--out", str(tmp_path / "x"))
    _one_line_error(proc, r"is a GPT-2 text generator \(recipe gpt2-tiny, variant kv, family gpt2\): export-layout "
                          r"writes Stable Diffusion pipeline artifacts only; optimum opens it as it is: "
                          r"ORTModelForCausalLM\.from_pretrained\(")
    assert not (tmp_path / "x").exists()


def test_export_layout_never_writes_into_a_folder_that_is_not_empty(sd_tiny, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    proc = run_cli("export-layout", "--artifact", str(sd_tiny.artifacts / "sd-tiny" / "fp32"), "--out", str(target))
    _one_line_error(proc, r"--out .*taken: exists and is not an empty folder; export-layout never overwrites")
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "mine\n"
    (tmp_path / "a-file").write_text("x")
    _one_line_error(run_cli("export-layout", "--artifact", str(sd_tiny.artifacts / "sd-tiny" / "fp32"),
                            "--out", str(tmp_path / "a-file")), r"exists and is not an empty folder")
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is taken
    assert run_cli("export-layout", "--artifact", str(sd_tiny.artifacts / "sd-tiny" / "fp32"),
                   "--out", str(empty)).returncode == 0
    assert (empty / "model_index.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_export_layout_refuses_an_artifact_built_with_other_io_names(sd_tiny, tmp_path):
    """An SD artifact from before the UNet output was named as optimum reads it: one line, rebuild."""
    folder = shutil.copytree(sd_tiny.variant("fp32", recipe="sd-tiny"), tmp_path / "old")
    manifest = json.loads((folder / art.MANIFEST).read_text())
    manifest["components"]["unet"]["outputs"][0]["name"] = "noise_pred"
    (folder / art.MANIFEST).write_text(json.dumps(manifest))
    proc = run_cli("export-layout", "--artifact", str(folder), "--out", str(tmp_path / "x"))
    _one_line_error(proc, r"unet takes \['sample', 'timestep', 'encoder_hidden_states'\] and gives 'noise_pred', "
                          r"optimum's pipeline feeds .* and reads 'out_sample': rebuild it")
    assert not (tmp_path / "x").exists()
