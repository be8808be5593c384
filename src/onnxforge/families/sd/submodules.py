"""Stable Diffusion's four ONNX submodules: one record each, read by export, calibration, quantization,
validation and the benchmark alike.

    text_encoder  input_ids (B, 77) int64 -> last_hidden_state (B, 77, D)
    unet          sample (B, C, h, w), timestep (B,) float32, encoder_hidden_states (B, 77, D) -> out_sample
    vae_decoder   latent_sample (B, C, h, w) (already divided by scaling_factor) -> sample (B, 3, 8h, 8w) in [-1, 1]
    vae_encoder   sample (B, 3, H, W) in [-1, 1] -> latent_mean, latent_std (B, C, H/8, W/8)
Batch, height and width are named dims when the recipe says so (export.dynamic_batch/_size).
The names are those of optimum's ONNX Stable Diffusion export (the UNet's noise prediction is `out_sample`),
so `onnxforge export-layout` only links files (layout.py); the runtime reads outputs by position.

TAESD (diffusers AutoencoderTiny, when the source has one) is exported beside the SD VAE with the same
conventions, so a variant can ship it as its vae_decoder / vae_encoder:
    taesd_decoder latent_sample (B, C, h, w) (latents / TAESD's scaling_factor, 1.0) -> sample in [-1, 1]
    taesd_encoder sample (B, 3, H, W) in [-1, 1] -> latent_mean (B, C, H/8, W/8) (deterministic: no std)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..common import ort_multihead_attention

TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = f"{TOKENIZER_DIR}/tokenizer.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# The source's component configs (diffusers / transformers config.json), published for other loaders
# (optimum's pipeline reads one beside each ONNX file; see layout.py), never read by the runtime.
CONFIGS_DIR = "configs"
COMPONENT_CONFIGS = ("text_encoder", "unet", "vae")  # -> configs/<name>.json


@dataclass(frozen=True)
class Submodule:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cfg_batch: bool  # runs at batch 2 under classifier-free guidance (traced that way; else batch 1)
    # Kept in float unless a recipe says otherwise (see SD_KEEP_FLOAT's comment); patterns that name
    # nothing in a given architecture are skipped.
    keep_float: tuple[str, ...]
    torch_module: Callable  # (model_dir, fused_attention) -> torch module with the ONNX component's flat IO
    example: Callable  # (info, batch, width, height, token_ids, rng) -> {input name: array}
    axes: Callable  # (batch_axes, latent_axes, image_axes) -> {io name: {dim: name}}
    output_shapes: Callable  # (info, batch, width, height) -> [shape per output]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def _latent(info: dict, batch: int, width: int, height: int) -> list[int]:
    f = info["vae_scale_factor"]
    return [batch, info["latent_channels"], height // f, width // f]


# ---- torch side: each submodule as an export-ready module --------------------------------------


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


def _text_encoder_module(model_dir: Path, fused_attention: bool):
    import torch
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(model_dir / "text_encoder", attn_implementation="eager").eval()

    class TextEncoder(torch.nn.Module):  # CLIP's attention stays as exported (fused_attention is for UNet/VAE)
        def __init__(self):
            super().__init__()
            self.text_encoder = te

        def forward(self, input_ids):
            return self.text_encoder(input_ids=input_ids, return_dict=False)[0]

    return TextEncoder().eval()


def _unet_module(model_dir: Path, fused_attention: bool):
    import torch
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


def _vae(model_dir: Path, fused_attention: bool):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    if fused_attention:
        vae.set_attn_processor(ort_attention_processor())
    return vae


def _vae_decoder_module(model_dir: Path, fused_attention: bool):
    import torch

    vae = _vae(model_dir, fused_attention)

    class VaeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    return VaeDecoder().eval()


def _vae_encoder_module(model_dir: Path, fused_attention: bool):
    import torch

    vae = _vae(model_dir, fused_attention)

    class VaeEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, sample):
            dist = self.vae.encode(sample).latent_dist
            return dist.mean, dist.std

    return VaeEncoder().eval()


def _taesd(model_dir: Path):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(model_dir / "taesd").eval()


def _taesd_decoder_module(model_dir: Path, fused_attention: bool):  # TAESD has no attention
    import torch

    vae = _taesd(model_dir)

    class TaesdDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    return TaesdDecoder().eval()


def _taesd_encoder_module(model_dir: Path, fused_attention: bool):
    import torch

    vae = _taesd(model_dir)

    class TaesdEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, sample):
            return self.vae.encode(sample, return_dict=False)[0]

    return TaesdEncoder().eval()


# ---- the table ------------------------------------------------------------------------------------

# Static int8 of the UNet is known to break the time embedding and its per-block projections, the first
# and last convolution, the 1x1 skip-connection convolutions and softmax. The down-samplers (stride-2
# convs on the residual stream) and the transformers' proj_in/proj_out cost static int8 Conv the most
# accuracy at early timesteps: measured on the v1.4 architecture, t=901, UNet output cosine vs fp32
# 0.9979 with them quantized, 0.9994 kept float, for ~5% of the conv time.
SUBMODULE_LIST = (
    Submodule(
        name="text_encoder", inputs=("input_ids",), outputs=("last_hidden_state",), cfg_batch=True,
        keep_float=("op:Softmax",), torch_module=_text_encoder_module,
        example=lambda info, batch, w, h, ids, rng: {"input_ids": np.ascontiguousarray(ids[:batch])},
        axes=lambda b, latent, image: {"input_ids": b, "last_hidden_state": b},
        output_shapes=lambda info, batch, w, h: [[batch, info["max_length"], info["text_hidden_size"]]]),
    Submodule(
        name="unet", inputs=("sample", "timestep", "encoder_hidden_states"), outputs=("out_sample",), cfg_batch=True,
        keep_float=("time_embedding", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut", "*/downsamplers.*",
                    "proj_in", "proj_out", "op:Softmax"),
        torch_module=_unet_module,
        example=lambda info, batch, w, h, ids, rng: {
            "sample": rng.standard_normal(_latent(info, batch, w, h), dtype=np.float32),
            "timestep": np.asarray([981.0, 421.0][:batch], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, info["max_length"], info["text_hidden_size"]),
                                                         dtype=np.float32)},
        axes=lambda b, latent, image: {"sample": latent, "timestep": b, "encoder_hidden_states": b, "out_sample": latent},
        output_shapes=lambda info, batch, w, h: [_latent(info, batch, w, h)]),
    Submodule(
        name="vae_decoder", inputs=("latent_sample",), outputs=("sample",), cfg_batch=False,
        keep_float=("conv_in", "conv_out", "conv_shortcut", "op:Softmax"), torch_module=_vae_decoder_module,
        example=lambda info, batch, w, h, ids, rng: {
            "latent_sample": rng.standard_normal(_latent(info, batch, w, h), dtype=np.float32)
            / np.float32(info["scaling_factor"])},
        axes=lambda b, latent, image: {"latent_sample": latent, "sample": image},
        output_shapes=lambda info, batch, w, h: [[batch, 3, h, w]]),
    Submodule(
        name="vae_encoder", inputs=("sample",), outputs=("latent_mean", "latent_std"), cfg_batch=False,
        keep_float=("conv_in", "conv_out", "conv_shortcut", "op:Softmax"), torch_module=_vae_encoder_module,
        example=lambda info, batch, w, h, ids, rng: {"sample": rng.uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)},
        axes=lambda b, latent, image: {"sample": image, "latent_mean": latent, "latent_std": latent},
        output_shapes=lambda info, batch, w, h: [_latent(info, batch, w, h)] * 2),
)
SUBMODULES: dict[str, Submodule] = {s.name: s for s in SUBMODULE_LIST}
FILES = {s.name: s.file for s in SUBMODULE_LIST}
IO = {s.name: {"inputs": list(s.inputs), "outputs": list(s.outputs)} for s in SUBMODULE_LIST}

# TAESD: exported when the source has model/taesd; shipped under the SD VAE's component names (`vae: taesd`).
TAESD_LIST = (
    Submodule(
        name="taesd_decoder", inputs=("latent_sample",), outputs=("sample",), cfg_batch=False, keep_float=(),
        torch_module=_taesd_decoder_module,
        example=lambda info, batch, w, h, ids, rng: {
            "latent_sample": rng.standard_normal(_latent(info, batch, w, h), dtype=np.float32)
            / np.float32(info["taesd_scaling_factor"])},
        axes=lambda b, latent, image: {"latent_sample": latent, "sample": image},
        output_shapes=lambda info, batch, w, h: [[batch, 3, h, w]]),
    Submodule(
        name="taesd_encoder", inputs=("sample",), outputs=("latent_mean",), cfg_batch=False, keep_float=(),
        torch_module=_taesd_encoder_module,
        example=lambda info, batch, w, h, ids, rng: {"sample": rng.uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)},
        axes=lambda b, latent, image: {"sample": image, "latent_mean": latent},
        output_shapes=lambda info, batch, w, h: [_latent(info, batch, w, h)]),
)
TAESD_FOR = {"vae_decoder": "taesd_decoder", "vae_encoder": "taesd_encoder"}
ALL: dict[str, Submodule] = {**SUBMODULES, **{s.name: s for s in TAESD_LIST}}
ALL_FILES = {name: s.file for name, s in ALL.items()}
ALL_IO = {name: {"inputs": list(s.inputs), "outputs": list(s.outputs)} for name, s in ALL.items()}


def exported(model_dir: Path) -> list[str]:
    """The submodules the export stage makes from this source: the four, and TAESD's two if it has one."""
    return list(SUBMODULES) + ([s.name for s in TAESD_LIST] if (model_dir / "taesd" / "config.json").is_file() else [])


