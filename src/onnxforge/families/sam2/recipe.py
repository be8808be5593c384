"""The SAM 2.1 recipe: YAML keys, types, defaults and limits (validated into frozen models)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...config import RecipeBody, Strict
from ..sam.recipe import SamRuntimeConfig, SamSource

# Hiera's lowest-resolution stage is the input / 32, and its windowed position embedding tiles
# 8x8 windows over the input / 4 grid: an input size must be a multiple of 32.
SIZE_MULTIPLE = 32


class Sam2ValidateConfig(Strict):
    embeddings_atol: float = Field(default=1e-4, gt=0)
    min_mask_iou: float = Field(default=0.99, ge=0.0, le=1.0, description="ONNX vs PyTorch, every prompt and mask")
    # A synthetic picture of this size (width, height) is segmented with point, box and mixed prompts.
    image: tuple[int, int] = (640, 480)


class Sam2Int8(Strict):
    op_types: tuple[Literal["MatMul", "Gemm"], ...] = ("MatMul",)
    per_channel: bool = False
    reduce_range: bool = False
    min_mask_iou: float = Field(default=0.9, ge=0.0, le=1.0, description="int8 vs fp32 ONNX, mean over prompts")
    min_embedding_cosine: float = Field(default=0.99, ge=-1.0, le=1.0)


class Sam2Variant(Strict):
    """One published variant: the encoder's input size, and int8 of the encoder or not."""

    image_size: int = Field(default=1024, ge=64, le=2048)
    int8: Sam2Int8 | None = None
    # Only with a size other than the model's own: the floor on mean mask IoU against the model's
    # own size (the same weights through PyTorch); the figure is recorded either way.
    min_iou_vs_native_size: float = Field(default=0.0, ge=0.0, le=1.0)

    @field_validator("image_size")
    @classmethod
    def multiple(cls, v: int) -> int:
        if v % SIZE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE} (Hiera's coarsest feature grid is the input / "
                             f"{SIZE_MULTIPLE}), e.g. {max(SIZE_MULTIPLE, v // SIZE_MULTIPLE * SIZE_MULTIPLE)}")
        return v


class Sam2ExportConfig(Strict):
    opset: int = Field(default=18, ge=14, le=23)


class Sam2Recipe(RecipeBody):
    family: Literal["sam2"]
    source: SamSource
    export: Sam2ExportConfig = Sam2ExportConfig()
    validate_: Sam2ValidateConfig = Field(default=Sam2ValidateConfig(), alias="validate")
    runtime: SamRuntimeConfig = SamRuntimeConfig()
    variants: dict[str, Sam2Variant]

    @model_validator(mode="after")
    def some_variant(self):
        if not self.variants:
            raise ValueError("variants: name at least one, e.g. fp32: {image_size: 1024}")
        for name in self.variants:
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", name):
                raise ValueError(f"variants: {name!r} is not a variant name (lowercase letters, digits and '-')")
        return self
