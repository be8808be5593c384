"""`onnxforge export-layout`: an SD artifact as the folder optimum's ORTStableDiffusionPipeline loads.

    <out>/model_index.json                        written here (pipeline class, component classes)
    <out>/scheduler/scheduler_config.json         links to the artifact's files, nothing copied:
    <out>/tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, tokenizer.json}
    <out>/{text_encoder,unet,vae_decoder}/model.onnx (+ its external data, same name) + config.json

Why a linked folder and not the published layout: the artifact's own layout is what every stage, the
runtime and the manifests use; optimum's is a second view of the same bytes. The export names the
submodules' inputs and outputs as optimum's exporter does (submodules.py), so no graph is rewritten and
every file is a hard link: a multi-GB UNet is not stored twice (a copy only across file systems, said).
The VAE encoder is left out: optimum's img2img and inpaint pipelines read a `latent_parameters` output
(mean and log-variance together), ours gives `latent_mean` and `latent_std` (onnxforge's `edit` uses it);
text to image does not need it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ...runtime.artifact import Artifact, ArtifactError
from .submodules import CONFIGS_DIR, SCHEDULER_CONFIG, TOKENIZER_DIR

# optimum-onnx 0.1.0's ORTStableDiffusionPipeline: folder -> (our component, our config, inputs, first output).
# It feeds inputs by name and reads the UNet's output by the name `out_sample` (modeling_diffusion.ORTUnet).
OPTIMUM_SD = {
    "text_encoder": ("text_encoder", "text_encoder", ["input_ids"], "last_hidden_state"),
    "unet": ("unet", "unet", ["sample", "timestep", "encoder_hidden_states"], "out_sample"),
    "vae_decoder": ("vae_decoder", "vae", ["latent_sample"], "sample"),
}
MODEL_FILE = "model.onnx"  # optimum's file name in each component folder


def check_optimum_io(a: Artifact) -> None:
    """One line when the artifact's submodules do not have the inputs and outputs optimum feeds and reads."""
    rebuild = f"rebuild it with this onnxforge (`doit build recipes={a.manifest['artifact']['recipe']}`)"
    for folder, (component, config, inputs, output) in OPTIMUM_SD.items():
        comp = a.manifest["components"].get(component)
        if comp is None:
            raise ArtifactError(f"{a.dir}: has no {component} component, which optimum's pipeline needs")
        got_in = [i["name"] for i in comp["inputs"]]
        got_out = comp["outputs"][0]["name"] if comp["outputs"] else None
        if got_in != inputs or got_out != output:
            raise ArtifactError(f"{a.dir}: {component} takes {got_in} and gives {got_out!r}, optimum's pipeline feeds "
                                f"{inputs} and reads {output!r}: {rebuild}")
        if not (a.dir / CONFIGS_DIR / f"{config}.json").is_file():
            raise ArtifactError(f"{a.dir}: no {CONFIGS_DIR}/{config}.json (artifacts carry their component configs "
                                f"since optimum layouts exist): {rebuild}")


def model_index(a: Artifact) -> dict:
    """diffusers' model_index.json for the linked folder: which library class loads each component."""
    scheduler = a.runtime["scheduler_config"]["_class_name"]
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": a.manifest["toolchain"].get("diffusers"),
            "_onnxforge": {k: a.manifest["artifact"][k] for k in ("recipe", "variant", "version", "content_digest")},
            "scheduler": ["diffusers", scheduler], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False}


def _link(src: Path, dst: Path, copied: list) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system (or no hard links there): a real copy, reported
        shutil.copyfile(src, dst)
        copied.append(src.stat().st_size)


def export_layout(a: Artifact, out: Path) -> dict:
    """Write the optimum layout of a verified SD artifact into `out` (which must not exist or be empty),
    atomically: built in a temporary folder beside it, renamed into place when complete."""
    check_optimum_io(a)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    copied: list[int] = []
    try:
        tmp.mkdir(parents=True)
        for folder, (component, config, _, _) in OPTIMUM_SD.items():
            comp = a.manifest["components"][component]
            for rec in comp["files"]:  # the ONNX file first, then its external data under its own name
                name = MODEL_FILE if rec["file"] == comp["file"] else Path(rec["file"]).name
                _link(a.dir / rec["file"], tmp / folder / name, copied)
            _link(a.dir / CONFIGS_DIR / f"{config}.json", tmp / folder / "config.json", copied)
        for f in sorted((a.dir / TOKENIZER_DIR).iterdir()):
            _link(f, tmp / "tokenizer" / f.name, copied)
        _link(a.dir / SCHEDULER_CONFIG, tmp / "scheduler" / "scheduler_config.json", copied)
        (tmp / "model_index.json").write_text(json.dumps(model_index(a), indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked by the caller); a folder that filled up since fails here, untouched
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {"folder": out, "files": len(files), "copied_bytes": sum(copied), "left_out": ["vae_encoder"],
            "load": f'ORTStableDiffusionPipeline.from_pretrained("{out}")'}