def variant_components(vae: str) -> dict[str, str]:
    """A variant's component name -> the exported submodule it ships (TAESD under the VAE's names)."""
    return {name: TAESD_FOR.get(name, name) if vae == "taesd" else name for name in SUBMODULES}


def example_inputs(name: str, info: dict, batch: int, width: int, height: int, token_ids: np.ndarray, seed: int) -> dict:
    """Seeded inputs of the right shapes and ranges for one submodule (numpy)."""
    return ALL[name].example(info, batch, width, height, token_ids, np.random.default_rng(seed))


def dynamic_axes(name: str, batch: bool, size: bool) -> dict:
    b = {0: "batch"} if batch else {}
    latent = {**b, **({2: "latent_height", 3: "latent_width"} if size else {})}
    image = {**b, **({2: "height", 3: "width"} if size else {})}
    return ALL[name].axes(b, latent, image)


def model_info(model_dir: Path) -> dict:
    """The sizes the export, the runtime and the calibration readers need, from the repo's configs."""
    te = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer" / "tokenizer_config.json").read_text()) \
        if (model_dir / "tokenizer" / "tokenizer_config.json").is_file() else {}
    max_length = min(int(tok.get("model_max_length", 77)), int(te.get("max_position_embeddings", 77)))
    n_up = len(unet["block_out_channels"]) - 1  # every block but the last one halves the size
    taesd = {}
    if (model_dir / "taesd" / "config.json").is_file():
        taesd = {"taesd_scaling_factor": float(json.loads((model_dir / "taesd" / "config.json").read_text())
                                               .get("scaling_factor", 1.0))}
    return {"max_length": max_length, "text_hidden_size": te["hidden_size"], "latent_channels": vae["latent_channels"],
            "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
            "scaling_factor": float(vae.get("scaling_factor", 0.18215)), "unet_up_factor": 2 ** n_up,
            "unet_sample_size": unet.get("sample_size"), **taesd}
