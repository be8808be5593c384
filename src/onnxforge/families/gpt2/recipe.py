"""The GPT-2 recipe: YAML keys, types, defaults and limits (validated into frozen models)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from ...config import RecipeBody, Source, Strict, TrainSteps, WorldSpec



class Gpt2TrainSource(TrainSteps):
    """A small GPT-2 trained here to turn a word of the pocket world into a caption of it ("star:" ->
    "a red star on a yellow background"), with its own byte-level BPE trained on those lines."""

    config: dict[str, Any] | str  # an inline GPT-2 config or the name of one in recipes/configs/
    examples: int = Field(default=3000, ge=100, le=100_000, description="word: caption lines to train on")
    vocab_size: int = Field(default=320, ge=260, le=4096)
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="peak of the one-cycle schedule")
    world: WorldSpec = WorldSpec()


class Gpt2Source(Source):
    KINDS: ClassVar[tuple[str, ...]] = ("hub", "path", "random", "train")
    train: Gpt2TrainSource | None = None


class ExportConfig(Strict):
    opset: int = Field(default=18, ge=14, le=23)


class ValidateConfig(Strict):
    logits_atol: float = Field(default=1e-4, gt=0)
    greedy_tokens: int = Field(default=32, ge=1, le=1024)
    greedy_prompt: str = Field(default="The old lighthouse", min_length=1)
    eval_text: str = Field(default="calibration/eval-text.txt")
    eval_window: int = Field(default=128, ge=8)
    # `train` sources only: the pocket-world oracle samples captions for every colour and shape word and
    # counts those that parse in the world's grammar and mention the word (onnxforge.world).
    world_samples_per_word: int = Field(default=4, ge=1, le=100)
    min_world_caption_score: float | None = Field(default=None, ge=0.0, le=1.0)


class RuntimeConfig(Strict):
    prompt_template: str = Field(
        default="A detailed, imaginative painting of {word},",
        description="must contain {word}",
    )
    # The sampling default of `generate` and the demo (a flag overrides it). 1 = off: the pocket model's
    # caption must repeat its word ("star:" -> "a red star ..."), which a penalty on seen tokens fights.
    repetition_penalty: float = Field(default=1.2, gt=0)
    # False: the creative prompt is the model's continuation alone ("star:" is the question, not the prompt).
    prompt_includes_template: bool = True

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


class Gpt2Recipe(RecipeBody):
    family: Literal["gpt2"]
    source: Gpt2Source
    export: ExportConfig = ExportConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    runtime: RuntimeConfig = RuntimeConfig()
    variants: Gpt2Variants

    @model_validator(mode="after")
    def some_variant(self):
        if not self.variants.enabled():
            raise ValueError("variants: name at least one of base, kv, pruned, kv-int8")
        return self

