"""Stable Diffusion: source, export, calibrate, quantize and validate stages, and the recipe's plan.

Four ONNX components per artifact, each exported on its own (TorchScript exporter: its node names
are module paths such as /unet/down_blocks.0/resnets.0/conv_shortcut/Conv, which is what a recipe's
keep_float patterns select):
    text_encoder  input_ids (B, 77) int64 -> last_hidden_state (B, 77, D)
    unet          sample (B, C, h, w), timestep (B,) float32, encoder_hidden_states (B, 77, D) -> noise_pred
    vae_decoder   latent_sample (B, C, h, w) (already divided by scaling_factor) -> sample (B, 3, 8h, 8w) in [-1, 1]
    vae_encoder   sample (B, 3, H, W) in [-1, 1] -> latent_mean, latent_std (B, C, H/8, W/8)
Batch, height and width are named dims when the recipe says so (export.dynamic_batch/_size).

Stages:
    source     random (seeded tiny or real-size configs, CLIP BPE trained offline), hub or path
    export     the four components + tokenizer.json + scheduler_config.json; parity vs PyTorch per
               submodule (fails the build over the recipe's tolerance). UNet/VAE attention becomes
               onnxruntime's MultiHeadAttention (flash attention on CPU) unless export.fused_attention
               is false.
    calibrate  full denoising trajectories of the calibration prompts through diffusers' own pipeline:
               text-encoder ids, UNet inputs at every step (cond + uncond), final latents, decoded
               images. Cached under artifacts/.calibration/sd-<digest> (digest: prompts, source,
               settings), so recipes that share them share one copy.
    quantize   per variant, per submodule: float, static int8 (QDQ, calibrated), dynamic int8, or
               static for some op types then dynamic for others (UNet: Conv static, MatMul dynamic)
    validate   fp32: the export's parity checks; quantized: cosine/SNR per submodule on held-out
               calibration inputs, PSNR/SSIM of whole pictures vs fp32, CLIP score if a CLIP model is
               local; floors from the recipe. Then publish.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np

from ..config import SD_SUBMODULES, Recipe, RecipeError, SdRecipe
from ..runtime.artifact import make_session
from ..sources import SourceError
from ..store import StageContext, StageSpec, ValidationFailed, atomic_dir, clean_stale_tmp, link_or_copy
from .common import (ORT_CUSTOM_OPSETS, builder_digest, count_parameters, existing_model_dir, model_dir_of,
                     ort_multihead_attention, record_check, source_params, spec_factory)

# Only what the four submodules need: not the 4-7 GB .ckpt files, fp16 copies or the safety checker.
HUB_FILES = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
             "text_encoder/model.safetensors", "tokenizer/*", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
LAYOUT = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json",
          "vae/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt")
WEIGHT_FOLDERS = ("text_encoder", "unet", "vae")
FILES = {name: f"{name}.onnx" for name in SD_SUBMODULES}
IO = {
    "text_encoder": {"inputs": ["input_ids"], "outputs": ["last_hidden_state"]},
    "unet": {"inputs": ["sample", "timestep", "encoder_hidden_states"], "outputs": ["noise_pred"]},
    "vae_decoder": {"inputs": ["latent_sample"], "outputs": ["sample"]},
    "vae_encoder": {"inputs": ["sample"], "outputs": ["latent_mean", "latent_std"]},
}
TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = f"{TOKENIZER_DIR}/tokenizer.json"
SCHEDULER_CONFIG = "scheduler_config.json"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's pre-tokenizer
EXTERNAL_DATA_BYTES = 1.8e9
# Texts on which the runtime's tokenization must equal transformers' CLIPTokenizer (export stage).
TOKENIZER_CHECK_TEXTS = ("", "a lighthouse on a rocky cliff at dusk, oil painting",
                         "A Lighthouse,  at DUSK!! 1984 \u2014 caf\u00e9 o'clock", "  spaces\tand\nnew lines  ",
                         "a red fox's den, 3 cubs; 12:30 pm - watercolor & ink", "zebra quokka xylophone")

# Kept in float unless a recipe says otherwise: the parts that static int8 of the UNet is known to
# break (time embedding and its per-block projections, first and last convolution, the 1x1
# skip-connection convolutions, softmax). Defaults that name nothing in a given architecture are skipped.
DEFAULT_KEEP_FLOAT = {
    # The down-samplers (stride-2 convs on the residual stream) and the transformers' proj_in/proj_out
    # cost static int8 Conv the most accuracy at early timesteps: measured on the v1.4 architecture,
    # t=901, UNet output cosine vs fp32 0.9979 with them quantized, 0.9994 kept float, for ~5% of the
    # conv time.
    "unet": ("time_embedding", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut", "*/downsamplers.*",
             "proj_in", "proj_out", "op:Softmax"),
    "text_encoder": ("op:Softmax",),
    "vae_decoder": ("conv_in", "conv_out", "conv_shortcut", "op:Softmax"),
    "vae_encoder": ("conv_in", "conv_out", "conv_shortcut", "op:Softmax"),
}

BUILDER_DIGEST = builder_digest(__file__, "runtime/sd.py", "runtime/schedulers.py")


# ---- the plan: recipe -> stage specs ---------------------------------------------


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def quant_params(q) -> dict:
    """A submodule's quantization settings for the stage digest; keep_float None becomes the defaults."""
    d = q.model_dump(mode="json")
    d.pop("min_cosine"), d.pop("min_snr_db")
    d["keep_float_given"] = q.keep_float is not None
    return d


