"""Recipes: YAML -> typed, frozen config.

Every problem in a recipe becomes one `RecipeError` whose message names the
file, the key path and what is allowed, so a user never reads a pydantic dump.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECIPES_DIR_DEFAULT = Path("recipes")
CONFIGS_DIR = "configs"  # named model configs live in recipes/configs/<name>.json


class RecipeError(ValueError):
    """A recipe that cannot be used, with a one-line reason."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# ---- sources -------------------------------------------------------------


class HubSource(Strict):
    repo: str = Field(min_length=1)
    revision: str = Field(min_length=1, description="a commit sha, so builds are reproducible")


class TrainedTokenizer(Strict):
    """A byte-level BPE trained on local text: only for random-weight models."""

    train_on: str = Field(min_length=1, description="text file, relative to the project root")
    vocab_size: int = Field(ge=260, le=100_000)


class RandomSource(Strict):
    # Either an inline config dict or the name of a config in recipes/configs/.
    config: dict[str, Any] | str
    seed: int = Field(ge=0)
    tokenizer: TrainedTokenizer
    # Optional short training on the tokenizer corpus, so that tiny models write
    # word-like text and pruning has a perplexity cost worth measuring.
    train_steps: int = Field(default=0, ge=0, le=100_000)


class Source(Strict):
    hub: HubSource | None = None
    path: str | None = None
    random: RandomSource | None = None

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in ("hub", "path", "random") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hub, path, random (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("hub", "path", "random") if getattr(self, k) is not None)


# ---- GPT-2 stages and variants --------------------------------------------


class ExportConfig(Strict):
    opset: int = Field(default=18, ge=14, le=23)


class ValidateConfig(Strict):
    logits_atol: float = Field(default=1e-4, gt=0)
    greedy_tokens: int = Field(default=32, ge=1, le=1024)
    greedy_prompt: str = Field(default="The old lighthouse", min_length=1)
    eval_text: str = Field(default="calibration/eval-text.txt")
    eval_window: int = Field(default=128, ge=8)


class RuntimeConfig(Strict):
    prompt_template: str = Field(
        default="A detailed, imaginative painting of {word},",
        description="must contain {word}",
    )

    @model_validator(mode="after")
    def has_word(self):
        if "{word}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {word}")
        return self


class BaseVariant(Strict):
    pass


class KvVariant(Strict):
    pass


class PrunedVariant(Strict):
    ratio: Annotated[float, Field(gt=0.0, le=0.9)] = 0.25
    # Refuse to ship a pruned model whose perplexity grew more than this factor
    # over the unpruned one (None: record only).
    max_perplexity_ratio: float | None = Field(default=None, gt=1.0)


class KvInt8Variant(Strict):
    op_types: tuple[Literal["MatMul", "Gemm"], ...] = ("MatMul", "Gemm")
    per_channel: bool = False
    reduce_range: bool = False
    # GPT-2's output projection is the transposed token embedding (tied): store it int8 too. Decode
    # reads every weight once per token, and this one is 1/7 of gpt2-medium's.
    quantize_lm_head: bool = True
    # Fuse Gelu and residual+LayerNorm (onnxruntime.transformers optimizer) before quantizing: fewer,
    # bigger kernels per decoded token.
    fuse: bool = True
    min_top1_agreement: float = Field(default=0.9, ge=0.0, le=1.0)
    min_logit_cosine: float = Field(default=0.99, ge=-1.0, le=1.0)


