"""The Stable Diffusion recipe: YAML keys, types, defaults and limits (validated into frozen models)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from ...config import HubSource, OneOf, RecipeBody, Source, Strict


SD_SUBMODULES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
SD_SCHEDULERS = ("pndm", "ddim", "euler", "dpm++2m", "lcm")  # runtime/schedulers.py SCHEDULER_NAMES
SdScheduler = Literal["pndm", "ddim", "euler", "dpm++2m", "lcm"]
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


# The modules diffusers' LCM-LoRA training script (examples/consistency_distillation) adapts: attention
# and feed-forward projections, the transformers' proj_in/out, the resnets' convs and time projections,
# the down/up-samplers. latent-consistency/lcm-lora-sdv1-5 is rank 64 over these.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


class SdLoraHub(HubSource):
    weight_name: str = Field(default="pytorch_lora_weights.safetensors", min_length=1)


class SdLoraRandom(Strict):
    """Seeded random LoRA weights of a real LoRA's shape (rank, target modules): honest latency and size."""

    rank: int = Field(ge=1, le=1024)
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha (None: the rank, as LCM-LoRA)")
    target_modules: tuple[str, ...] = Field(default=LCM_LORA_TARGETS, min_length=1)
    seed: int = Field(default=0, ge=0)


class SdLora(OneOf):
    """LoRA weights fused into the UNet before export (diffusers' load + fuse_lora; peft underneath)."""

    hub: SdLoraHub | None = None
    path: str | None = Field(default=None, description="a LoRA .safetensors file (diffusers, peft or kohya keys)")
    random: SdLoraRandom | None = None
    scale: float = Field(default=1.0, gt=0.0, le=4.0)


class SdTaesdRandom(Strict):
    # AutoencoderTiny kwargs; {} is diffusers' default, which is TAESD's own architecture.
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0)


class SdTaesd(OneOf):
    """TAESD (diffusers AutoencoderTiny): a ~2.4 M-parameter VAE that variants may use instead of the SD VAE."""

    hub: HubSource | None = None  # e.g. madebyollin/taesd
    path: str | None = None  # a folder with config.json + diffusion_pytorch_model.safetensors
    random: SdTaesdRandom | None = None


class SdTrainSource(Strict):
    """The pocket SD (issue 16): VAE, CLIP text encoder and UNet trained here on the pocket world's pictures and
    captions (families/sd/pocket.py); the architecture is the module's, the schedule these keys."""

    seed: int = Field(default=0, ge=0)
    examples: int = Field(default=4000, ge=100, le=100_000, description="world pictures to learn from")
    vae_steps: int = Field(default=1500, ge=1, le=100_000)
    unet_steps: int = Field(default=5500, ge=1, le=200_000, description="text encoder + UNet steps (batch 32)")


class SdSource(Source):
    KINDS: ClassVar[tuple[str, ...]] = ("hub", "path", "random", "train")
    random: SdRandomSource | None = None
    train: SdTrainSource | None = None
    lora: SdLora | None = None  # fused into the UNet in the source stage
    taesd: SdTaesd | None = None  # exported beside the SD VAE; a variant picks it with `vae: taesd`


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
    taesd_decoder: float = Field(default=1e-3, gt=0)  # only when the source has TAESD
    taesd_encoder: float = Field(default=1e-3, gt=0)


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
    # <= 1: no negative pass, the UNet runs at batch 1 (as a one-pass, e.g. LCM, recipe draws)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
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
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
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
    # <= 1: one-pass guidance. The UNet is exported for batch 1 (no negative-prompt pass; LCM runs at 1)
    # and the runtime refuses a guidance > 1 on it. > 1: classifier-free guidance at batch 2.
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
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
    # Which VAE decodes (and encodes, for edits): the SD VAE, or TAESD (needs source.taesd; kept float).
    vae: Literal["sd", "taesd"] = "sd"
    # End-to-end floors vs the fp32 pipeline (mean over the quality images; None: record only).
    min_psnr_db: float | None = None
    min_ssim: float | None = Field(default=None, ge=-1.0, le=1.0)
    min_clip_score: float | None = Field(default=None, ge=0.0, le=100.0)

    def quantized(self) -> dict[str, SdQuant]:
        return {name: getattr(self, name) for name in SD_SUBMODULES if getattr(self, name).mode != "float"}


class SdWorldOracle(Strict):
    """For pipelines trained on the pocket world (issue 16): pictures drawn from held-out world captions with the
    recipe's runtime defaults, read by the world's picture oracle (onnxforge.world.read_picture)."""

    pictures: int = Field(default=48, ge=1, le=1000)
    seed: int = Field(default=1000, ge=0, description="captions and noise seeds; training uses others")
    min_colour: float | None = Field(default=None, ge=0, le=1, description="fraction with the caption's colour")
    min_shape: float | None = Field(default=None, ge=0, le=1, description="fraction with the caption's shape")
    max_drop: float | None = Field(default=None, ge=0, le=1, description="quantized: most a score may fall below fp32's")


class SdRecipe(RecipeBody):
    family: Literal["sd"]
    source: SdSource
    export: SdExportConfig = SdExportConfig()
    validate_: SdValidateConfig = Field(default=SdValidateConfig(), alias="validate")
    calibration: SdCalibrationConfig = SdCalibrationConfig()
    quality: SdQualityConfig = SdQualityConfig()
    runtime: SdRuntimeConfig = SdRuntimeConfig()
    world: SdWorldOracle | None = None  # pocket-world pipelines: the picture oracle gates every variant
    # Variant name -> per-submodule storage. A variant with every submodule float is an fp32 artifact.
    variants: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,39}$")], SdVariant]

    @model_validator(mode="after")
    def some_variant(self):
        if not self.variants:
            raise ValueError("variants: name at least one variant, e.g. fp32: {} (and int8: {unet: {mode: static}})")
        if self.runtime.guidance_scale <= 1.0:
            for key in ("calibration", "quality"):
                if getattr(self, key).guidance_scale > 1.0:
                    raise ValueError(f"{key}.guidance_scale {getattr(self, key).guidance_scale} > 1, but runtime.guidance_scale "
                                     f"{self.runtime.guidance_scale} <= 1 exports the UNet for batch 1 (no negative pass): "
                                     f"set it to 1")
        for name, v in self.variants.items():
            if v.vae == "taesd":
                if self.source.taesd is None:
                    raise ValueError(f"variants.{name}.vae: taesd needs a source.taesd (hub, path or random)")
                quantized = [k for k in ("vae_decoder", "vae_encoder") if getattr(v, k).mode != "float"]
                if quantized:
                    raise ValueError(f"variants.{name}: TAESD stays float (it is ~2.4 M parameters); drop the "
                                     f"{', '.join(quantized)} quantization or use vae: sd")
        if self.quality.images > self.calibration.held_out:
            raise ValueError(f"quality.images ({self.quality.images}) exceeds calibration.held_out "
                             f"({self.calibration.held_out}): quality images use held-out prompts")
        return self

