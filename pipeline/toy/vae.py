"""Train the toy model's tiny CogVideoX VAE on the frames of a dataset folder.

    python -m pipeline.toy.vae --config configs/toy/base.yaml [key=value ...]

Sizes come from `model.builder_args.vae`, the schedule from `model.builder_args.vae_training` (pipeline/toy/model.py
documents both); the videos from data.root (metadata.jsonl, at data.fps and data.height x data.width). Each step
reconstructs a batch of random clips (1 + 8k frames; random crops, since the VAE is convolutional and crops make a
CPU step several times cheaper) through the posterior sample, with loss L1 + hard_weight x (mean L1 of the worst
hard_fraction of pixels) + kl_weight x KL. L1, not MSE: the toy world's backdrops are dark and desaturated, so
colour errors are small in MSE and an MSE-trained VAE learns luma long before colour. The worst-pixel term: the
characters cover a few percent of the frame, and with L1 alone the VAE learned the backdrops and blurred the
characters into grey blobs (docs/default_model.md has the comparison). At the end the latents' spread on whole
frames sets the VAE's `scaling_factor` (latents x scaling_factor have unit variance, as diffusion expects), the
held-out video's reconstruction PSNR is reported, and the VAE is saved with save_pretrained to
model.builder_args.vae_dir (atomically).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import save_pretrained_atomically
from ..data.format import DatasetError, read_metadata
from ..training.config import Config, load_config
from ..video_io import read_video
from .model import new_vae, toy_args

logger = logging.getLogger("vae_training")
INITIAL_LOGVAR = -6.0


def load_frames(cfg: Config, max_videos: int) -> list[np.ndarray]:
    """Up to max_videos + 1 videos of data.root as (F, H, W, 3) uint8 arrays, checked against data.fps/size."""
    root = Path(cfg.data.root)
    frames = []
    for record in read_metadata(root)[: max_videos + 1]:
        video, fps = read_video(root / record.video)
        if abs(fps - cfg.data.fps) > 1e-3 or video.shape[1:3] != (cfg.data.height, cfg.data.width):
            raise DatasetError(f"{root / record.video}: {video.shape[2]}x{video.shape[1]} at {fps:g} fps; the VAE "
                               f"trainer expects data.width x data.height = {cfg.data.width}x{cfg.data.height} at "
                               f"data.fps = {cfg.data.fps}")
        frames.append(video)
    if len(frames) < 2:
        raise DatasetError(f"{root}: at least 2 videos needed (one is held out), found {len(frames)}")
    return frames


def random_clips(videos: list[np.ndarray], batch: int, frames: int, crop: int, rng: np.random.Generator
                 ) -> torch.Tensor:
    """(batch, 3, frames, crop, crop) in [-1, 1]: random videos, start frames and crop positions."""
    clips = []
    for _ in range(batch):
        video = videos[rng.integers(len(videos))]
        t = rng.integers(0, len(video) - frames + 1)
        y, x = rng.integers(0, video.shape[1] - crop + 1), rng.integers(0, video.shape[2] - crop + 1)
        clips.append(video[t:t + frames, y:y + crop, x:x + crop])
    pixels = torch.from_numpy(np.stack(clips)).float() / 127.5 - 1.0  # (B, F, h, w, 3)
    return pixels.permute(0, 4, 1, 2, 3).contiguous()


def whole_clips(video: np.ndarray, frames: int, count: int) -> torch.Tensor:
    """(count, 3, frames, H, W) in [-1, 1]: evenly spaced full-size clips of one video."""
    starts = np.linspace(0, len(video) - frames, count).round().astype(int)
    pixels = torch.from_numpy(np.stack([video[s:s + frames] for s in starts])).float() / 127.5 - 1.0
    return pixels.permute(0, 4, 1, 2, 3).contiguous()


def train_vae(cfg: Config) -> dict:
    """Trains, calibrates and saves the VAE (see module docstring). Returns final loss, PSNR and scaling factor."""
    args = toy_args(cfg.model)
    run = args.vae_training
    if run.clip_frames < 9 or (run.clip_frames - 1) % 8:
        # the decoder upsamples time from an odd number of latents (1 + 2j -> 1 + 8j frames), as in sampling
        raise ValueError(f"model.builder_args.vae_training.clip_frames: expected 1 + 8k frames (k >= 1), got "
                         f"{run.clip_frames}")
    spatial = 2 ** (args.vae.down_blocks - 1)
    if run.crop % spatial or run.crop > min(cfg.data.height, cfg.data.width):
        raise ValueError(f"model.builder_args.vae_training.crop: expected a multiple of {spatial} up to the frame "
                         f"size, got {run.crop}")
    videos = load_frames(cfg, run.max_videos)
    held_out, videos = videos[-1], videos[:-1]
    logger.info("training the VAE on %d videos (%d frames), holding out one", len(videos), sum(map(len, videos)))

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vae = new_vae(args.vae, cfg.data).train()
    with torch.no_grad():
        # start with a near-deterministic posterior (std e^-3): at logvar 0 the sampled latents are mostly noise and
        # the decoder spends hundreds of steps learning to ignore them before it learns colour
        vae.encoder.conv_out.conv.bias[args.vae.latent_channels:].fill_(INITIAL_LOGVAR)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=run.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(run.warmup_steps, 1))
                                                 * 0.5 * (1 + math.cos(math.pi * min(s / run.steps, 1.0))))
    start, running = time.perf_counter(), torch.zeros(())
    for step in range(1, run.steps + 1):
        x = random_clips(videos, run.batch_size, run.clip_frames, run.crop, rng)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        error = (reconstruction - x).abs().mean(dim=1)  # per pixel (B, F, h, w)
        l1 = error.mean()
        hard = error.flatten().topk(max(1, int(run.hard_fraction * error.numel()))).values.mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()  # per latent element
        loss = l1 + run.hard_weight * hard + run.kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        running += l1.detach()
        if step % run.log_every == 0 or step == run.steps:
            count = run.log_every if step % run.log_every == 0 else step % run.log_every
            logger.info("step %d/%d  l1 %.5f  (%.2f s/step)", step, run.steps, running.item() / count,
                        (time.perf_counter() - start) / step)
            running.zero_()

    vae.eval()
    with torch.no_grad():
        clips = whole_clips(held_out, run.clip_frames, 4)
        posterior = vae.encode(clips).latent_dist
        std = posterior.mode().std().item()
        reconstruction = vae.decode(posterior.mode()).sample.clamp(-1, 1)
        mse = ((reconstruction - clips) / 2).pow(2).mean().item()  # in [0, 1] pixel units
    psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
    vae.register_to_config(scaling_factor=1.0 / std)
    save_pretrained_atomically(vae, args.vae_dir)
    result = {"held_out_psnr_db": psnr, "scaling_factor": 1.0 / std, "steps": run.steps,
              "seconds": time.perf_counter() - start}
    logger.info("saved %s: held-out PSNR %.2f dB, scaling_factor %.4f", args.vae_dir, psnr, 1.0 / std)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.toy.vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML under configs/toy/")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model.builder_args.vae_training.steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_vae(load_config(args.config, args.overrides))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