def plan(recipe: Recipe, project_dir: Path) -> dict[str, StageSpec]:
    """The publishing stage of each variant; each links to its upstream stages."""
    body: SdRecipe = recipe.body
    src = body.source
    params = source_params(recipe, project_dir)
    if src.kind == "random":
        params["tokenizer"] = {**src.random.tokenizer.model_dump(),
                               "corpus_sha256": _sha256_file(project_dir / src.random.tokenizer.train_on)}
    if not body.export.dynamic_size and len(body.validate_.sizes) > 1:
        raise RecipeError(f"{recipe.path}: validate.sizes: export.dynamic_size is false, so give exactly one size")
    spec = spec_factory(recipe, __name__, "sd", BUILDER_DIGEST)
    source = spec("source", None, params, [], doc=f"load {src.kind} Stable Diffusion weights and tokenizer")
    export = spec("export", "fp32", {**body.export.model_dump(mode="json"), "validate": body.validate_.model_dump(mode="json")},
                  [source], doc="export text encoder, UNet, VAE decoder and encoder; parity vs PyTorch")
    runtime = body.runtime.model_dump(mode="json")
    calibrate = None
    if any(v.quantized() for v in body.variants.values()):
        cal = body.calibration
        calibrate = spec("calibrate", None, {**cal.model_dump(mode="json"),
                                             "prompts_sha256": _sha256_file(project_dir / cal.prompts)},
                         [source], doc="UNet/text/VAE inputs along full denoising trajectories of the calibration prompts")
    out: dict[str, StageSpec] = {}
    for name, v in body.variants.items():
        quantized = v.quantized()
        if not quantized:
            out[name] = spec("validate", name, {"runtime": runtime}, [export], True, "record parity and publish")
            continue
        subs = {k: quant_params(getattr(v, k)) for k in SD_SUBMODULES}
        quant = spec("quantize", name, {"submodules": subs}, [export, calibrate],
                     doc=", ".join(f"{k} {q.mode}" for k, q in quantized.items()))
        floors = {"submodules": {k: {"min_cosine": q.min_cosine, "min_snr_db": q.min_snr_db} for k, q in quantized.items()},
                  "min_psnr_db": v.min_psnr_db, "min_ssim": v.min_ssim, "min_clip_score": v.min_clip_score}
        out[name] = spec("validate", name, {"runtime": runtime, "quality": body.quality.model_dump(mode="json"),
                                            "floors": floors}, [quant], True, "measure quality vs fp32 and publish")
    return out


# ---- source -------------------------------------------------------------------------