class Gpt2Variants(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    base: BaseVariant | None = None
    kv: KvVariant | None = None
    pruned: PrunedVariant | None = None
    kv_int8: KvInt8Variant | None = Field(default=None, alias="kv-int8")

    def enabled(self) -> dict[str, Strict]:
        out = {}
        for field, info in type(self).model_fields.items():
            value = getattr(self, field)
            if value is not None:
                out[info.alias or field] = value
        return out


class Gpt2Recipe(Strict):
    family: Literal["gpt2"]
    description: str = ""
    default: bool = False  # built by a plain `doit build`
    source: Source
    export: ExportConfig = ExportConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    runtime: RuntimeConfig = RuntimeConfig()
    variants: Gpt2Variants

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def some_variant(self):
        if not self.variants.enabled():
            raise ValueError("variants: name at least one of base, kv, pruned, kv-int8")
        return self


# ---- SAM (Segment Anything) stages and variants -----------------------------


class SamRandomSource(Strict):
    """Seeded random SAM weights; SAM has no tokenizer, so this is not `RandomSource`."""

    # SamConfig keyword arguments inline, or the name of a config in recipes/configs/.
    config: dict[str, Any] | str
    seed: int = Field(ge=0)
    # transformers' SamVisionConfig defaults to initializer_range 1e-10, which draws
    # all-zero weights (parity checks would compare zeros): random weights get this
    # spread instead, in every sub-model.
    initializer_range: float = Field(default=0.02, gt=0.0, le=1.0)


class SamSource(Source):
    random: SamRandomSource | None = None


class SamValidateConfig(Strict):
    embeddings_atol: float = Field(default=1e-4, gt=0)
    min_mask_iou: float = Field(default=0.99, ge=0.0, le=1.0, description="ONNX vs PyTorch, every prompt and mask")
    # A synthetic picture of this size (width, height) is segmented with point, box and mixed prompts.
    image: tuple[Annotated[int, Field(ge=2, le=8192)], Annotated[int, Field(ge=2, le=8192)]] = (640, 480)


class SamRuntimeConfig(Strict):
    """Defaults the runtime reads from the manifest (the CLI and API can override them)."""

    mask_threshold: float = 0.0
    points_per_side: int = Field(default=16, ge=1, le=64)
    points_per_batch: int = Field(default=64, ge=1, le=1024)
    # "Segment everything" keeps masks the model rates above pred_iou_threshold and whose
    # shape barely moves when the cut-off moves by stability_offset (<= 0 disables a test).
    pred_iou_threshold: float = Field(default=0.88, le=1.0)
    stability_threshold: float = Field(default=0.95, le=1.0)
    stability_offset: float = Field(default=1.0, gt=0.0)
    nms_threshold: float = Field(default=0.7, gt=0.0, le=1.0)


class SamFp32Variant(Strict):
    pass


class SamInt8Variant(Strict):
    op_types: tuple[Literal["MatMul", "Gemm"], ...] = ("MatMul",)
    per_channel: bool = False
    reduce_range: bool = False
    min_mask_iou: float = Field(default=0.9, ge=0.0, le=1.0, description="int8 vs fp32 ONNX, mean over prompts")
    min_embedding_cosine: float = Field(default=0.99, ge=-1.0, le=1.0)


class SamVariants(Strict):
    fp32: SamFp32Variant | None = None
    int8: SamInt8Variant | None = None

    def enabled(self) -> dict[str, Strict]:
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}


class SamExportConfig(Strict):
    opset: int = Field(default=18, ge=14, le=23)
    # Encoder attention as onnxruntime's MultiHeadAttention with the decomposed relative-position bias
    # as its attention_bias: one kernel for scores + bias + softmax + mixing instead of six ops and as
    # many full-size tensors. Measured on the ViT-B encoder at 1024 px (AVX2): fp32 -12 %, int8 -19 %.
    # false: plain ONNX ops, for other runtimes.
    fused_attention: bool = True


class SamRecipe(Strict):
    family: Literal["sam"]
    description: str = ""
    default: bool = False  # built by a plain `doit build`
    source: SamSource
    export: SamExportConfig = SamExportConfig()
    validate_: SamValidateConfig = Field(default=SamValidateConfig(), alias="validate")
    runtime: SamRuntimeConfig = SamRuntimeConfig()
    variants: SamVariants

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def some_variant(self):
        if not self.variants.enabled():
            raise ValueError("variants: name at least one of fp32, int8")
        return self



# ---- Stable Diffusion: four ONNX submodules, variants chosen per submodule ---------

SD_SUBMODULES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
SD_SCHEDULERS = ("pndm", "ddim", "euler", "dpm++2m")  # runtime/schedulers.py SCHEDULER_NAMES
SdScheduler = Literal["pndm", "ddim", "euler", "dpm++2m"]
ImageSide = Annotated[int, Field(ge=8, le=4096, multiple_of=8)]


