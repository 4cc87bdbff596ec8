"""Validation sampling during training: every storyboard of the config rendered to mp4 and sent to the trackers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, cpu_offload_with_hook
from accelerate.hooks import remove_hook_from_module

from ..pipeline_ttt_video import TTTVideoPipeline
from ..video_io import write_video
from .config import Config, ValidationConfig
from .export import build_pipeline, ema_weights

logger = logging.getLogger(__name__)
FRAMES_LOGGED = 8  # frames per video sent to image trackers (tensorboard has no video support without moviepy)


class Validator:
    """Runs `validate` every `validation.every` steps and at the last one, with the EMA weights when kept; the
    pipeline (text encoder, VAE) is built at the first validation."""

    def __init__(self, cfg: Config, accelerator: Accelerator, model: torch.nn.Module, scheduler, ema,
                 parameters: list[torch.nn.Parameter]):
        self.cfg, self.accelerator, self.model, self.scheduler = cfg, accelerator, model, scheduler
        self.ema, self.parameters = ema, parameters
        self.pipe: TTTVideoPipeline | None = None

    def should_validate(self, step: int) -> bool:
        every = self.cfg.validation.every
        return every > 0 and bool(self.cfg.validation.storyboards) and (
            step % every == 0 or step == self.cfg.train.steps)

    def maybe_validate(self, step: int) -> list[Path]:
        if not self.should_validate(step):
            return []
        if self.pipe is None:
            self.pipe = build_pipeline(self.cfg, self.accelerator, self.model, self.scheduler)
        with ema_weights(self.ema, self.parameters):
            return validate(self.pipe, self.accelerator, self.cfg.validation, Path(self.cfg.output_dir) / "validation",
                            step)


@torch.no_grad()
def validate(pipe: TTTVideoPipeline, accelerator: Accelerator, cfg: ValidationConfig, out_dir: str | Path,
             step: int) -> list[Path]:
    """Sample every storyboard of cfg.storyboards to out_dir/step-XXXXXXXX/<name>.mp4 and log them.

    Every process samples (a sharded transformer needs all ranks in each forward); the main process writes and
    logs. On a GPU with cfg.cpu_offload the text encoder and VAE sit on the CPU and visit the GPU only for their
    turn, so validation needs little more memory than the training step. Returns the written paths.
    """
    device = accelerator.device
    folder = Path(out_dir) / f"step-{step:08d}"
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    hooks = []
    if cfg.cpu_offload and device.type == "cuda":
        _, text_hook = cpu_offload_with_hook(pipe.text_encoder, device)
        _, vae_hook = cpu_offload_with_hook(pipe.vae, device, prev_module_hook=text_hook)
        hooks = [text_hook, vae_hook]
    else:
        pipe.text_encoder.to(device)
        pipe.vae.to(device)
    written = []
    try:
        for source in cfg.storyboards:
            generator = torch.Generator(device).manual_seed(cfg.seed)
            with accelerator.autocast():
                output = pipe(storyboard=source, num_inference_steps=cfg.num_inference_steps,
                              guidance_scale=cfg.guidance_scale, generator=generator, output_type="np")
            frames = output.frames[0]  # (F, H, W, 3) float in [0, 1]
            if accelerator.is_main_process:
                path = write_video(frames, folder / f"{Path(source).stem}.mp4", output.fps)
                written.append(path)
                _log_video(accelerator, f"validation/{Path(source).stem}", path, frames, step)
    finally:
        for hook in hooks:
            hook.offload()
        for module in (pipe.text_encoder, pipe.vae):
            remove_hook_from_module(module)
        pipe.transformer.train(was_training)
    accelerator.wait_for_everyone()
    return written


def _log_video(accelerator: Accelerator, name: str, path: Path, frames: np.ndarray, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Video(str(path))}, step=step)
        elif tracker.name == "tensorboard":
            picks = np.linspace(0, len(frames) - 1, min(FRAMES_LOGGED, len(frames))).round().astype(int)
            tracker.log_images({name: frames[picks]}, step=step, dataformats="NHWC")