def read_prompts(path: Path) -> list[str]:
    """Prompts, one a line; blank lines and # comments skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibration prompts file not found (recipe key calibration.prompts)")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise RecipeError(f"{path}: calibration prompts file has no prompts (one a line; # starts a comment)")
    return prompts


def train_clip_tokenizer(corpus: Path, vocab_size: int, out_dir: Path):
    """A CLIP-style byte-level BPE trained on local text, saved as vocab.json + merges.txt (the Hub layout).

    The same normalizer (NFC, whitespace, lower case), pre-tokenizer and `</w>` word ends as CLIP's,
    so transformers' CLIPTokenizer reads the files and tokenizes like CLIPTokenizerFast (checked in
    the export stage).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if not corpus.is_file() or not corpus.read_text().strip():
        raise FileNotFoundError(f"{corpus}: tokenizer corpus is missing or empty; the random source trains its tokenizer on it")
    lines = [line for line in corpus.read_text().splitlines() if line.strip() and not line.startswith("#")]
    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # The trainer numbers the word-final symbols ("a</w>") in hash-map order, which differs from run to run,
    # and breaks ties between equally frequent merges by those numbers: the same corpus gave a different
    # vocab, hence different calibration token ids and int8 ranges (issue 10, 3a). Listed up front, sorted,
    # they get fixed ids (saved as ordinary vocab entries: vocab.json and merges.txt know no special tokens).
    words = [w for line in lines for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line))]
    word_ends = sorted({w[-1] + "</w>" for w in words if w})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, *word_ends], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out_dir))  # vocab.json, merges.txt
    return tok


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def random_pipeline(config: dict, seed: int, tokenizer_dir: Path):
    """A StableDiffusionPipeline with seeded random weights from the four component configs."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    missing = [k for k in ("text_encoder", "unet", "vae", "scheduler") if k not in config]
    if missing:
        raise RecipeError(f"source.random.config: needs text_encoder, unet, vae and scheduler configs (missing {', '.join(missing)})")
    te_cfg = _clean(config["text_encoder"])
    max_len = int(te_cfg.get("max_position_embeddings", 77))
    tok = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=max_len)
    te_cfg.setdefault("vocab_size", len(tok))
    if te_cfg["vocab_size"] < len(tok):
        raise RecipeError(f"source.random.config: text_encoder.vocab_size {te_cfg['vocab_size']} is smaller than the "
                          f"trained tokenizer's {len(tok)} tokens")
    te_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sched_cfg = dict(config["scheduler"])
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "PNDMScheduler"))
    with torch.random.fork_rng():  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg)).eval()
        unet = UNet2DConditionModel.from_config(_clean(config["unet"])).eval()
        vae = AutoencoderKL.from_config(_clean(config["vae"])).eval()
    check_architecture(text_encoder.config, unet.config, vae.config)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=sched_cls.from_config(_clean(sched_cfg)), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def check_architecture(te, unet, vae) -> None:
    """The sizes the components pass each other agree (a random config can get them wrong)."""
    if unet.cross_attention_dim != te.hidden_size:
        raise RecipeError(f"source.random.config: unet.cross_attention_dim ({unet.cross_attention_dim}) must equal "
                          f"text_encoder.hidden_size ({te.hidden_size})")
    if not unet.in_channels == unet.out_channels == vae.latent_channels:
        raise RecipeError(f"source.random.config: unet in/out channels ({unet.in_channels}/{unet.out_channels}) must "
                          f"equal vae.latent_channels ({vae.latent_channels})")


def _check_layout(folder: Path) -> None:
    missing = [f for f in LAYOUT if not (folder / f).is_file()]
    missing += [f"{d}/*.safetensors" for d in WEIGHT_FOLDERS
                if not any((folder / d).glob("*.safetensors")) and not any((folder / d).glob("*.bin"))]
    if missing:
        raise SourceError(f"{folder}: not a Stable Diffusion folder laid out like the Hub repo (missing "
                          f"{', '.join(missing)})")


def _path_folder(params: dict, ctx: StageContext) -> Path:
    folder = Path(params["path"])
    folder = folder if folder.is_absolute() else ctx.project_dir / folder
    if not folder.is_dir():
        raise SourceError(f"source.path: {folder} is not a folder; give a local folder laid out like the Hub repo")
    return folder


def weights_digest(folder: Path) -> str:
    from ..sources import weights_sha256

    h = hashlib.sha256()
    for sub in WEIGHT_FOLDERS:
        h.update(sub.encode() + weights_sha256(folder / sub).encode())
    return h.hexdigest()


def source_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    p = spec.params
    if p["kind"] == "random":
        model_dir = out / "model"
        tok_cfg = p["tokenizer"]
        train_clip_tokenizer(ctx.project_dir / tok_cfg["train_on"], tok_cfg["vocab_size"], out / "trained-tokenizer")
        pipe = random_pipeline(p["config"], p["seed"], out / "trained-tokenizer")
        pipe.save_pretrained(model_dir, safe_serialization=True)
        shutil.rmtree(out / "trained-tokenizer")
        del pipe
        gc.collect()
        source = {"kind": "random", "seed": p["seed"], "config": p["config"]}
        rel = "model"
    else:
        if p["kind"] == "hub":
            model_dir, source = existing_model_dir(p, ctx, HUB_FILES)
        else:
            model_dir = _path_folder(p, ctx)
            source = {"kind": "path", "path": str(model_dir)}
        rel = str(model_dir)
    _check_layout(model_dir)
    source["weights_sha256"] = weights_digest(model_dir)
    cfg = {d: json.loads((model_dir / d / "config.json").read_text()) for d in WEIGHT_FOLDERS}
    source["architecture"] = {
        "text_hidden_size": cfg["text_encoder"].get("hidden_size"), "text_layers": cfg["text_encoder"].get("num_hidden_layers"),
        "unet_block_out_channels": cfg["unet"].get("block_out_channels"),
        "cross_attention_dim": cfg["unet"].get("cross_attention_dim"),
        "vae_block_out_channels": cfg["vae"].get("block_out_channels"), "latent_channels": cfg["vae"].get("latent_channels")}
    params = {d: count_parameters(model_dir / d) for d in WEIGHT_FOLDERS}
    return {"model_dir": rel, "source": source, "recorded": {"parameters": params}}


# ---- torch side: submodules as export-ready modules ---------------------------------------


def ort_attention_processor():
    """A diffusers attention processor whose attention exports as onnxruntime's MultiHeadAttention.

    The TorchScript export of scaled_dot_product_attention is MatMul -> Softmax -> MatMul over the full
    score matrix; onnxruntime's MultiHeadAttention (com.microsoft) runs a tiled flash-attention kernel
    on CPU instead (export.fused_attention says why). PyTorch computes the same sdpa as diffusers'
    default processor, so parity checks compare like with like. Covers what SD v1.x's UNet and VAE
    use (self/cross attention, group norm, residual); anything else raises rather than exports wrong.
    """
    MultiHeadAttention = ort_multihead_attention()

    class OrtAttentionProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
            if attention_mask is not None or attn.spatial_norm is not None or attn.norm_cross \
                    or attn.norm_q is not None or attn.norm_k is not None:
                raise NotImplementedError("fused_attention covers plain self/cross attention only; "
                                          "set export.fused_attention: false for this model")
            residual = hidden_states
            image = hidden_states.ndim == 4
            if image:
                b, c, h, w = hidden_states.shape
                hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            out = MultiHeadAttention.apply(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), None,
                                           attn.heads, float(attn.scale))
            out = attn.to_out[1](attn.to_out[0](out))
            if image:
                out = out.transpose(-1, -2).reshape(b, c, h, w)
            if attn.residual_connection:
                out = out + residual
            return out / attn.rescale_output_factor

    return OrtAttentionProcessor()


def load_torch(name: str, model_dir: Path, fused_attention: bool = False):
    """One submodule as a torch module with the ONNX component's flat inputs and outputs.

    fused_attention: UNet/VAE attention through ort_attention_processor (exports MultiHeadAttention).
    """
    import torch

    if name == "text_encoder":
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(model_dir / "text_encoder", attn_implementation="eager").eval()

        class TextEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.text_encoder = te

            def forward(self, input_ids):
                return self.text_encoder(input_ids=input_ids, return_dict=False)[0]

        return TextEncoder().eval()
    if name == "unet":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
        if fused_attention:
            unet.set_attn_processor(ort_attention_processor())

        class Unet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, encoder_hidden_states):
                return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

        return Unet().eval()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    if fused_attention:
        vae.set_attn_processor(ort_attention_processor())
    if name == "vae_decoder":
        class VaeDecoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vae = vae

            def forward(self, latent_sample):
                return self.vae.decode(latent_sample, return_dict=False)[0]

        return VaeDecoder().eval()

    class VaeEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, sample):
            dist = self.vae.encode(sample).latent_dist
            return dist.mean, dist.std

    return VaeEncoder().eval()


def model_info(model_dir: Path) -> dict:
    """The sizes the export, the runtime and the calibration readers need, from the repo's configs."""
    te = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer" / "tokenizer_config.json").read_text()) \
        if (model_dir / "tokenizer" / "tokenizer_config.json").is_file() else {}
    max_length = min(int(tok.get("model_max_length", 77)), int(te.get("max_position_embeddings", 77)))
    n_up = len(unet["block_out_channels"]) - 1  # every block but the last one halves the size
    return {"max_length": max_length, "text_hidden_size": te["hidden_size"], "latent_channels": vae["latent_channels"],
            "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
            "scaling_factor": float(vae.get("scaling_factor", 0.18215)), "unet_up_factor": 2 ** n_up,
            "unet_sample_size": unet.get("sample_size")}