class SdTokenizer(Strict):
    """A CLIP-style BPE (lower-cased, `</w>` word ends) trained on local text: only for random weights."""

    train_on: str = Field(min_length=1, description="text file, relative to the project root")
    vocab_size: int = Field(ge=300, le=49408)


class SdRandomSource(Strict):
    # {text_encoder: CLIPTextConfig kwargs, unet: UNet2DConditionModel config, vae: AutoencoderKL
    # config, scheduler: scheduler_config.json} inline, or the name of such a file in recipes/configs/.
    config: dict[str, Any] | str
    seed: int = Field(ge=0)
    tokenizer: SdTokenizer


class SdSource(Source):
    random: SdRandomSource | None = None


class SdExportConfig(Strict):
    opset: int = Field(default=18, ge=14, le=23)
    dynamic_batch: bool = True  # batch is a named dim (CFG runs the UNet at batch 2, plain at 1)
    dynamic_size: bool = True  # height/width are named dims (UNet, VAE); False fixes validate.size
    # auto: external data only where protobuf needs it (>2 GB: the real UNet); always: every component
    # (the tiny recipe uses it so tests cover the external-data path).
    external_data: Literal["auto", "always"] = "auto"
    # UNet and VAE attention as onnxruntime's MultiHeadAttention (com.microsoft), which runs a tiled
    # flash-attention kernel on CPU instead of MatMul -> Softmax -> MatMul over the full score matrix
    # (batch x heads x 4096 x 4096 at 64x64 latents). Measured at 512 px (batch 2, 8 heads, AVX2): 2.5x
    # faster per attention and ~1 GiB less peak memory. false: plain ONNX ops, for other runtimes.
    fused_attention: bool = True


class SdTolerances(Strict):
    """Max abs diff ONNX vs PyTorch per submodule, on seeded inputs."""

    text_encoder: float = Field(default=1e-4, gt=0)
    unet: float = Field(default=1e-4, gt=0)
    vae_decoder: float = Field(default=1e-3, gt=0)
    vae_encoder: float = Field(default=1e-3, gt=0)


class SdValidateConfig(Strict):
    atol: SdTolerances = SdTolerances()
    # Parity runs at every one of these (width, height) image sizes, batch 2 then 1: proves the dynamic dims.
    sizes: tuple[tuple[ImageSide, ImageSide], ...] = Field(default=((64, 64),), min_length=1)
    prompt: str = Field(default="a lighthouse on a rocky cliff at dusk", min_length=1)


class SdCalibrationConfig(Strict):
    """Calibration inputs gathered from full denoising trajectories of real prompts."""

    prompts: str = Field(default="calibration/sd-prompts.txt", description="one prompt per line; # comments")
    max_prompts: int | None = Field(default=None, ge=2, description="use the first N prompts (None: all)")
    held_out: int = Field(default=2, ge=1, description="the last N prompts: quality measurement, never calibration")
    steps: int = Field(default=25, ge=2, le=200)
    guidance_scale: float = Field(default=7.5, gt=1.0, le=50.0)
    scheduler: SdScheduler = "pndm"
    size: tuple[ImageSide, ImageSide] = (512, 512)
    seed: int = Field(default=0, ge=0)
    negative_prompt: str = ""
    # UNet calibration batches: 2 (uncond + cond, as the pipeline runs it) or 1 (each half alone:
    # about half the calibration memory on the full-size UNet).
    unet_batch: Literal[1, 2] = 2

    @model_validator(mode="after")
    def enough_prompts(self):
        if self.max_prompts is not None and self.held_out >= self.max_prompts:
            raise ValueError(f"held_out ({self.held_out}) must be smaller than max_prompts ({self.max_prompts})")
        return self


class SdQualityConfig(Strict):
    """End-to-end comparison of each quantized variant with fp32: same held-out prompts, seed, settings."""

    steps: int = Field(default=25, ge=1, le=200)
    size: tuple[ImageSide, ImageSide] = (512, 512)
    guidance_scale: float = Field(default=7.5, ge=1.0, le=50.0)
    scheduler: SdScheduler = "pndm"
    seed: int = Field(default=0, ge=0)
    images: int = Field(default=2, ge=1, le=64, description="held-out prompts drawn (at most calibration.held_out)")
    # Held-out calibration inputs per quantized submodule for cosine/SNR, evenly spread over the
    # trajectories (for the UNet: early, middle and late timesteps).
    submodule_items: int = Field(default=12, ge=1, le=10_000)
    # A CLIP model (Hub id in the local HF cache, or a local folder) for CLIP score; skipped with a note if absent.
    clip_model: str | None = "openai/clip-vit-base-patch32"


