"""GPT-2: source, prune, export, quantize and validate stages, and the recipe's plan.

Variants:
    base     one decoder without cache (the whole sequence every step)
    kv       one merged decoder with past key/values (an empty past for the prompt)
    pruned   attention heads and MLP channels removed at a recipe-set ratio, with cache
    kv-int8  the kv decoder with onnxruntime dynamic int8 MatMuls

Each artifact also carries the config, generation config and tokenizer files transformers reads (HF_FILES), so
optimum's ORTModelForCausalLM opens its version folder as it is (the graphs use optimum's IO names).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np

from ...config import Recipe
from ...runtime.artifact import make_session
from ...runtime.text import CausalLM
from ...sources import pocket_training_source, weights_sha256
from ...store import StageContext, StageParams, StageSpec, ValidationFailed, link_or_copy
from ..common import (SourceParams, builder_digest, count_parameters, existing_model_dir, fail_on, model_dir_of,
                      name_dims, publish_spec, record_check, sha256_or_missing, source_params, spec_factory)
from .recipe import Gpt2Recipe

EOS = "<|endoftext|>"
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]
TOKENIZER = "tokenizer.json"
# What transformers reads beside the ONNX file, so optimum's ORTModelForCausalLM.from_pretrained(version folder)
# opens an artifact as it is (README "Use the artifacts elsewhere"); published and hashed like every file.
HF_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")
RUNTIME_KIND = "causal-lm"
# How a pocket-world line begins (train sources): the pocket recipe's runtime prompt_template is the same.
WORLD_PROMPT = "draw {word}:"


BUILDER_DIGEST = builder_digest(__file__, "runtime/text.py")

# What each variant's validate stage checks (named in its parameters, never deduced from the variant name).
CHECKS = {"base": ("parity",), "kv": ("parity", "cache"), "pruned": ("parity", "cache", "perplexity"),
          "kv-int8": ("vs_fp32",)}


# ---- the plan: recipe -> typed stage parameters ---------------------------------


class Gpt2SourceParams(SourceParams):
    train_steps: int = 0  # random: a short training on the tokenizer corpus; train: the whole training
    tokenizer: dict | None = None  # random: the trained BPE's settings and its corpus digest
    world: dict | None = None  # train: the pocket world (WorldSpec) and how many lines to learn from
    learning_rate: float | None = None  # train: the one-cycle schedule's peak


class PruneParams(StageParams):
    ratio: float  # fraction of heads and MLP channels removed per layer


class ExportParams(StageParams):
    opset: int
    with_past: bool  # one merged decoder with past key/values in and present out


class QuantizeParams(StageParams):
    op_types: tuple[str, ...]
    per_channel: bool
    reduce_range: bool
    weight_type: str = "QInt8"
    quantize_lm_head: bool  # the tied lm_head (transposed embedding) in int8 too
    fuse: bool  # onnxruntime's transformer optimizer (FastGelu, SkipLayerNorm) first


class ValidateParams(StageParams):
    checks: tuple[Literal["parity", "cache", "perplexity", "vs_fp32", "world_captions"], ...]
    logits_atol: float
    greedy_tokens: int
    greedy_prompt: str
    eval_text: str
    eval_text_sha256: str
    eval_window: int
    max_perplexity_ratio: float | None = None  # perplexity
    min_top1_agreement: float | None = None  # vs_fp32
    min_logit_cosine: float | None = None  # vs_fp32
    world: dict | None = None  # world_captions: the world the source was trained on
    world_samples_per_word: int = 4
    min_world_caption_score: float | None = None



def plan(recipe: Recipe, project_dir: Path) -> dict[str, StageSpec]:
    """The publishing stage of each variant; each links to its upstream stages."""
    body: Gpt2Recipe = recipe.body
    src = body.source
    extra, world_check = {}, {}
    if src.kind == "random":
        corpus = project_dir / src.random.tokenizer.train_on
        extra = {"train_steps": src.random.train_steps,
                 "tokenizer": {**src.random.tokenizer.model_dump(), "corpus_sha256": sha256_or_missing(corpus)}}
    elif src.kind == "train":
        t = src.train
        world = {**t.world.model_dump(), "examples": t.examples}
        extra = {"train_steps": t.steps, "tokenizer": {"vocab_size": t.vocab_size}, "world": world,
                 "learning_rate": t.learning_rate}
        # Parity, perplexity and int8 agreement are measured on held-out world lines (the next seed).
        world_check = {"world": {**world, "eval_seed": t.seed + 1}, "world_samples_per_word": body.validate_.world_samples_per_word,
                       "min_world_caption_score": body.validate_.min_world_caption_score}
    elif src.kind == "path":  # committed pocket weights: held to the oracle of the world they were trained on
        trained = pocket_training_source(project_dir, src.path)
        if trained.get("world"):
            world_check = {"world": {**trained["world"], "eval_seed": trained["seed"] + 1},
                           "world_samples_per_word": body.validate_.world_samples_per_word,
                           "min_world_caption_score": body.validate_.min_world_caption_score}
    spec = spec_factory(recipe, BUILDER_DIGEST)
    source = spec("source", None, Gpt2SourceParams(**source_params(recipe, project_dir), **extra), [],
                  doc=f"load {src.kind} weights and tokenizer")
    validate_common = {**body.validate_.model_dump(exclude={"world_samples_per_word", "min_world_caption_score"}),
                       "eval_text_sha256": sha256_or_missing(project_dir / body.validate_.eval_text), **world_check}
    opset = body.export.opset
    kv_export = spec("export", "kv", ExportParams(opset=opset, with_past=True), [source], doc="export decoder with KV cache")
    validates: dict[str, StageSpec] = {}
    for name, cfg in body.variants.enabled().items():
        # A model trained on the pocket world is also held to the world's caption oracle.
        checks = CHECKS[name] + (("world_captions",) if world_check else ())
        if name == "base":
            export = spec("export", name, ExportParams(opset=opset, with_past=False), [source],
                          doc="export decoder without cache")
            validates[name] = spec("validate", name, ValidateParams(**validate_common, checks=checks), [export],
                                   "check vs PyTorch")
        elif name == "kv":
            validates[name] = spec("validate", name, ValidateParams(**validate_common, checks=checks), [kv_export],
                                   "check vs PyTorch")
        elif name == "pruned":
            prune = spec("prune", name, PruneParams(ratio=cfg.ratio), [source],
                         doc=f"prune heads and MLP channels by {cfg.ratio:.0%}")
            export = spec("export", name, ExportParams(opset=opset, with_past=True), [prune],
                          doc="export pruned decoder with KV cache")
            validates[name] = spec("validate", name, ValidateParams(**validate_common, checks=checks,
                                                                    max_perplexity_ratio=cfg.max_perplexity_ratio),
                                   [export, source], "check vs PyTorch, measure perplexity")
        elif name == "kv-int8":
            quant = spec("quantize", name, QuantizeParams(op_types=cfg.op_types, per_channel=cfg.per_channel,
                                                          reduce_range=cfg.reduce_range,
                                                          quantize_lm_head=cfg.quantize_lm_head, fuse=cfg.fuse),
                         [kv_export], doc="dynamic int8 of the MatMul weights")
            validates[name] = spec("validate", name, ValidateParams(**validate_common, checks=checks,
                                                                    min_top1_agreement=cfg.min_top1_agreement,
                                                                    min_logit_cosine=cfg.min_logit_cosine),
                                   [quant], "compare with fp32")
    return {name: publish_spec(spec, name, v, body.runtime.model_dump()) for name, v in validates.items()}


# ---- source -------------------------------------------------------------------


def train_tokenizer(corpus: Path, vocab_size: int):
    """A byte-level BPE like GPT-2's, trained on local text (no GPT-2 vocab ships offline)."""
    from tokenizers import ByteLevelBPETokenizer

    if not corpus.is_file() or not corpus.read_text().strip():
        raise FileNotFoundError(f"{corpus}: tokenizer corpus is missing or empty; the random source trains its tokenizer on it")
    tok = ByteLevelBPETokenizer()
    tok.train([str(corpus)], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return tok


def random_gpt2(config: dict, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng():  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**config))
    return model.eval()