def example_inputs(name: str, info: dict, batch: int, width: int, height: int, token_ids: np.ndarray, seed: int) -> dict:
    """Seeded inputs of the right shapes and ranges for one submodule (numpy)."""
    rng = np.random.default_rng(seed)
    f, c = info["vae_scale_factor"], info["latent_channels"]
    if name == "text_encoder":
        return {"input_ids": np.ascontiguousarray(token_ids[:batch])}
    if name == "unet":
        return {"sample": rng.standard_normal((batch, c, height // f, width // f), dtype=np.float32),
                "timestep": np.asarray([981.0, 421.0][:batch], dtype=np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, info["max_length"], info["text_hidden_size"]),
                                                             dtype=np.float32)}
    if name == "vae_decoder":
        return {"latent_sample": (rng.standard_normal((batch, c, height // f, width // f), dtype=np.float32)
                                  / np.float32(info["scaling_factor"]))}
    return {"sample": rng.uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)}


def dynamic_axes(name: str, batch: bool, size: bool) -> dict:
    b = {0: "batch"} if batch else {}
    latent = {**b, **({2: "latent_height", 3: "latent_width"} if size else {})}
    image = {**b, **({2: "height", 3: "width"} if size else {})}
    return {
        "text_encoder": {"input_ids": b, "last_hidden_state": b},
        "unet": {"sample": latent, "timestep": b, "encoder_hidden_states": b, "noise_pred": latent},
        "vae_decoder": {"latent_sample": latent, "sample": image},
        "vae_encoder": {"sample": image, "latent_mean": latent, "latent_std": latent},
    }[name]


# ---- export ---------------------------------------------------------------------------------


def component_files(folder: Path, onnx_file: str) -> list[Path]:
    """An ONNX file and the external-data files it names."""
    import onnx

    path = folder / onnx_file
    model = onnx.load(str(path), load_external_data=False)
    files = [path]
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and (folder / entry.value) not in files:
                files.append(folder / entry.value)
    return files


def link_component(src_dir: Path, dst_dir: Path, onnx_file: str, copy_data: bool = False) -> None:
    """Hard-link a component's files into another folder; copy_data: copy its external data instead
    (onnx.load refuses external data with several hard links, as a possible hard-link attack)."""
    for i, f in enumerate(component_files(src_dir, onnx_file)):
        if copy_data and i > 0:
            shutil.copyfile(f, dst_dir / f.name)
        else:
            link_or_copy(f, dst_dir / f.name)


def output_shapes(name: str, info: dict, batch: int, width: int, height: int) -> list[list[int]]:
    f, c = info["vae_scale_factor"], info["latent_channels"]
    latent = [batch, c, height // f, width // f]
    return {"text_encoder": [[batch, info["max_length"], info["text_hidden_size"]]], "unet": [latent],
            "vae_decoder": [[batch, 3, height, width]], "vae_encoder": [latent, latent]}[name]


def _fix_output_dims(path: Path, name: str, info: dict, batch: int, width: int, height: int, axes: dict) -> None:
    """Outputs' fixed dims as numbers: the exporter sometimes leaves generated names there
    (e.g. last_hidden_state's 77 as 'LayerNormalizationlast_hidden_state_dim_1')."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external data references stay as they are
    for value, shape in zip(model.graph.output, output_shapes(name, info, batch, width, height)):
        dims = value.type.tensor_type.shape.dim
        for j, d in enumerate(dims):
            if j in axes.get(value.name, {}):
                d.dim_param = axes[value.name][j]
            else:
                d.dim_value = shape[j]
    onnx.save_model(model, str(path))


def export_one(name: str, module, info: dict, out: Path, p: dict, token_ids: np.ndarray) -> None:
    """torch.onnx.export (TorchScript) of one submodule, then saved with one external-data file if needed."""
    import onnx
    import torch

    width, height = p["validate"]["sizes"][0]
    batch = 2 if name in ("text_encoder", "unet") else 1  # CFG batch for the traced example
    if name == "unet" and p["dynamic_size"]:
        # Trace at a latent size that the UNet's up-sampling factor does not divide: diffusers then
        # takes its explicit-size path (upsample to the skip connection's size), which the graph keeps,
        # so any multiple-of-8 picture works, not only multiples of 8 x the up factor.
        f = info["vae_scale_factor"]
        side = (2 * info["unet_up_factor"] + 1) * f
        width = height = side
    fused = p["fused_attention"] and name != "text_encoder"  # CLIP's attention stays as exported
    example = example_inputs(name, info, batch, width, height, token_ids, seed=0)
    args = tuple(torch.from_numpy(v) for v in example.values())
    scratch = out / f".export-{name}"
    scratch.mkdir()
    try:
        with torch.no_grad():
            torch.onnx.export(module, args, str(scratch / "model.onnx"), input_names=IO[name]["inputs"],
                              output_names=IO[name]["outputs"],
                              dynamic_axes=dynamic_axes(name, p["dynamic_batch"], p["dynamic_size"]),
                              opset_version=p["opset"], dynamo=False,
                              custom_opsets=ORT_CUSTOM_OPSETS if fused else None)
        _fix_output_dims(scratch / "model.onnx", name, info, batch, width, height,
                         dynamic_axes(name, p["dynamic_batch"], p["dynamic_size"]))
        n_bytes = sum(f.stat().st_size for f in scratch.iterdir())
        if p["external_data"] == "always" or n_bytes > EXTERNAL_DATA_BYTES:
            model = onnx.load(str(scratch / "model.onnx"))  # gathers the exporter's one-file-per-tensor data
            onnx.save_model(model, str(out / FILES[name]), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=FILES[name] + ".data", size_threshold=1024)
            del model
        else:
            (scratch / "model.onnx").rename(out / FILES[name])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        gc.collect()


def parity(name: str, module, session, info: dict, p: dict, token_ids: np.ndarray) -> dict:
    """Max abs diff ONNX vs PyTorch at every validate size, batch 2 then 1 (one size, one batch if fixed)."""
    import torch

    batches = [2, 1] if p["dynamic_batch"] else [2 if name in ("text_encoder", "unet") else 1]
    sizes = p["validate"]["sizes"] if name != "text_encoder" else p["validate"]["sizes"][:1]
    worst, runs = 0.0, []
    for width, height in sizes:
        for batch in batches:
            inputs = example_inputs(name, info, batch, width, height, token_ids, seed=1 + batch)
            with torch.no_grad():
                ref = module(*(torch.from_numpy(v) for v in inputs.values()))
            ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
            ours = session.run(None, inputs)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref))
            scale = max(float(np.abs(r).max()) for r in ref)
            runs.append({"size": [width, height], "batch": batch, "max_abs_diff": diff, "output_max_abs": scale})
            worst = max(worst, diff)
    return {"max_abs_diff": worst, "runs": runs}


def clip_token_ids(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    return np.asarray(tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"],
                      dtype=np.int64)


def export_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    from ..runtime.sd import ClipTokenizer

    p = spec.params
    model_dir = model_dir_of(ctx, spec, "source")
    info = model_info(model_dir)
    slow = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    token_ids = clip_token_ids(slow, [p["validate"]["prompt"], ""], info["max_length"])

    # Tokenizer: tokenizer.json for the runtime (converted from the repo's vocab.json + merges.txt).
    (out / TOKENIZER_DIR).mkdir()
    fast = CLIPTokenizerFast.from_pretrained(model_dir / "tokenizer")
    fast.backend_tokenizer.save(str(out / TOKENIZER_JSON))
    info.update(bos_id=slow.bos_token_id, eos_id=slow.eos_token_id, pad_id=slow.pad_token_id)
    shutil.copy(model_dir / "scheduler" / "scheduler_config.json", out / SCHEDULER_CONFIG)

    # The runtime's tokenization == CLIPTokenizer's on the validation prompt, the calibration prompts
    # and a prompt longer than the text encoder reads.
    rt_tok = ClipTokenizer(out / TOKENIZER_JSON, info["max_length"], info["bos_id"], info["eos_id"], info["pad_id"])
    texts = [p["validate"]["prompt"], *TOKENIZER_CHECK_TEXTS, " ".join(TOKENIZER_CHECK_TEXTS * 4)]  # the last: > 77 tokens
    mismatches = [t for t in texts if not np.array_equal(rt_tok(t, warn=False)[0][0], clip_token_ids(slow, [t], info["max_length"])[0])]

    parities, sizes = {}, {}
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        module = load_torch(name, model_dir, fused_attention=p["fused_attention"])
        export_one(name, module, info, out, p, token_ids)
        session = make_session(out / FILES[name], low_memory=True)
        parities[name] = parity(name, module, session, info, p, token_ids)
        parities[name]["atol"] = p["validate"]["atol"][name]
        sizes[name] = sum(f.stat().st_size for f in component_files(out, FILES[name]))
        del module, session
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


# ---- calibration --------------------------------------------------------------------------


def diffusers_scheduler(name: str, config):
    """diffusers' scheduler for one of the runtime's names, from a scheduler config (as the runtime does)."""
    import diffusers

    if name == "pndm":
        return diffusers.PNDMScheduler.from_config(config)
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}")


def load_pipeline(model_dir: Path, scheduler: str | None = None):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" in the build log
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    if scheduler:
        pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def collect_calibration(model_dir: Path, prompts: list[str], s: dict, out: Path) -> dict:
    """Run diffusers' pipeline on every prompt and keep what each submodule saw.

    Layout (memory-mappable .npy files, P prompts, S UNet calls per trajectory):
        text_encoder/input_ids.npy            (P, 2, 77) int64: [negative, prompt]
        unet/sample.npy                       (P, S, 2, C, h, w) float32: the scaled model input
        unet/timestep.npy                     (P, S) float32
        unet/encoder_hidden_states.npy        (P, 2, 77, D) float32 (the same at every step)
        vae_decoder/latent_sample.npy         (P, 1, C, h, w): final latents / scaling_factor
        vae_encoder/sample.npy                (P, 1, 3, H, W): the decoded pictures in [-1, 1]
    """
    import torch

    pipe = load_pipeline(model_dir, s["scheduler"])
    width, height = s["size"]
    calls: list = []
    text_calls: list = []

    def unet_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        calls.append((sample.detach().float().numpy().copy(), float(t), ehs.detach().float().numpy().copy()))

    def text_hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        text_calls.append(ids.detach().numpy().copy())

    h1 = pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)
    h2 = pipe.text_encoder.register_forward_pre_hook(text_hook, with_kwargs=True)
    rows: dict[str, list] = {k: [] for k in ("ids", "sample", "timestep", "ehs", "latent", "image")}
    try:
        for i, prompt in enumerate(prompts):
            calls.clear()
            text_calls.clear()
            generator = torch.Generator().manual_seed(s["seed"] + i)
            with torch.no_grad():
                latents = pipe(prompt, negative_prompt=s["negative_prompt"], num_inference_steps=s["steps"],
                               guidance_scale=s["guidance_scale"], height=height, width=width, generator=generator,
                               output_type="latent").images
                z = latents / pipe.vae.config.scaling_factor
                image = pipe.vae.decode(z, return_dict=False)[0].clamp(-1, 1)
            if len(text_calls) != 2 or any(c[0].shape[0] != 2 for c in calls):
                raise RuntimeError(f"unexpected pipeline calls: {len(text_calls)} text encoder calls, UNet batches "
                                   f"{sorted({c[0].shape[0] for c in calls})}")
            # diffusers encodes the prompt first, then the negative one; the runtime batches [negative, prompt].
            rows["ids"].append(np.concatenate([text_calls[1], text_calls[0]]))
            rows["sample"].append(np.stack([c[0] for c in calls]))
            rows["timestep"].append(np.asarray([c[1] for c in calls], dtype=np.float32))
            rows["ehs"].append(calls[0][2])
            rows["latent"].append(z.numpy())
            rows["image"].append(image.numpy())
    finally:
        h1.remove()
        h2.remove()
    for comp, key, arr in (("text_encoder", "input_ids", np.stack(rows["ids"]).astype(np.int64)),
                           ("unet", "sample", np.stack(rows["sample"]).astype(np.float32)),
                           ("unet", "timestep", np.stack(rows["timestep"])),
                           ("unet", "encoder_hidden_states", np.stack(rows["ehs"]).astype(np.float32)),
                           ("vae_decoder", "latent_sample", np.stack(rows["latent"]).astype(np.float32)),
                           ("vae_encoder", "sample", np.stack(rows["image"]).astype(np.float32))):
        (out / comp).mkdir(exist_ok=True)
        np.save(out / comp / f"{key}.npy", arr)
    ts = np.stack(rows["timestep"])
    return {"unet_calls_per_prompt": int(ts.shape[1]), "timesteps": [float(t) for t in ts[0]],
            "latent_shape": list(rows["latent"][0].shape), "image_shape": list(rows["image"][0].shape)}


def calibrate_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    """Collect the calibration set once per digest (prompts + source + settings), shared across recipes."""
    import time

    from ..store import write_json_atomic

    s = spec.params
    prompts_path = ctx.project_dir / s["prompts"]
    prompts = read_prompts(prompts_path)
    if s["max_prompts"]:
        prompts = prompts[:s["max_prompts"]]
    if len(prompts) <= s["held_out"]:
        raise RecipeError(f"{prompts_path}: {len(prompts)} prompt(s), but calibration.held_out is {s['held_out']}: "
                          f"need at least {s['held_out'] + 1}")
    shared = ctx.root / ".calibration" / f"sd-{spec.digest}"
    reused = (shared / "calibration.json").is_file()
    started = time.perf_counter()
    if not reused:
        clean_stale_tmp(shared.parent)
        model_dir = model_dir_of(ctx, spec, "source")
        with atomic_dir(shared) as tmp:
            summary = collect_calibration(model_dir, prompts, s, tmp)
            n = len(prompts)
            meta = {"digest": spec.digest, "prompts": prompts, "calibrate": list(range(n - s["held_out"])),
                    "held_out": list(range(n - s["held_out"], n)), "settings": s, **summary}
            write_json_atomic(tmp / "calibration.json", meta)  # last: its presence means complete
    for f in sorted(shared.rglob("*")):
        if f.is_file():
            link_or_copy(f, out / f.relative_to(shared))
    meta = json.loads((out / "calibration.json").read_text())
    return {"shared_cache": str(shared), "reused": reused,
            "recorded": {"calibration_digest": spec.digest, "reused_cache": reused, "prompts": len(meta["prompts"]),
                         "held_out": len(meta["held_out"]), "unet_calls_per_prompt": meta["unet_calls_per_prompt"],
                         "seconds": round(time.perf_counter() - started, 1)}}


def calibration_reader(calib_dir: Path, name: str, split: str = "calibrate", unet_batch: int = 2):
    """An onnxruntime CalibrationDataReader over one submodule's calibration inputs.

    split: "calibrate" (the prompts used for ranges) or "held_out" (for quality). For the UNet each
    item is one denoising step of one prompt, every step of every trajectory in order (early, middle
    and late timesteps all appear), as [negative, prompt] (unet_batch 2) or each half alone (1).
    """
    from ..quantize import ArrayReader

    meta = json.loads((calib_dir / "calibration.json").read_text())
    if split not in ("calibrate", "held_out"):
        raise ValueError(f"split must be 'calibrate' or 'held_out', got {split!r}")
    prompts = meta[split]
    arrays = {f.stem: np.load(f, mmap_mode="r") for f in sorted((calib_dir / name).glob("*.npy"))}
    if name == "unet":
        steps = int(meta["unet_calls_per_prompt"])
        halves = 2 if unet_batch == 1 else 1

        def item(i):
            p, rest = divmod(i, steps * halves)
            s, half = divmod(rest, halves)
            row = prompts[p]
            sl = slice(None) if halves == 1 else slice(half, half + 1)
            sample = np.ascontiguousarray(arrays["sample"][row, s][sl])
            return {"sample": sample,
                    "timestep": np.full(sample.shape[0], arrays["timestep"][row, s], dtype=np.float32),
                    "encoder_hidden_states": np.ascontiguousarray(arrays["encoder_hidden_states"][row][sl])}

        return ArrayReader(len(prompts) * steps * halves, item, tuple(IO[name]["inputs"]))
    key = IO[name]["inputs"][0]

    def item(i):
        return {key: np.ascontiguousarray(arrays[key][prompts[i]])}

    return ArrayReader(len(prompts), item, (key,))


# ---- quantize --------------------------------------------------------------------------------


def quantize_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    from ..quantize import activation_matmuls, dynamic_int8, resolve_keep_float, static_int8

    export_dir = ctx.upstream_dir(spec, "export")
    calib_dir = ctx.upstream_dir(spec, "calibrate")
    calib_settings = ctx.upstream_record(spec, "calibrate")["params"]
    records = {}
    work = out / ".work"
    work.mkdir()
    try:
        for name in SD_SUBMODULES:
            q = spec.params["submodules"][name]
            fp32_bytes = sum(f.stat().st_size for f in component_files(export_dir, FILES[name]))
            if q["mode"] == "float":
                link_component(export_dir, out, FILES[name])
                records[name] = {"mode": "float", "bytes": fp32_bytes}
                continue
            # Quantize from links in a scratch folder: onnxruntime writes temporary files beside its input.
            link_component(export_dir, work, FILES[name], copy_data=True)
            src = work / FILES[name]
            patterns = q["keep_float"] if q["keep_float_given"] else DEFAULT_KEEP_FLOAT[name]
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
                reader = calibration_reader(calib_dir, name, "calibrate", calib_settings["unet_batch"])
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
            rec["bytes"] = sum(f.stat().st_size for f in component_files(out, FILES[name]))
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


# ---- validate + publish --------------------------------------------------------------------


def runtime_block(info: dict, scheduler_config: dict, p: dict, fixed_size) -> dict:
    """What the runtime needs, from the model's configs and the recipe: it never imports torch or diffusers."""
    from ..runtime.schedulers import SCHEDULER_NAMES

    r = p["runtime"]
    f = info["vae_scale_factor"]
    return {
        "kind": "sd",
        "tokenizer": TOKENIZER_JSON,
        "max_length": info["max_length"], "bos_id": info["bos_id"], "eos_id": info["eos_id"], "pad_id": info["pad_id"],
        "scheduler_config": scheduler_config,
        "scheduler": r["scheduler"], "schedulers": list(SCHEDULER_NAMES),
        "steps": r["steps"], "max_steps": r["max_steps"], "guidance_scale": r["guidance_scale"],
        "width": r["size"][0], "height": r["size"][1], "min_size": r["min_size"], "max_size": r["max_size"],
        "size_multiple": f * 8 // math.gcd(f, 8), "fixed_size": fixed_size,
        "vae_scale_factor": f, "scaling_factor": info["scaling_factor"], "latent_channels": info["latent_channels"],
        "text_hidden_size": info["text_hidden_size"],
        "io": IO,
    }


def _link_common(src: Path, out: Path) -> None:
    for f in (src / TOKENIZER_DIR).iterdir():
        link_or_copy(f, out / TOKENIZER_DIR / f.name)
    link_or_copy(src / SCHEDULER_CONFIG, out / SCHEDULER_CONFIG)


def _fail_on(checks: list, results: dict) -> None:
    failed = [c for c in checks if not c["passed"]]
    results["passed"] = not failed
    if failed:
        detail = "; ".join(f"{c['check']}: {c['value']} (limit {c['limit']})" for c in failed)
        raise ValidationFailed(f"failed, nothing published: {detail}")


def _num(x: float, digits: int = 5):
    """A JSON-safe rounded number (identical outputs give an infinite SNR/PSNR: recorded as 'inf')."""
    return round(x, digits) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def submodule_quality(name: str, fp32_path: Path, quant_path: Path, calib_dir: Path, max_items: int) -> dict:
    """Cosine and SNR of the quantized submodule's outputs vs fp32 on held-out calibration inputs."""
    from ..quantize import cosine, snr_db

    reader = calibration_reader(calib_dir, name, "held_out", unet_batch=2)
    n = len(reader)
    picks = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(max_items, n))})
    # One model at a time (the full-size fp32 and int8 UNets together would need both in memory).
    outputs = {}
    for which, path in (("fp32", fp32_path), ("quant", quant_path)):
        session = make_session(path, low_memory=True)
        outputs[which] = [np.concatenate([o.ravel() for o in session.run(None, reader.item(i))]) for i in picks]
        del session
        gc.collect()
    cos = [cosine(a, b) for a, b in zip(outputs["fp32"], outputs["quant"])]
    snr = [snr_db(a, b) for a, b in zip(outputs["fp32"], outputs["quant"])]
    timesteps = [float(reader.item(i)["timestep"][0]) for i in picks] if name == "unet" else []
    out = {"inputs": len(picks), "cosine_mean": _num(float(np.mean(cos)), 6), "cosine_min": _num(float(np.min(cos)), 6),
           "snr_db_mean": _num(float(np.mean(snr)), 3), "snr_db_min": _num(float(np.min(snr)), 3),
           "_cosine": float(np.mean(cos)), "_snr": float(np.mean(snr))}
    if timesteps:
        out["timesteps"] = timesteps
        out["cosine_by_timestep"] = [_num(c, 6) for c in cos]
    return out


