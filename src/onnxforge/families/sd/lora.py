"""LoRA weights fused into the SD UNet before export, with diffusers' own loader (peft underneath).

    file  = lora_file(params, out, unet)       # hub snapshot, a local file, or seeded random weights saved
    fuse_lora(unet, file, scale)               # diffusers: lora_state_dict -> load_lora_into_unet -> fuse_lora
                                               # -> unload_lora (plain modules with the merged weights)

diffusers reads every LoRA format it knows (diffusers/peft keys, kohya `lora_unet_*`) through
`lora_state_dict`, so a hub LoRA such as latent-consistency/lcm-lora-sdv1-5 loads as in diffusers'
LCM-LoRA docs. After `unload_lora` the UNet is an ordinary UNet2DConditionModel: exported like any other.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...config import RecipeError
from ...runtime.artifact import sha256_file
from ...sources import SourceError, hub_snapshot

RANDOM_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "recipe_lora"
# The random LoRA's B matrices (peft's non-zero init is uniform like a Linear layer's) are scaled down
# so the fused change is a fraction of the weights, as a trained LoRA's is, not a second set of weights.
RANDOM_B_SCALE = 0.1
MISMATCH = re.compile(r"size mismatch for ([^:]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from "
                      r"checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))")


def random_lora(unet, rank: int, alpha: float | None, target_modules, seed: int, out_dir: Path) -> Path:
    """Seeded random LoRA weights of the given rank on these target modules, saved as diffusers saves a
    trained one (pytorch_lora_weights.safetensors, `unet.` keys); the UNet is left as it was."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            unet.add_adapter(config, adapter_name=ADAPTER)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise RecipeError(f"source.lora.random.target_modules: {str(exc).splitlines()[0]}") from None
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.mul_(RANDOM_B_SCALE)
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    unet.unload_lora()  # drops the adapter layers unmerged: the base weights are untouched
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state, weight_name=RANDOM_FILE,
                                              safe_serialization=True)
    return out_dir / RANDOM_FILE


def lora_file(lora: dict, project_dir: Path) -> Path:
    """The LoRA file of a hub or path source (random ones are made by `random_lora`)."""
    if lora["kind"] == "hub":
        folder = hub_snapshot(lora["repo"], lora["revision"], [lora["weight_name"]])
        path = folder / lora["weight_name"]
        if not path.is_file():
            raise SourceError(f"source.lora: {lora['repo']}@{lora['revision'][:12]} has no {lora['weight_name']} "
                              f"(recipe key source.lora.hub.weight_name)")
        return path
    path = Path(lora["path"])
    path = path if path.is_absolute() else project_dir / path
    if not path.is_file():
        raise SourceError(f"source.lora.path: {path} is not a file; give a LoRA .safetensors file")
    return path


def fuse_lora(unet, path: Path, scale: float) -> dict:
    """Fuse the LoRA at `path` into `unet` at `scale`; one-line errors for files that do not fit it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path.parent), weight_name=path.name)
    except Exception as exc:  # not safetensors, unknown key format...
        raise SourceError(f"{path}: not a LoRA diffusers can read ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None
    other = sorted({k.split(".")[0] for k in state if not k.startswith("unet.")})
    if other:
        raise SourceError(f"{path}: this LoRA also changes {', '.join(other)}; only UNet LoRAs are fused (LCM-LoRA is one)")
    if not state:
        raise SourceError(f"{path}: holds no LoRA weights")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # diffusers logs the whole state-dict error too
    try:
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name=ADAPTER)
    except RuntimeError as exc:
        m = MISMATCH.search(str(exc))
        if m:
            raise SourceError(f"{path}: LoRA shapes do not fit this UNet: first mismatched key {m.group(1)} "
                              f"(LoRA {m.group(2)[11:-1]}, UNet {m.group(3)[11:-1]}); use a LoRA trained for this "
                              f"architecture") from None
        raise SourceError(f"{path}: LoRA does not load into this UNet: {str(exc).splitlines()[-1][:200]}") from None
    except ValueError as exc:  # peft: target modules missing from the model
        raise SourceError(f"{path}: LoRA does not fit this UNet: {str(exc).splitlines()[0][:200]}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    lora_layers = sum(1 for n, _ in unet.named_modules() if n.endswith(f"lora_A.{ADAPTER}"))
    if lora_layers == 0:
        raise SourceError(f"{path}: none of its keys name a module of this UNet; use a LoRA trained for this architecture")
    unet.fuse_lora(lora_scale=scale)
    unet.unload_lora()
    return {"layers": lora_layers, "tensors": len(state), "sha256": sha256_file(path)}

