"""The trained model out of a run: EMA weight swapping, the whole transformer gathered from FSDP shards, and the
exported pipeline directory that sample.py and app.py load."""


from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType

from ..atomic import build_dir_atomically
from ..pipeline_ttt_video import TTTVideoPipeline
from .components import build_components, torch_dtype
from .config import Config

logger = logging.getLogger(__name__)

LORA_DIR = "lora"  # inside the export: the LoRA weights unfused, in diffusers' format
TTT_ADAPTER_FILE = "ttt_adapter.safetensors"


@contextlib.contextmanager
def ema_weights(ema, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily load the EMA weights into `parameters` (no-op when ema is None)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def export_pipeline(pipe: TTTVideoPipeline, out_dir: str | Path) -> Path:
    """Save a pipeline directory that sample.py and app.py load (`TTTVideoPipeline.from_pretrained`), atomically:
    written to a temporary sibling folder, then swapped in for out_dir.

    LoRA weights, if any, are fused into the exported transformer, and also written unfused in diffusers' format to
    out_dir/lora/ (`save_lora`), for `load_lora_weights` on the transformer they were trained on."""
    out_dir = Path(out_dir)
    transformer = pipe.transformer
    lora = None
    if getattr(transformer, "_hf_peft_config_loaded", False):
        lora = lora_layers(transformer)
        transformer.fuse_lora()
        transformer.unload_lora()

    def fill(folder: Path) -> None:
        pipe.save_pretrained(folder)
        if lora is not None:
            save_lora(folder / LORA_DIR, transformer, *lora)

    build_dir_atomically(out_dir, fill)
    logger.info("exported the pipeline to %s", out_dir)
    return out_dir


def lora_layers(transformer: torch.nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """The transformer's LoRA weights (peft's state dict: "transformer_blocks.0.attn1.to_q.lora_A.weight", ...) and
    the adapter's LoraConfig as a dict (rank, alpha, targets), as diffusers' training scripts collect them."""
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().cpu().contiguous()
              for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}
    return layers, transformer.peft_config[adapter_name].to_dict()


def save_lora(folder: Path, transformer, layers: dict[str, torch.Tensor], metadata: dict) -> None:
    """folder/pytorch_lora_weights.safetensors in diffusers' LoRA format (keys prefixed "transformer.", the adapter
    config in the metadata; `CogVideoXLoraLoaderMixin.save_lora_weights`), and folder/ttt_adapter.safetensors: the TTT
    weights trained with the LoRA (`save_adapter`), which the transformer it is loaded into must have."""
    TTTVideoPipeline.save_lora_weights(folder, transformer_lora_layers=layers,
                                       transformer_lora_adapter_metadata=metadata)
    transformer.save_adapter(folder / TTT_ADAPTER_FILE)


def full_transformer(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module | None:
    """The trained transformer with whole (unsharded) weights for saving: the unwrapped model itself, or under
    FSDP / DeepSpeed a fresh copy holding the gathered state dict on the main process (None on the others). Call on
    every process."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return unwrapped
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    copy = type(unwrapped).from_config(unwrapped.config)
    copy.load_state_dict(state)
    return copy


def build_pipeline(cfg: Config, accelerator: Accelerator, model: torch.nn.Module, scheduler) -> TTTVideoPipeline:
    """The sampling pipeline around the (unwrapped) trained transformer; tokenizer, text encoder and VAE are loaded
    here, on the CPU, only when validation or the export needs them. Its default guidance scale and memory guidance
    are the config's (`validation.guidance_scale`, `validation.memory_guidance_scale`, `..._segments`,
    `..._baseline`)."""
    parts = build_components(cfg.model, cfg.train, ("tokenizer", "text_encoder", "vae"))
    dtype = torch_dtype(cfg.train.mixed_precision) if accelerator.device.type == "cuda" else torch.float32
    return TTTVideoPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"].to(dtype),
                            vae=parts["vae"].to(dtype), transformer=accelerator.unwrap_model(model),
                            scheduler=scheduler, fps=cfg.data.fps,
                            guidance_scale=cfg.validation.guidance_scale,
                            memory_guidance_scale=cfg.validation.memory_guidance_scale,
                            memory_guidance_segments=cfg.validation.memory_guidance_segments,
                            memory_guidance_baseline=cfg.validation.memory_guidance_baseline)


def export_final(cfg: Config, accelerator: Accelerator, model: torch.nn.Module, scheduler, ema,
                 parameters: list[torch.nn.Parameter]) -> Path:
    """output_dir/final: the trained (EMA, when kept) transformer in a pipeline directory. Call on every process."""
    out = Path(cfg.output_dir) / "final"
    with ema_weights(ema, parameters):
        final = full_transformer(accelerator, model)
        if accelerator.is_main_process:
            export_pipeline(build_pipeline(cfg, accelerator, final, scheduler), out)
    accelerator.wait_for_everyone()
    return out