def train_briefly(model, token_ids: list[int], steps: int, seed: int, window: int = 64, batch: int = 16):
    """A few optimizer steps on the corpus so a tiny model writes word-like text.

    Not a quality claim: it gives the offline demo readable output and pruning
    a perplexity cost worth measuring.
    """
    import torch
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    data = torch.tensor(token_ids, dtype=torch.long)
    window = min(window, len(data) - 1, model.config.n_positions)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    # Dropout draws from the global RNG: seed it too, or the same recipe gives other weights.
    # One thread: as fast for a tiny model, the same floats on any machine, and
    # no OpenMP spin-waiting (20x slower) when another process holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in tqdm(range(steps), desc="train tiny model", unit="step", leave=False, disable=None):
            starts = torch.randint(0, len(data) - window - 1, (batch,), generator=gen)
            x = torch.stack([data[s:s + window] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    model.eval()
    return loss.item()


def train_on_lines(model, lines: list[list[int]], steps: int, seed: int, pad_id: int, lr: float,
                   batch: int = 32) -> float:
    """Train on whole lines (each one example, padded, padding left out of the loss), with a one-cycle
    learning rate. Line-aligned batches put the word at the same place in every example, so the model
    learns to use it several times faster than from windows cut anywhere in the text (measured on the pocket
    world: 0.96 of captions right after 2000 steps against 0.92 after 2500)."""
    import torch
    from tqdm import tqdm

    width = max(map(len, lines))
    ids = torch.full((len(lines), width), pad_id, dtype=torch.long)
    labels = torch.full((len(lines), width), -100, dtype=torch.long)
    for row, line in enumerate(lines):
        ids[row, :len(line)] = labels[row, :len(line)] = torch.tensor(line)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train_briefly: the same floats on any machine
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in tqdm(range(steps), desc="train pocket model", unit="step", leave=False, disable=None):
            pick = torch.randint(0, len(lines), (batch,), generator=gen)
            loss = model(input_ids=ids[pick], labels=labels[pick]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    torch.set_num_threads(threads)
    model.eval()
    return loss.item()


def save_tokenizer(model_dir: Path, out_file: Path) -> None:
    """Copy the repo's tokenizer.json, or build one from vocab.json + merges.txt."""
    if (model_dir / TOKENIZER).is_file():
        link_or_copy(model_dir / TOKENIZER, out_file)
        return
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        from tokenizers import ByteLevelBPETokenizer

        ByteLevelBPETokenizer(str(model_dir / "vocab.json"), str(model_dir / "merges.txt")).save(str(out_file))
        return
    raise FileNotFoundError(f"{model_dir}: no tokenizer.json (or vocab.json + merges.txt) in the model folder")


def save_hf_files(model_dir: Path, out: Path) -> None:
    """config.json and generation_config.json of the exported model (a pruned model's config names its pruned
    heads and MLP width), and the tokenizer_config.json + special_tokens_map.json transformers' GPT2TokenizerFast
    writes for our tokenizer.json (which stays the file the runtime reads, byte for byte)."""
    import shutil
    import tempfile

    from transformers import AutoConfig, GenerationConfig, GPT2TokenizerFast

    shutil.copyfile(model_dir / "config.json", out / "config.json")
    if (model_dir / "generation_config.json").is_file():
        shutil.copyfile(model_dir / "generation_config.json", out / "generation_config.json")
    else:  # a local folder without one: what transformers would derive from the config
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out)
    context = json.loads((model_dir / "config.json").read_text())["n_positions"]
    tok = GPT2TokenizerFast(tokenizer_file=str(out / TOKENIZER), model_max_length=context)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        tok.save_pretrained(scratch)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(Path(scratch) / name, out / name)


def world_lines(world: dict, seed: int) -> list[str]:
    """The pocket GPT-2's training text: `word: caption` lines, the word a colour or shape of the caption."""
    from ...world import WorldConfig, dataset

    spec = {k: v for k, v in world.items() if k not in ("examples", "eval_seed") and v is not None}
    rng = np.random.default_rng(seed)
    lines = []
    for scene, _, _ in dataset(WorldConfig(**spec), seed, world["examples"]):
        shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
        word = shape.colour if rng.random() < 0.5 else shape.shape
        lines.append(WORLD_PROMPT.format(word=word) + f" {scene.caption}{EOS}")
    return lines


def source_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    p = spec.params
    recorded: dict = {}
    if p.kind == "train":
        # The corpus is a pure function of the world and the seed: written beside the model for the record.
        corpus = out / "world-corpus.txt"
        out.mkdir(parents=True, exist_ok=True)
        corpus.write_text("\n".join(world_lines(p.world, p.seed)) + "\n")
        tok = train_tokenizer(corpus, p.tokenizer["vocab_size"])
        eos = tok.token_to_id(EOS)
        config = {**p.config, "vocab_size": tok.get_vocab_size(), "bos_token_id": eos, "eos_token_id": eos}
        model = random_gpt2(config, p.seed)
        lines = [tok.encode(line).ids for line in corpus.read_text().splitlines()]
        recorded["train_loss"] = round(train_on_lines(model, lines, p.train_steps, p.seed, eos, p.learning_rate), 4)
        model_dir = out / "model"
        model.save_pretrained(model_dir)
        tok.save(str(model_dir / TOKENIZER))
        source = {"kind": "train", "seed": p.seed, "config": config, "steps": p.train_steps, "world": p.world}
        rel = "model"
    elif p.kind == "random":
        tok_cfg = p.tokenizer
        corpus = ctx.project_dir / tok_cfg["train_on"]
        tok = train_tokenizer(corpus, tok_cfg["vocab_size"])
        config = dict(p.config)
        if "vocab_size" not in config:  # a tiny model takes its vocab from the tokenizer
            eos = tok.token_to_id(EOS)
            config.update(vocab_size=tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos)
        model = random_gpt2(config, p.seed)
        if p.train_steps:
            ids = tok.encode(corpus.read_text()).ids
            recorded["train_loss"] = round(train_briefly(model, ids, p.train_steps, p.seed), 4)
        model_dir = out / "model"
        model.save_pretrained(model_dir)
        tok.save(str(model_dir / TOKENIZER))
        source = {"kind": "random", "seed": p.seed, "config": config}
        rel = "model"
    else:
        model_dir, source = existing_model_dir(p, ctx, HUB_FILES)
        rel = str(model_dir)
    source["weights_sha256"] = weights_sha256(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    recorded["parameters"] = count_parameters(model_dir)
    source["architecture"] = {k: config.get(k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    return {"model_dir": rel, "source": source, "recorded": recorded}


def load_torch_model(model_dir: Path, attention: str = "eager"):
    """Eager attention is the parity reference; export uses "sdpa" (see export_gpt2)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation=attention).eval()


# ---- prune ------------------------------------------------------------------


def prune_gpt2(model, ratio: float) -> dict:
    """Remove the lowest-magnitude attention heads and MLP channels, uniformly per layer.

    Why not torch-pruning: on GPT-2 it silently prunes nothing (Conv1D is an
    "unwrapped parameter"), and after Conv1D->Linear it splits the fused q/k/v
    projection along the wrong dimension. transformers' own `prune_heads` and
    `prune_conv1d_layer` do the surgery correctly and record it in the config
    (`pruned_heads`, `n_inner`), so the pruned model saves and reloads.
    Importance is the L2 norm of each group's weights, the criterion
    torch-pruning's MagnitudeImportance uses for a group.
    """
    import torch
    from transformers.pytorch_utils import prune_conv1d_layer

    cfg = model.config
    n_head, d = cfg.n_head, cfg.n_embd
    head_dim = d // n_head
    remove = min(n_head - 1, max(1, round(n_head * ratio)))
    before = sum(p.numel() for p in model.parameters())
    heads_to_prune = {}
    for i, block in enumerate(model.transformer.h):
        w = block.attn.c_attn.weight  # (d, 3d): q | k | v columns
        proj = block.attn.c_proj.weight  # (d, d): rows are head outputs
        scores = []
        for h in range(n_head):
            cols = [slice(part * d + h * head_dim, part * d + (h + 1) * head_dim) for part in range(3)]
            norm = sum(w[:, c].pow(2).sum() for c in cols) + proj[h * head_dim:(h + 1) * head_dim].pow(2).sum()
            scores.append(float(norm))
        heads_to_prune[i] = sorted(int(h) for h in np.argsort(scores)[:remove])
    model.prune_heads(heads_to_prune)

    inner = cfg.n_inner or 4 * d
    keep = inner - max(1, round(inner * ratio))
    for block in model.transformer.h:
        fc, proj = block.mlp.c_fc, block.mlp.c_proj  # fc: (d, inner); proj: (inner, d)
        score = (fc.weight.pow(2).sum(0) + fc.bias.pow(2)) * proj.weight.pow(2).sum(1)
        index = torch.sort(torch.topk(score, keep).indices).values
        block.mlp.c_fc = prune_conv1d_layer(fc, index, dim=1)
        block.mlp.c_proj = prune_conv1d_layer(proj, index, dim=0)
    cfg.n_inner = keep
    after = sum(p.numel() for p in model.parameters())
    return {"parameters_before": before, "parameters_after": after, "heads_removed_per_layer": remove,
            "heads_kept_per_layer": n_head - remove, "mlp_width_before": inner, "mlp_width_after": keep}


def prune_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    import torch

    src_dir = model_dir_of(ctx, spec, "source")
    model = load_torch_model(src_dir)
    recorded = prune_gpt2(model, spec.params.ratio)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    save_tokenizer(src_dir, model_dir / TOKENIZER)
    # Prove the saved model reloads to the same function before anything builds on it.
    reloaded = load_torch_model(model_dir)
    probe = torch.arange(min(16, model.config.n_positions))[None] % model.config.vocab_size
    with torch.no_grad():
        diff = float((reloaded(probe).logits - model(probe).logits).abs().max())
    if diff > 1e-5:
        raise ValidationFailed(f"reloaded pruned model differs from the pruned one (max abs diff {diff:.2e})")
    recorded["reload_max_abs_diff"] = diff
    return {"model_dir": "model", "recorded": recorded}


# ---- export -------------------------------------------------------------------


def _decoder_wrapper(model, with_past: bool):
    import torch
    from transformers.cache_utils import DynamicCache

    n_layer = model.config.n_layer

    class Decoder(torch.nn.Module):
        """Flat tensors in and out, so the ONNX graph has plain named inputs."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past=()):
            if not with_past:
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False).logits
            cache = DynamicCache()
            for i in range(n_layer):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return Decoder()


def export_gpt2(model, path: Path, with_past: bool, opset: int) -> None:
    """torch.onnx.export (dynamo) of one decoder.

    Why not optimum's exporter: it cannot export a head-pruned GPT-2 with past
    (it builds the dummy past from n_head), and one exporter for all variants
    keeps their inputs identical. Why the "sdpa" attention: GPT-2's eager
    attention slices a (n_positions x n_positions) causal buffer per layer,
    which torch.export turns into nested Min/Max shape formulas whose
    simplification never finished for 24 layers; sdpa takes the causal mask
    from the attention mask and exports gpt2-medium in about a minute.
    """
    import onnx
    import torch

    cfg = model.config
    names = ["input_ids", "attention_mask", "position_ids"]
    out_names = ["logits"]
    batch, seq, past_seq = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past_seq")
    # batch 2 in the example, or torch.export specializes batch to 1
    b, s, p = 2, 5, 3 if with_past else 0
    args = [torch.randint(0, cfg.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).expand(b, s).contiguous()]
    dyn = [{0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq}]
    present_shapes = {}  # present.{i}.key/value -> (heads, head_dim): per layer, as pruning may differ
    if with_past:
        past, past_dyn = [], []
        for i, block in enumerate(model.transformer.h):
            heads = block.attn.num_heads
            head_dim = block.attn.head_dim
            for kind in ("key", "value"):
                names.append(f"past_key_values.{i}.{kind}")
                out_names.append(f"present.{i}.{kind}")
                present_shapes[f"present.{i}.{kind}"] = (heads, head_dim)
                past.append(torch.randn(b, heads, p, head_dim))
                past_dyn.append({0: batch, 2: past_seq})
        args.append(tuple(past))
        dyn.append(tuple(past_dyn))
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.8e9
    wrapper = _decoder_wrapper(model, with_past)
    with torch.no_grad():
        torch.onnx.export(wrapper, tuple(args), str(path), input_names=names, output_names=out_names,
                          dynamic_shapes=tuple(dyn), opset_version=opset, dynamo=True, external_data=big,
                          verbose=False)
    # torch.export names derived dims with formulas: give inputs/outputs readable names.
    total = "past_seq + seq" if with_past else "seq"
    readable = {"attention_mask": ["batch", total], "logits": ["batch", "seq", cfg.vocab_size]}
    readable.update({name: ["batch", h, total, d] for name, (h, d) in present_shapes.items()})
    name_dims(path, readable)


def export_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    upstream = "prune" if any(u.stage == "prune" for u in spec.upstream) else "source"
    model_dir = model_dir_of(ctx, spec, upstream)
    model = load_torch_model(model_dir, attention="sdpa")
    export_gpt2(model, out / "model.onnx", spec.params.with_past, spec.params.opset)
    save_tokenizer(model_dir, out / TOKENIZER)
    save_hf_files(model_dir, out)
    return {"model": "model.onnx", "model_dir": str(model_dir)}


# ---- quantize -----------------------------------------------------------------


def materialize_transposed_weights(proto) -> int:
    """Replace Transpose(initializer) nodes by a stored transposed initializer; returns how many.

    The tied lm_head is exported as MatMul(hidden, Transpose(wte)); quantize_dynamic only
    quantizes a MatMul whose weight is an initializer, so it would leave the biggest weight fp32.
    """
    from onnx import numpy_helper

    weights = {init.name: init for init in proto.graph.initializer}
    kept, count = [], 0
    for node in proto.graph.node:
        if node.op_type == "Transpose" and node.input[0] in weights:
            w = numpy_helper.to_array(weights[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), node.output[0]))
            count += 1
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return count


def fuse_for_cpu(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict:
    """onnxruntime.transformers' graph fusions (FastGelu, SkipLayerNormalization).

    model_type "bert", not "gpt2": the gpt2 profile crashes on the dynamo export (STACK-NOTES).
    opt_level 0: only the fusions, no onnxruntime rewrites tied to this machine's CPU.
    The model is handed over as a proto loaded without its external data: the fusions read only small
    constants (kept inline), so the weights stay on disk. `dst` must be in `src`'s folder, where the
    external data's relative locations point; weights still inline in `src` go to `dst`'s own data file.
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError(f"fuse_for_cpu: {dst} must be beside {src} (its external data is named relative to it)")
    proto = onnx.load(str(src), load_external_data=False)
    optimized = optimize_model(proto, model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    optimized.save_model_to_file(str(dst), use_external_data_format=True)
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def quantize_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    """Materialize the lm_head weight, fuse, quantize: each step reads the previous one's file by path.

    Memory (issue 10, item 17): the intermediate models keep their weights in an external-data file in a
    scratch folder, so no step holds more than one copy of the fp32 weights and none serializes the whole
    model into one bytes object (figures: docs/benchmarks/build-memory.md).
    """
    import gc
    import shutil

    import onnx

    from ...quantize import dynamic_int8

    src = ctx.upstream_dir(spec, "export")
    p = spec.params
    recorded = {"fp32_bytes": (src / "model.onnx").stat().st_size}
    work = out / ".work"
    work.mkdir()
    try:
        model = src / "model.onnx"
        if p.quantize_lm_head or p.fuse:  # a copy with external data in the scratch folder
            proto = onnx.load(str(model))
            if p.quantize_lm_head:
                recorded["materialized_weights"] = materialize_transposed_weights(proto)
            model = work / "fp32.onnx"
            # writes each weight out and drops it from the proto: no whole-model serialization
            onnx.save_model(proto, str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="fp32.onnx.data", size_threshold=1024)
            del proto
            gc.collect()
        if p.fuse:
            config = json.loads((model_dir_of(ctx, spec, "export") / "config.json").read_text())
            fused = work / "fused.onnx"
            recorded["fused"] = fuse_for_cpu(model, fused, config["n_head"], config["n_embd"])
            model = fused
            gc.collect()
        dynamic_int8(model, out / "model.onnx", op_types=list(p.op_types),
                     per_channel=p.per_channel, reduce_range=p.reduce_range)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in (TOKENIZER, *HF_FILES):
        link_or_copy(src / name, out / name)
    recorded["int8_bytes"] = (out / "model.onnx").stat().st_size
    return {"model": "model.onnx", "recorded": recorded}


# ---- validate + publish ---------------------------------------------------------


def torch_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from PyTorch without cache: the reference for both ONNX paths."""
    import torch

    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            if len(ids) >= model.config.n_positions:
                break
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def perplexity(model, ids: list[int], window: int) -> float:
    """Token-level perplexity over non-overlapping windows (stride = window)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            nll += float(loss)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def _eval_ids(tokenizer, path: Path, limit: int) -> list[int]:
    if not path.is_file() or not path.read_text().strip():
        raise FileNotFoundError(f"{path}: evaluation text is missing or empty (validate.eval_text in the recipe)")
    return tokenizer.encode(path.read_text()).ids[:limit]


def validate_stage(spec: StageSpec, out: Path, ctx: StageContext) -> dict:
    import torch
    from tokenizers import Tokenizer

    p = spec.params
    checks_to_run = set(p.checks)
    producer = "quantize" if "vs_fp32" in checks_to_run else "export"
    src = ctx.upstream_dir(spec, producer)
    for name in ("model.onnx", TOKENIZER, *HF_FILES):
        link_or_copy(src / name, out / name)
    for extra in src.glob("model.onnx.data"):
        link_or_copy(extra, out / extra.name)

    tokenizer = Tokenizer.from_file(str(out / TOKENIZER))
    export_rec = json.loads(next(u for u in _walk(spec) if u.stage == "export").target(ctx.root).read_text())
    ref_dir = Path(export_rec["model_dir"])
    config = json.loads((ref_dir / "config.json").read_text())
    context = config["n_positions"]
    # low_memory: no onnxruntime arena, which keeps freed buffers and raises peak RSS with no speed gain here
    lm = CausalLM(make_session(out / "model.onnx", low_memory=True), context)
    window = min(p.eval_window, context)
    if p.world:
        held_out = "\n".join(world_lines(p.world, p.world["eval_seed"]))
        eval_ids = tokenizer.encode(held_out).ids[:8 * window]
    else:
        eval_ids = _eval_ids(tokenizer, ctx.project_dir / p.eval_text, 8 * window)
    prompt_ids = tokenizer.encode(p.greedy_prompt).ids
    n = min(p.greedy_tokens, context - len(prompt_ids))
    checks: list[dict] = []
    results: dict = {"checks": checks}

    if "vs_fp32" in checks_to_run:
        fp32 = CausalLM(make_session(ctx.upstream_dir(spec, "export") / "model.onnx", low_memory=True), context)
        agree, cos = [], []
        for start in range(0, len(eval_ids) - 1, window):
            chunk = eval_ids[start:start + window]
            a, b = lm.full_logits(chunk), fp32.full_logits(chunk)
            agree.append(np.mean(a.argmax(-1) == b.argmax(-1)))
            cos.append(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
        top1, cosine = float(np.mean(agree)), float(np.mean(cos))
        record_check(checks, "top1 agreement with fp32 ONNX", round(top1, 5), p.min_top1_agreement, top1 >= p.min_top1_agreement)
        record_check(checks, "mean logit cosine vs fp32 ONNX", round(cosine, 6), p.min_logit_cosine, cosine >= p.min_logit_cosine)
        # Recorded, not required: dynamic int8 picks activation scales per call, so a
        # cached step and a full recompute quantize differently and may diverge.
        int8_tokens, fp32_tokens = lm.greedy(prompt_ids, n), fp32.greedy(prompt_ids, n)
        no_cache = lm.greedy(prompt_ids, n, use_cache=False)
        results["greedy_tokens_matching_fp32"] = f"{sum(x == y for x, y in zip(int8_tokens, fp32_tokens))}/{n}"
        results["greedy_tokens_cache_matching_no_cache"] = f"{sum(x == y for x, y in zip(int8_tokens, no_cache))}/{n}"
    if "parity" in checks_to_run:
        model = load_torch_model(ref_dir)
        with torch.no_grad():
            ref = model(torch.tensor([eval_ids[:window]])).logits[0].numpy()
        got = lm.full_logits(eval_ids[:window])
        diff = float(np.abs(got - ref).max())
        record_check(checks, "logits max abs diff vs PyTorch", diff, p.logits_atol, diff <= p.logits_atol)
        torch_tokens = torch_greedy(model, prompt_ids, n)
        onnx_tokens = lm.greedy(prompt_ids, n, use_cache=True)
        record_check(checks, f"greedy {n} tokens: ONNX == PyTorch", onnx_tokens == torch_tokens, True, onnx_tokens == torch_tokens)
        if "cache" in checks_to_run:
            no_cache = lm.greedy(prompt_ids, n, use_cache=False)
            record_check(checks, f"greedy {n} tokens: cache == no cache", no_cache == onnx_tokens, True, no_cache == onnx_tokens)
        results["greedy_tokens"] = onnx_tokens
        if "perplexity" in checks_to_run:
            unpruned = load_torch_model(model_dir_of(ctx, spec, "source"))
            ppl_pruned, ppl_full = perplexity(model, eval_ids, window), perplexity(unpruned, eval_ids, window)
            ratio = ppl_pruned / ppl_full
            results["perplexity"] = {"pruned": round(ppl_pruned, 3), "unpruned": round(ppl_full, 3),
                                     "ratio": round(ratio, 4), "eval_text": p.eval_text, "tokens": len(eval_ids)}
            limit = p.max_perplexity_ratio
            record_check(checks, "perplexity ratio pruned/unpruned", round(ratio, 4), limit, limit is None or ratio <= limit)

    if "world_captions" in checks_to_run:
        score, samples = world_caption_score(lm, tokenizer, config.get("eos_token_id"), p.world, p.world_samples_per_word)
        results["world_captions"] = {"score": round(score, 4), "samples": samples[:12], "count": len(samples)}
        limit = p.min_world_caption_score
        record_check(checks, "world captions that parse and mention the word", round(score, 4), limit,
                     limit is None or score >= limit)

    results["checks_run"] = sorted(checks_to_run)
    fail_on(checks, results)
    runtime = {  # facts of the model; the recipe's runtime defaults are added when publishing
        "kind": RUNTIME_KIND,
        "tokenizer": TOKENIZER,
        "eos_token_id": config.get("eos_token_id"),
        "context_length": context,
        "vocab_size": config["vocab_size"],
        "has_past": lm.has_past,
    }
    return {"components": {"decoder": "model.onnx"}, "validation": results, "runtime": runtime}


def world_caption_score(lm: CausalLM, tokenizer, eos_id: int, world: dict, per_word: int) -> tuple[float, list]:
    """The pocket-world oracle: for every colour and shape word, `per_word` sampled captions (seeds 0..n-1,
    sampled as the runtime does); the fraction that parse in the world's grammar and mention the word."""
    from ...runtime.text import SamplingSettings, pick_token
    from ...world import COLOURS, SHAPES, caption_mentions, parse_caption

    words = list(world.get("colours") or COLOURS) + list(world.get("shapes") or SHAPES)
    # The runtime's default sampling without the repetition penalty (the pocket recipe's runtime setting:
    # a caption repeats its word).
    settings = SamplingSettings(max_new_tokens=40, repetition_penalty=1.0)
    samples, good = [], 0
    for word in words:
        prompt = tokenizer.encode(WORLD_PROMPT.format(word=word)).ids
        for seed in range(per_word):
            rng, out = np.random.default_rng(seed), []
            stream = lm.decode(prompt)
            logits = next(stream)
            while len(out) < settings.max_new_tokens:
                token = pick_token(logits, prompt + out, settings, rng)
                if token == eos_id:
                    break
                out.append(token)
                try:
                    logits = stream.send(token)
                except StopIteration:
                    break
            caption = tokenizer.decode(out).strip()
            scene = parse_caption(caption)
            ok = scene is not None and caption_mentions(scene, word)
            good += ok
            samples.append({"word": word, "caption": caption, "ok": ok})
    return good / len(samples), samples


def _walk(spec: StageSpec):
    yield spec
    for u in spec.upstream:
        yield from _walk(u)
