"""The trained model out of a run: EMA weight swapping, the whole transformer gathered from FSDP shards, and the
exported pipeline directory that sample.py and app.py load."""


from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType

from ..atomic import save_pretrained_atomically
from ..pipeline_ttt_video import TTTVideoPipeline

logger = logging.getLogger(__name__)


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
    written to a temporary sibling folder, then swapped in for out_dir. LoRA weights, if any, are fused first."""
    out_dir = Path(out_dir)
    transformer = pipe.transformer
    if getattr(transformer, "_hf_peft_config_loaded", False):
        transformer.fuse_lora()
        transformer.unload_lora()
    save_pretrained_atomically(pipe, out_dir)
    logger.info("exported the pipeline to %s", out_dir)
    return out_dir


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
