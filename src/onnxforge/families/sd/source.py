"""Stable Diffusion source stage: random (seeded tiny or real-size configs, CLIP BPE trained offline), hub or path;
then a recipe's LoRA fused into the UNet (lora.py) and TAESD placed beside the SD VAE (model/taesd)."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path

from ...config import RecipeError
from ...sources import SourceError, hub_snapshot, local_folder, verify_pocket_folder, weights_sha256
from ...store import StageContext, StageSpec
from ..common import count_parameters, existing_model_dir

# Only what the four submodules need: not the 4-7 GB .ckpt files, fp16 copies or the safety checker.
HUB_FILES = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
             "text_encoder/model.safetensors", "tokenizer/*", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
LAYOUT = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json",
          "vae/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt")
WEIGHT_FOLDERS = ("text_encoder", "unet", "vae")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's pre-tokenizer


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
    folder = Path(params.path)
    folder = folder if folder.is_absolute() else ctx.project_dir / folder
    if not folder.is_dir():
        raise SourceError(f"source.path: {folder} is not a folder; give a local folder laid out like the Hub repo")
    verify_pocket_folder(folder)
    return folder


def weights_digest(folder: Path) -> str:
    from ...sources import weights_sha256

    h = hashlib.sha256()
    for sub in WEIGHT_FOLDERS:
        h.update(sub.encode() + weights_sha256(folder / sub).encode())
    return h.hexdigest()


def source_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    from .lora import lora_file

    p = spec.params
    # A hub or path LoRA is found first: a missing one fails before minutes of model building.
    lora_path = lora_file(p.lora, ctx.project_dir) if p.lora and p.lora["kind"] != "random" else None
    if p.kind == "random":
        model_dir = out / "model"
        tok_cfg = p.tokenizer
        train_clip_tokenizer(ctx.project_dir / tok_cfg["train_on"], tok_cfg["vocab_size"], out / "trained-tokenizer")
        pipe = random_pipeline(p.config, p.seed, out / "trained-tokenizer")
        pipe.save_pretrained(model_dir, safe_serialization=True)
        shutil.rmtree(out / "trained-tokenizer")
        del pipe
        gc.collect()
        source = {"kind": "random", "seed": p.seed, "config": p.config}
        rel = "model"
    elif p.kind == "train":
        from .pocket import train_pocket

        model_dir = out / "model"
        training = train_pocket(model_dir, **p.config)
        source = {"kind": "train", "seed": p.seed, "pocket": {"training": training}}
        rel = "model"
    else:
        if p.kind == "hub":
            model_dir, source = existing_model_dir(p, ctx, HUB_FILES)
        else:
            model_dir = _path_folder(p, ctx)
            source = {"kind": "path", "path": str(model_dir)}
            pocket = verify_pocket_folder(model_dir)
            if pocket is not None:  # trained weights committed with their digests (issue 16)
                source["pocket"] = {"command": pocket["command"], "training": pocket["training"]}
        rel = str(model_dir)
    _check_layout(model_dir)
    if p.lora or p.taesd:  # a folder of our own: links to the source's parts, the fused UNet, TAESD
        model_dir, rel = own_model_dir(model_dir, out / "model"), "model"
    if p.lora:
        source["lora"] = fuse_recipe_lora(p.lora, lora_path, model_dir, out)
    if p.taesd:
        source["taesd"] = place_taesd(p.taesd, model_dir, ctx.project_dir)
    source["weights_sha256"] = weights_digest(model_dir)
    cfg = {d: json.loads((model_dir / d / "config.json").read_text()) for d in WEIGHT_FOLDERS}
    source["architecture"] = {
        "text_hidden_size": cfg["text_encoder"].get("hidden_size"), "text_layers": cfg["text_encoder"].get("num_hidden_layers"),
        "unet_block_out_channels": cfg["unet"].get("block_out_channels"),
        "cross_attention_dim": cfg["unet"].get("cross_attention_dim"),
        "vae_block_out_channels": cfg["vae"].get("block_out_channels"), "latent_channels": cfg["vae"].get("latent_channels")}
    params = {d: count_parameters(model_dir / d) for d in WEIGHT_FOLDERS + (("taesd",) if p.taesd else ())}
    return {"model_dir": rel, "source": source, "recorded": {"parameters": params}}


def own_model_dir(src: Path, dest: Path) -> Path:
    """`dest` as the model folder: the source's entries linked in (a random source's folder is already ours)."""
    if src.resolve() == dest.resolve():
        return dest
    dest.mkdir()
    for entry in src.iterdir():
        (dest / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return dest


def fuse_recipe_lora(lora: dict, path: Path | None, model_dir: Path, out: Path) -> dict:
    """Load the UNet, fuse the recipe's LoRA (the file at `path`, or random weights drawn and saved to out/lora
    first), save it in place of the link to the source's UNet. Returns the manifest's record of the LoRA."""
    from diffusers import UNet2DConditionModel

    from .lora import fuse_lora, random_lora

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    record = {k: v for k, v in lora.items()}
    if path is None:
        path = random_lora(unet, lora["rank"], lora["alpha"], lora["target_modules"], lora["seed"], out / "lora")
        record["file"] = str(path.relative_to(out))
    fused = fuse_lora(unet, path, lora["scale"])
    record.update(file_sha256=fused["sha256"], layers_fused=fused["layers"], tensors=fused["tensors"])
    if (model_dir / "unet").is_symlink():
        (model_dir / "unet").unlink()
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    del unet
    gc.collect()
    return record


TAESD_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def place_taesd(taesd: dict, model_dir: Path, project_dir: Path) -> dict:
    """model_dir/taesd: TAESD (diffusers AutoencoderTiny) from the hub, a folder, or seeded random weights."""
    dest = model_dir / "taesd"
    record = dict(taesd)
    if taesd["kind"] == "random":
        import torch
        from diffusers import AutoencoderTiny

        with torch.random.fork_rng():
            torch.manual_seed(taesd["seed"])
            try:
                vae = AutoencoderTiny(**taesd["config"]).eval()
            except TypeError as exc:
                raise RecipeError(f"source.taesd.random.config: {exc}") from None
        vae.save_pretrained(dest, safe_serialization=True)
    else:
        folder = hub_snapshot(taesd["repo"], taesd["revision"], TAESD_FILES) if taesd["kind"] == "hub" \
            else local_folder(taesd["path"], project_dir)
        dest.symlink_to(folder.resolve(), target_is_directory=True)
    cfg = json.loads((dest / "config.json").read_text())
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    factor = cfg.get("upsampling_scaling_factor", 2) ** (len(cfg.get("decoder_block_out_channels", [0] * 4)) - 1)
    sd_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if cfg.get("latent_channels", 4) != unet["in_channels"] or factor != sd_factor:
        raise RecipeError(f"source.taesd: TAESD has {cfg.get('latent_channels', 4)} latent channels and scale {factor}, "
                          f"but the UNet takes {unet['in_channels']} channels and the SD VAE scales by {sd_factor}")
    record.update(weights_sha256=weights_sha256(dest), scaling_factor=float(cfg.get("scaling_factor", 1.0)))
    return record