class SdRuntimeConfig(Strict):
    """Defaults the runtime reads from the manifest (the CLI and API can override them)."""

    scheduler: SdScheduler = "pndm"
    steps: int = Field(default=25, ge=1, le=1000)
    max_steps: int = Field(default=200, ge=1, le=1000, description="more steps than this is refused as absurd")
    guidance_scale: float = Field(default=7.5, ge=1.0, le=50.0)
    size: tuple[ImageSide, ImageSide] = (512, 512)
    min_size: ImageSide = 64
    max_size: ImageSide = 1024

    @model_validator(mode="after")
    def consistent(self):
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is larger than max_size {self.max_size}")
        if not all(self.min_size <= s <= self.max_size for s in self.size):
            raise ValueError(f"size {list(self.size)} is outside [min_size, max_size] = [{self.min_size}, {self.max_size}]")
        if self.steps > self.max_steps:
            raise ValueError(f"steps {self.steps} exceeds max_steps {self.max_steps}")
        return self


class SdQuant(Strict):
    """How one submodule of one variant is stored: float, static int8 (QDQ) or dynamic int8."""

    mode: Literal["float", "static", "dynamic"] = "float"
    op_types: tuple[Literal["Conv", "MatMul", "Gemm"], ...] = Field(default=("MatMul",), min_length=1)
    activation_type: Literal["QUInt8", "QInt8"] = "QUInt8"  # static only; u8 is 1.5-3x faster here
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    per_channel: bool = False
    # 7-bit weights. On CPUs without VNNI (AVX2) onnxruntime multiplies u8 x s8 with VPMADDUBSW, whose
    # 16-bit pair sums saturate with 8-bit weights (onnxruntime's quantization docs). Measured on an AVX2
    # EPYC: SD v1.4 UNet dynamic int8 cosine vs fp32 at t=901 0.9954 (8 bit) -> 0.99992 (7 bit), same
    # speed. GPT-2 and SAM lose accuracy with 7 bits instead, so their default stays 8.
    reduce_range: bool = True
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = "MinMax"  # static only
    # Static: quantize only MatMuls with a constant weight (activation x activation MatMuls, i.e.
    # attention scores, stay float: QLinearMatMul there is slower than float on this CPU).
    weight_matmuls_only: bool = True
    # Static only: op types quantized dynamically after the static pass (weights int8, activations
    # quantized on the fly). On an AVX2 CPU static QLinearConv is ~1.8x faster than fp32 Conv, while
    # dynamic int8 MatMul is faster and more accurate than static QLinearMatMul: the UNet takes both.
    # per_channel applies to the static pass; the dynamic one keeps per-tensor weights (as mode dynamic).
    dynamic_op_types: tuple[Literal["MatMul", "Gemm"], ...] = ()
    # Nodes kept in float: a module path segment ("conv_in", "down_blocks.0/resnets.0/conv1"), a glob
    # over node names ("*time_emb*"), or "op:Softmax". None: the family's defaults for this submodule
    # (UNet: time embedding and its projections, conv_in, conv_out, conv_shortcut, down-samplers,
    # proj_in/proj_out, softmax). A pattern given here that matches no node fails the build.
    keep_float: tuple[str, ...] | None = None
    # Floors on the mean over held-out inputs of this submodule's outputs vs fp32 (None: record only).
    min_cosine: float | None = Field(default=None, ge=-1.0, le=1.0)
    min_snr_db: float | None = None

    @model_validator(mode="after")
    def dynamic_after_static(self):
        if self.dynamic_op_types and self.mode != "static":
            raise ValueError(f"dynamic_op_types is for mode static (then dynamic); with mode {self.mode} use op_types")
        both = set(self.dynamic_op_types) & set(self.op_types)
        if both:
            raise ValueError(f"{sorted(both)} in both op_types and dynamic_op_types: quantize each op type once")
        return self


