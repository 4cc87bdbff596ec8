"""The diffusion objective: CogVideoX's v-prediction with its noise schedule and loss weighting.

Per sample: a latent drawn from the VAE posterior (times the VAE's scaling factor), a timestep t uniform in
[0, num_train_timesteps), noise ε; x_t = add_noise(x_0, ε, t) (scaled-linear betas 0.00085 → 0.012 with zero-SNR
rescale, CogVideoXDDIMScheduler). The model predicts v; get_velocity(v, x_t, t) = √ᾱ_t x_t − √(1−ᾱ_t) v is its
x_0 estimate, and the loss is the x_0-space squared error weighted by 1 / (1 − ᾱ_t), which equals the v-space error
(CogVideoX's training scripts compute it this way, as diffusers' examples/cogvideo do).
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXDDIMScheduler
from torch.utils.data import default_collate


class DiffusionCollate:
    """Collate dataset items and draw each sample's randomness from its own seed, on the CPU (in the loader workers).

    The batch holds latents (B, T, C, h, w) = (mean + exp(logvar / 2) ε') x scaling_factor, noise (B, T, C, h, w),
    timesteps (B,) int64, text (B, n, L, D), text_mask (B, n, L), scene_start (B, n), and names (B strings, where
    each sample comes from, for error messages). Drawing from per-sample seeds
    makes a sample's noise independent of the batch it lands in, the process that loads it and the device.
    """

    def __init__(self, num_train_timesteps: int, scaling_factor: float):
        self.num_train_timesteps, self.scaling_factor = num_train_timesteps, scaling_factor

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        latents, noise, timesteps = [], [], []
        for item in items:
            generator = torch.Generator().manual_seed(int(item["seed"]))
            mean, logvar = item["latent_mean"], item["latent_logvar"]
            sample = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
            latents.append(sample * self.scaling_factor)
            noise.append(torch.randn(mean.shape, generator=generator))
            timesteps.append(torch.randint(0, self.num_train_timesteps, (), generator=generator))
        batch = default_collate([{k: item[k] for k in ("text", "text_mask", "scene_start")} for item in items])
        batch.update(latents=torch.stack(latents), noise=torch.stack(noise), timesteps=torch.stack(timesteps),
                     names=[str(item.get("name", "?")) for item in items])
        return batch


def diffusion_loss(model: torch.nn.Module, scheduler: CogVideoXDDIMScheduler, batch: dict[str, torch.Tensor]
                   ) -> torch.Tensor:
    """Per-sample weighted loss (B,) float32 for a `DiffusionCollate` batch (see the module docstring)."""
    latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
    noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, T, C, h, w)
    prediction = model(hidden_states=noisy, encoder_hidden_states=batch["text"], timestep=timesteps,
                       encoder_attention_mask=batch["text_mask"], scene_start=batch["scene_start"],
                       return_dict=False)[0]
    x0 = scheduler.get_velocity(prediction.float(), noisy.float(), timesteps)  # v → x_0 estimate
    alphas_cumprod = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps]  # (B,)
    weights = 1.0 / (1.0 - alphas_cumprod)
    return weights * (x0 - latents.float()).pow(2).flatten(1).mean(dim=1)