def clip_scores(model_ref: str | None, images: list, prompts: list[str], project_dir: Path) -> tuple[list | None, str]:
    """CLIP score (100 x cosine of image and text embeddings, >= 0) with a local CLIP model, or (None, why not)."""
    if not model_ref:
        return None, "skipped: no quality.clip_model in the recipe"
    folder = Path(model_ref) if Path(model_ref).is_absolute() else project_dir / model_ref
    try:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        where = str(folder) if folder.is_dir() else model_ref
        model = CLIPModel.from_pretrained(where, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as exc:
        return None, (f"skipped: CLIP model {model_ref!r} is not available locally ({type(exc).__name__}); put it in "
                      f"the Hugging Face cache (`huggingface-cli download {model_ref}`) or name a local folder "
                      f"in quality.clip_model")
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        scores = (100 * (img * txt).sum(-1)).clamp(min=0)
    return [round(float(s), 3) for s in scores], f"computed with {model_ref}"


def validate_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    from ..quantize import psnr, ssim
    from ..runtime.sd import StableDiffusion

    p = spec.params
    export_dir = ctx.upstream_dir(spec, "export")
    export_rec = ctx.upstream_record(spec, "export")
    quantized = "quality" in p
    producer = ctx.upstream_dir(spec, "quantize") if quantized else export_dir
    for name in SD_SUBMODULES:
        link_component(producer, out, FILES[name])
    (out / TOKENIZER_DIR).mkdir()
    _link_common(export_dir, out)
    info = export_rec["info"]
    fixed = None if export_rec["params"]["dynamic_size"] else list(export_rec["params"]["validate"]["sizes"][0])
    runtime = runtime_block(info, json.loads((export_dir / SCHEDULER_CONFIG).read_text()), p, fixed)
    checks: list[dict] = []
    results: dict = {"checks": checks}

    if not quantized:
        for name, r in export_rec["parity"].items():
            record_check(checks, f"{name} max abs diff vs PyTorch", r["max_abs_diff"], r["atol"], r["max_abs_diff"] <= r["atol"])
        results["parity"] = export_rec["parity"]
        record_check(checks, "runtime tokenization == CLIPTokenizer", export_rec["recorded"]["tokenizer_texts_checked"],
                     "all texts", True)
        _fail_on(checks, results)
        return {"components": FILES, "validation": results, "runtime": runtime}

    calib_dir = ctx.upstream_dir(spec, "calibrate")
    q = p["quality"]
    floors = p["floors"]
    quant_rec = ctx.upstream_record(spec, "quantize")["submodules"]
    results["submodules"] = {}
    for name, fl in floors["submodules"].items():
        r = submodule_quality(name, export_dir / FILES[name], out / FILES[name], calib_dir, q["submodule_items"])
        cos, snr = r.pop("_cosine"), r.pop("_snr")
        results["submodules"][name] = {"mode": quant_rec[name]["mode"], **r}
        if fl["min_cosine"] is not None:
            record_check(checks, f"{name} output cosine vs fp32 (mean, held-out inputs)", _num(cos, 6), fl["min_cosine"],
                         cos >= fl["min_cosine"])
        if fl["min_snr_db"] is not None:
            record_check(checks, f"{name} output SNR dB vs fp32 (mean, held-out inputs)", _num(snr, 3), fl["min_snr_db"],
                         snr >= fl["min_snr_db"])

    # Whole pictures: the fp32 pipeline and this variant, same held-out prompts, seeds and settings.
    meta = json.loads((calib_dir / "calibration.json").read_text())
    prompts = [meta["prompts"][i] for i in meta["held_out"]][:q["images"]]
    width, height = fixed or q["size"]
    label = {"recipe": spec.recipe, "variant": spec.variant}
    fp32 = StableDiffusion.from_folder(export_dir, runtime, FILES, low_memory=True, label={**label, "variant": "fp32"})
    ours = StableDiffusion.from_folder(out, runtime, FILES, low_memory=True, label=label)
    settings = dict(steps=q["steps"], guidance_scale=q["guidance_scale"], scheduler=q["scheduler"], width=width, height=height)
    (out / "quality").mkdir()
    images, per_image = {"fp32": [], "variant": []}, []
    for i, prompt in enumerate(prompts):
        a = fp32.generate(prompt, seed=q["seed"] + i, **settings)
        b = ours.generate(prompt, seed=q["seed"] + i, **settings)
        images["fp32"].append(a.image)
        images["variant"].append(b.image)
        ra, rb = np.asarray(a.image), np.asarray(b.image)
        per_image.append({"prompt": prompt, "seed": q["seed"] + i, "psnr_db": psnr(ra, rb), "ssim": ssim(ra, rb)})
        b.save(out / "quality" / f"{i}-{spec.variant}.png")
        a.save(out / "quality" / f"{i}-fp32.png")
    mean_psnr = float(np.mean([r["psnr_db"] for r in per_image]))
    mean_ssim = float(np.mean([r["ssim"] for r in per_image]))
    results["images"] = {"settings": {**settings, "seed": q["seed"]}, "psnr_db_mean": _num(mean_psnr, 3),
                         "ssim_mean": _num(mean_ssim, 5),
                         "per_image": [{**r, "psnr_db": _num(r["psnr_db"], 3), "ssim": _num(r["ssim"], 5)} for r in per_image],
                         "files": sorted(str(f.relative_to(out)) for f in (out / "quality").iterdir())}
    if floors["min_psnr_db"] is not None:
        record_check(checks, "image PSNR dB vs fp32 pipeline (mean)", _num(mean_psnr, 3), floors["min_psnr_db"],
                     mean_psnr >= floors["min_psnr_db"])
    if floors["min_ssim"] is not None:
        record_check(checks, "image SSIM vs fp32 pipeline (mean)", _num(mean_ssim, 5), floors["min_ssim"],
                     mean_ssim >= floors["min_ssim"])

    scores_fp32, note = clip_scores(q["clip_model"], images["fp32"], prompts, ctx.project_dir)
    clip = {"note": note}
    if scores_fp32 is not None:
        scores, _ = clip_scores(q["clip_model"], images["variant"], prompts, ctx.project_dir)
        clip.update(fp32=scores_fp32, variant=scores, variant_mean=round(float(np.mean(scores)), 3),
                    fp32_mean=round(float(np.mean(scores_fp32)), 3))
        if floors["min_clip_score"] is not None:
            record_check(checks, "CLIP score (mean)", clip["variant_mean"], floors["min_clip_score"],
                         clip["variant_mean"] >= floors["min_clip_score"])
    elif floors["min_clip_score"] is not None:
        clip["floor"] = f"min_clip_score {floors['min_clip_score']} not checked: no CLIP model"
    results["clip_score"] = clip
    _fail_on(checks, results)
    return {"components": FILES, "validation": results, "runtime": runtime}