class SdVariant(Strict):
    text_encoder: SdQuant = SdQuant()
    unet: SdQuant = SdQuant()
    vae_decoder: SdQuant = SdQuant()
    vae_encoder: SdQuant = SdQuant()
    # End-to-end floors vs the fp32 pipeline (mean over the quality images; None: record only).
    min_psnr_db: float | None = None
    min_ssim: float | None = Field(default=None, ge=-1.0, le=1.0)
    min_clip_score: float | None = Field(default=None, ge=0.0, le=100.0)

    def quantized(self) -> dict[str, SdQuant]:
        return {name: getattr(self, name) for name in SD_SUBMODULES if getattr(self, name).mode != "float"}


class SdRecipe(Strict):
    family: Literal["sd"]
    description: str = ""
    default: bool = False  # built by a plain `doit build`
    source: SdSource
    export: SdExportConfig = SdExportConfig()
    validate_: SdValidateConfig = Field(default=SdValidateConfig(), alias="validate")
    calibration: SdCalibrationConfig = SdCalibrationConfig()
    quality: SdQualityConfig = SdQualityConfig()
    runtime: SdRuntimeConfig = SdRuntimeConfig()
    # Variant name -> per-submodule storage. A variant with every submodule float is an fp32 artifact.
    variants: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,39}$")], SdVariant]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def some_variant(self):
        if not self.variants:
            raise ValueError("variants: name at least one variant, e.g. fp32: {} (and int8: {unet: {mode: static}})")
        if self.quality.images > self.calibration.held_out:
            raise ValueError(f"quality.images ({self.quality.images}) exceeds calibration.held_out "
                             f"({self.calibration.held_out}): quality images use held-out prompts")
        return self

FAMILIES = {"gpt2": Gpt2Recipe, "sam": SamRecipe, "sd": SdRecipe}


class Recipe(Strict):
    """A loaded recipe: its name (the file stem), its file, and the typed body."""

    name: str
    path: str
    body: Gpt2Recipe | SamRecipe | SdRecipe
    text_digest: str  # sha256 of the validated body, for the manifest


def _format_error(path: Path, err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: {loc}: unknown key"
    if kind == "missing":
        return f"{path}: {loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {loc}: {msg}{got_txt}" if loc else f"{path}: {msg}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the model along loc (all but the last part) and list the allowed keys there."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None:
            return []
        match = next((f for n, f in fields.items() if part in (n, f.alias)), None)
        if match is None:
            return []
        ann = match.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        current = inner[0]
    return [f.alias or n for n, f in current.model_fields.items()]


def resolve_named_config(name: str, recipes_dir: Path) -> dict:
    cfg_path = recipes_dir / CONFIGS_DIR / f"{name}.json"
    if not cfg_path.is_file():
        known = sorted(p.stem for p in (recipes_dir / CONFIGS_DIR).glob("*.json"))
        raise RecipeError(f"source.random.config: no named config {name!r}; known: {', '.join(known) or 'none'}")
    return json.loads(cfg_path.read_text())


def load_recipe(path: str | Path) -> Recipe:
    import difflib
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (family, source, variants, ...), got {type(data).__name__}")
    family = data.get("family")
    if family not in FAMILIES:
        raise RecipeError(f"{path}: family: must be one of {', '.join(FAMILIES)} (got {family!r})")
    model = FAMILIES[family]
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key ("varients") also makes the key it was meant to be missing: name the typo first.
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        line = _format_error(path, err)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"])
            if allowed:
                line += f"; allowed: {', '.join(allowed)}"
                close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
                if close:
                    line += f"; did you mean {close[0]}?"
        raise RecipeError(line) from None
    if isinstance(body.source.random, (RandomSource, SamRandomSource, SdRandomSource)) and isinstance(body.source.random.config, str):
        try:
            resolve_named_config(body.source.random.config, path.parent)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    canonical = json.dumps(body.model_dump(mode="json", by_alias=True), sort_keys=True)
    return Recipe(name=path.stem, path=str(path), body=body, text_digest=hashlib.sha256(canonical.encode()).hexdigest())


def load_recipes(recipes_dir: str | Path) -> dict[str, Recipe]:
    recipes_dir = Path(recipes_dir)
    return {p.stem: load_recipe(p) for p in sorted(recipes_dir.glob("*.yaml"))}
