"""The SAM recipe: YAML keys, types, defaults and limits (validated into frozen models)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from ...config import RecipeBody, Source, Strict, TrainSteps, WorldSpec



class SamRandomSource(Strict):
    """Seeded random SAM weights; SAM has no tokenizer, so this is not `RandomSource`."""

    # SamConfig keyword arguments inline, or the name of a config in recipes/configs/.
    config: dict[str, Any] | str
    seed: int = Field(ge=0)
    # transformers' SamVisionConfig defaults to initializer_range 1e-10, which draws
    # all-zero weights (parity checks would compare zeros): random weights get this
    # spread instead, in every sub-model.
    initializer_range: float = Field(default=0.02, gt=0.0, le=1.0)


class SamTrainSource(TrainSteps):
    """A pocket SAM trained here on the shapes world (families/sam/pocket.py): a point on a shape -> its mask."""

    config: dict[str, Any] | str  # SamConfig keyword arguments inline, or the name of a config in recipes/configs/
    examples: int = Field(default=2000, ge=10, le=100_000, description="world pictures to train on")
    batch: int = Field(default=8, ge=1, le=256)
    learning_rate: float = Field(default=2e-3, gt=0, le=1.0, description="peak of the one-cycle schedule")
    world: WorldSpec = WorldSpec(max_shapes=2)


class SamSource(Source):
    KINDS: ClassVar[tuple[str, ...]] = ("hub", "path", "random", "train")
    random: SamRandomSource | None = None
    train: SamTrainSource | None = None


class SamValidateConfig(Strict):
    embeddings_atol: float = Field(default=1e-4, gt=0)
    min_mask_iou: float = Field(default=0.99, ge=0.0, le=1.0, description="ONNX vs PyTorch, every prompt and mask")
    # A synthetic picture of this size (width, height) is segmented with point, box and mixed prompts.
    image: tuple[Annotated[int, Field(ge=2, le=8192)], Annotated[int, Field(ge=2, le=8192)]] = (640, 480)
    # Models trained on the pocket world (a `train` source, or a `path` folder whose training.json says so): the
    # world oracle segments held-out world pictures with a point on each shape (pocket.world_mask_iou) and
    # records the mean IoU with the rendered masks in every variant's manifest; below this floor the build fails.
    min_world_mask_iou: float | None = Field(default=None, ge=0.0, le=1.0)
    world_pictures: int = Field(default=48, ge=1, le=1000, description="held-out pictures the world oracle uses")


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
    # Fill holes and drop islands smaller than this many pixels, then NMS again (SAM's AMG
    # min_mask_region_area; 0 = off, as there).
    min_region_area: int = Field(default=0, ge=0)


class SamFp32Variant(Strict):
    pass


class SamInt8Variant(Strict):
    op_types: tuple[Literal["MatMul", "Gemm"], ...] = ("MatMul",)
    per_channel: bool = False
    reduce_range: bool = False
    min_mask_iou: float = Field(default=0.9, ge=0.0, le=1.0, description="int8 vs fp32 ONNX, mean over prompts")
    min_embedding_cosine: float = Field(default=0.99, ge=-1.0, le=1.0)
    # World-trained sources: how far int8's world mask IoU may fall below fp32's (None: record only).
    max_world_mask_iou_drop: float | None = Field(default=None, ge=0.0, le=1.0)


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


class SamRecipe(RecipeBody):
    family: Literal["sam"]
    source: SamSource
    export: SamExportConfig = SamExportConfig()
    validate_: SamValidateConfig = Field(default=SamValidateConfig(), alias="validate")
    runtime: SamRuntimeConfig = SamRuntimeConfig()
    variants: SamVariants

    @model_validator(mode="after")
    def some_variant(self):
        if not self.variants.enabled():
            raise ValueError("variants: name at least one of fp32, int8")
        return self


