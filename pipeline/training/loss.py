"""The diffusion objective: CogVideoX's v-prediction with its noise schedule and loss weighting.

Per sample: a latent drawn from the VAE posterior (times the VAE's scaling factor), a timestep t uniform in
[0, num_train_timesteps) (train.noise can narrow it), noise ε; x_t = add_noise(x_0, ε, t) (scaled-linear betas
0.00085 → 0.012 with zero-SNR rescale, CogVideoXDDIMScheduler). The model predicts v; get_velocity(v, x_t, t) =
√ᾱ_t x_t − √(1−ᾱ_t) v is its x_0 estimate, and the loss is the x_0-space squared error weighted by 1 / (1 − ᾱ_t),
which equals the v-space error (CogVideoX's training scripts compute it this way, as diffusers' examples/cogvideo do).

Per-segment noise levels (`NoiseConfig`, docs/training.md): the batch then carries timesteps (B, n), one level per
segment, and each latent frame is noised, predicted and weighted at its own segment's level; clean context segments
(t = 0) enter as they are and are masked out of the loss, so they contribute neither loss nor gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import CogVideoXDDIMScheduler
from torch.utils.data import default_collate

from models.layout import frame_segments

from .config import NoiseConfig


class DiffusionCollate:
    """Collate dataset items and draw each sample's randomness from its own seed, on the CPU (in the loader workers).

    The batch holds latents (B, T, C, h, w) = (mean + exp(logvar / 2) ε') x scaling_factor, noise (B, T, C, h, w),
    timesteps (B,) int64, text (B, n, L, D), text_mask (B, n, L), scene_start (B, n), and names (B strings, where
    each sample comes from, for error messages), and loss_mask (B, T, h, w) when the items carry one (a dataset with
    masks and train.mask_weight > 0), told_text (B, n, L, D), told_text_mask (B, n, L) and told (B,) bool when they
    carry those (data.told_cache). Drawing from per-sample seeds
    makes a sample's noise independent of the batch it lands in, the process that loads it and the device.
    With a `NoiseConfig` other than uniform only (which needs the model's latent_frames_per_segment), timesteps are
    (B, n), one level per segment, and the batch adds frame_timesteps (B, T) and frame_noisy (B, T) bool (False on
    clean context frames).
    """

    def __init__(self, num_train_timesteps: int, scaling_factor: float, noise: NoiseConfig | None = None,
                 latent_frames_per_segment: int | None = None):
        self.num_train_timesteps, self.scaling_factor = num_train_timesteps, scaling_factor
        self.noise = noise or NoiseConfig()
        if not self.noise.is_uniform and latent_frames_per_segment is None:
            raise ValueError("per-segment noise levels need latent_frames_per_segment (the model's)")
        self.frames_per_segment = latent_frames_per_segment
        self.t_min, self.t_max = self.noise.t_min, self.noise.t_max or num_train_timesteps
        if self.t_max > num_train_timesteps or self.t_min >= self.t_max:
            raise ValueError(f"train.noise: expected 0 <= t_min < t_max <= the scheduler's {num_train_timesteps} "
                             f"timesteps, got t_min {self.t_min}, t_max {self.noise.t_max}")
        context_t_min = self.noise.context_t_min
        if context_t_min is not None and not 0 <= context_t_min < self.t_max:
            raise ValueError(f"train.noise.context_t_min: expected 0 <= context_t_min < t_max ({self.t_max}), "
                             f"got {context_t_min}")

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        latents, noise, timesteps, frame_timesteps, frame_noisy = [], [], [], [], []
        for item in items:
            generator = torch.Generator().manual_seed(int(item["seed"]))
            mean, logvar = item["latent_mean"], item["latent_logvar"]
            sample = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
            latents.append(sample * self.scaling_factor)
            noise.append(torch.randn(mean.shape, generator=generator))
            timesteps.append(torch.randint(self.t_min, self.t_max, (), generator=generator))
            if not self.noise.is_uniform:  # drawn after the uniform draws, which stay what they always were
                num_segments = item["text"].shape[0]
                timesteps[-1], clean = self._segment_levels(timesteps[-1], num_segments, generator)
                first = mean.shape[0] - (num_segments - 1) * self.frames_per_segment  # the first segment's frames
                frame_segment = frame_segments(num_segments, first, self.frames_per_segment)
                frame_timesteps.append(timesteps[-1][frame_segment])
                frame_noisy.append(~clean[frame_segment])
        texts = ("text", "text_mask", "scene_start", *(("told_text", "told_text_mask", "told")
                                                       if "told_text" in items[0] else ()))
        batch = default_collate([{k: item[k] for k in texts} for item in items])
        batch.update(latents=torch.stack(latents), noise=torch.stack(noise), timesteps=torch.stack(timesteps),
                     names=[str(item.get("name", "?")) for item in items])
        if "loss_mask" in items[0]:
            batch["loss_mask"] = torch.stack([item["loss_mask"] for item in items])
        if not self.noise.is_uniform:
            batch.update(frame_timesteps=torch.stack(frame_timesteps), frame_noisy=torch.stack(frame_noisy))
        return batch

    def _segment_levels(self, level: torch.Tensor, n: int, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A mode by the config's probabilities → levels (n,) int64 and clean (n,) bool."""
        cfg = self.noise
        u = torch.rand((), generator=generator).item()
        clean = torch.zeros(n, dtype=torch.bool)
        if u < cfg.uniform:
            return level.expand(n).clone(), clean
        if u < cfg.uniform + cfg.independent:
            return torch.randint(self.t_min, self.t_max, (n,), generator=generator), clean
        draws = torch.rand(n, generator=generator)
        if cfg.context_t_min is not None:  # its own range: one more draw, after those that were always made
            level = torch.randint(cfg.context_t_min, self.t_max, (), generator=generator)
        clean = draws < torch.tensor([cfg.context_first] + [cfg.context_rate] * (n - 1))
        if clean.all():  # at least one segment to learn from
            clean[torch.randint(0, n, (), generator=generator)] = False
        return torch.where(clean, 0, level.expand(n)), clean



@dataclass
class LossTerms:
    """What one batch's loss is made of: per_sample (B,) float32 (what is optimised), per_frame (B, T) the weighted
    squared error per latent frame (0 on clean context frames), noisy (B, T) bool (False on clean context frames);
    with a loss mask in the batch, masked_frame (B, T) the mask-weighted sum of the weighted squared errors per frame
    and mask_frame (B, T) the mask's sum over the frame's elements (both 0 on clean context frames); given the model's
    frames per segment, boundary_frames (B, T) bool, the noisy first latent frames of the segments that continue a
    scene (`continuing_first_frames`); with train.told_weight, told_frame (B, T) the weighted squared distance per
    frame from the prediction given the told texts, and told_frames (B, T) bool, the frames it counts on."""

    per_sample: torch.Tensor
    per_frame: torch.Tensor
    noisy: torch.Tensor
    masked_frame: torch.Tensor | None = None
    mask_frame: torch.Tensor | None = None
    boundary_frames: torch.Tensor | None = None
    told_frame: torch.Tensor | None = None
    told_frames: torch.Tensor | None = None

    def later_segments(self, num_segments: int, frames_per_segment: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) of the per-frame loss over the noisy frames of segments 2..n: in the toy world's story
        captions those are where a character is named without its look, so only memory can lower it."""
        later = self._later(num_segments, frames_per_segment)
        return (self.per_frame * later).sum(), later.sum()

    def later_masked(self, num_segments: int, frames_per_segment: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum, weight) of the mask-weighted error over the noisy frames of segments 2..n (in the toy world: the
        characters' error where only memory can tell their looks); None without a loss mask."""
        if self.masked_frame is None:
            return None
        later = self._later(num_segments, frames_per_segment)
        return (self.masked_frame * later).sum(), (self.mask_frame * later).sum()

    def boundary(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum, count) of the per-frame loss over `boundary_frames`, where only memory can tell where the characters
        stood a moment before; None without them."""
        if self.boundary_frames is None:
            return None
        return (self.per_frame * self.boundary_frames).sum(), self.boundary_frames.sum()

    def told(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum, count) of the per-frame distance from the told prediction over `told_frames`; None without it."""
        if self.told_frame is None:
            return None
        return (self.told_frame * self.told_frames).sum(), self.told_frames.sum()

    def _later(self, num_segments: int, frames_per_segment: int) -> torch.Tensor:
        first = self.per_frame.shape[1] - (num_segments - 1) * frames_per_segment
        later = self.noisy.clone()
        later[:, :first] = False
        return later


def continuing_first_frames(scene_start: torch.Tensor, num_frames: int, frames_per_segment: int) -> torch.Tensor:
    """(B, T) bool: the first latent frame of each segment 2..n that continues its scene (scene_start (B, n) False
    there), for sequences of num_frames latent frames whose segments 2..n have frames_per_segment each."""
    num_segments = scene_start.shape[1]
    first = num_frames - (num_segments - 1) * frames_per_segment  # the first segment's frames
    marks = torch.zeros(scene_start.shape[0], num_frames, dtype=torch.bool, device=scene_start.device)
    starts = first + frames_per_segment * torch.arange(num_segments - 1, device=scene_start.device)
    marks[:, starts] = ~scene_start[:, 1:].bool()
    return marks


def diffusion_loss(model: torch.nn.Module, scheduler: CogVideoXDDIMScheduler, batch: dict[str, torch.Tensor],
                   hard_fraction: float = 0.0, hard_weight: float = 0.0, mask_weight: float = 0.0,
                   mask_dilate: int = 0, boundary_weight: float = 0.0,
                   frames_per_segment: int | None = None, told_weight: float = 0.0) -> torch.Tensor:
    """Per-sample weighted loss (B,) float32 for a `DiffusionCollate` batch (see the module docstring)."""
    return diffusion_terms(model, scheduler, batch, hard_fraction, hard_weight, mask_weight, mask_dilate,
                           boundary_weight, frames_per_segment, told_weight).per_sample


def diffusion_terms(model: torch.nn.Module, scheduler: CogVideoXDDIMScheduler, batch: dict[str, torch.Tensor],
                    hard_fraction: float = 0.0, hard_weight: float = 0.0, mask_weight: float = 0.0,
                    mask_dilate: int = 0, boundary_weight: float = 0.0,
                    frames_per_segment: int | None = None, told_weight: float = 0.0,
                    teacher: torch.nn.Module | None = None) -> LossTerms:
    """`diffusion_loss` with its parts (`LossTerms`).

    hard_fraction, hard_weight (train.hard_fraction / train.hard_weight): each sample's loss gains hard_weight times
    the mean of its largest hard_fraction of weighted squared errors (over its noisy frames' latent elements). In the
    toy world the backdrop is most of every frame and easy; the characters are few elements with large errors, and
    this term makes them count (the VAE's worst-pixel term, docs/default_model.md). 0 (default): the plain loss.

    mask_weight (train.mask_weight): with batch["loss_mask"] (B, T, h, w), each sample's loss gains mask_weight times
    the mask-weighted mean of its weighted squared errors over its noisy frames (every channel of a latent position
    weighted by the mask there; a sample whose noisy frames have no mask gains 0). Where the mask marks the toy world's
    characters, a few percent of a frame, their error then counts mask_weight times as much as the whole frame's.
    mask_dilate (train.mask_dilate): first grow the mask by that many latent positions in each spatial direction (each
    position takes the largest value within that distance in the frame): the ring of backdrop around a subject then
    counts too, so drawing it too large costs as drawing it wrong does. Masks and logged terms use the grown mask.

    boundary_weight (train.boundary_weight), with the model's latent frames_per_segment: each sample's loss gains
    boundary_weight times the mean weighted squared error over the first latent frame of each noisy segment that
    continues a scene (segments 2..n whose scene_start is False; a sample without one gains 0). Segment windows share
    no frame, so at high noise only memory can tell where a scene's characters stood when the segment before ended.

    told_weight (train.told_weight), with batch["told_text"] (data.told_cache: the same segments' texts in a
    register that tells everything on screen, the toy world's dense one), the model's frames_per_segment and more than
    one segment: the same model (or `teacher`, train.told_teacher "initial": a frozen copy of it as training started),
    without gradient, predicts the same noisy input again from the told texts; each sample whose texts are its own
    (batch["told"]: not dropped, not mixed) gains told_weight times the mean weighted squared distance of its x_0
    estimate from that told one over the noisy frames of segments 2..n (plus mask_weight times the mask-weighted mean,
    as the loss's own term). Where the story text only names a character, the told prediction draws the look the text
    would have told: a target for memory that holds the look without the noise of where exactly the character is on
    screen, which the ground truth's error carries at high noise. The model's own told prediction moves with it, so it
    can also close the distance by heeding every text less; a frozen teacher's cannot.
    """
    if boundary_weight > 0 and frames_per_segment is None:
        raise ValueError("train.boundary_weight > 0 needs the model's latent_frames_per_segment")
    if told_weight > 0 and frames_per_segment is None:
        raise ValueError("train.told_weight > 0 needs the model's latent_frames_per_segment")
    told = told_weight > 0 and batch["text"].shape[1] > 1
    if told and "told_text" not in batch:
        raise ValueError("train.told_weight > 0 needs the batch's told_text (data.told_cache)")
    boundary_frames = told_frame = told_frames = None
    hard = hard_fraction > 0 and hard_weight > 0
    masked = "loss_mask" in batch
    if mask_weight > 0 and not masked:
        raise ValueError("train.mask_weight > 0 needs the batch's loss_mask (a dataset with mask videos)")
    errors, noisy, per_frame, per_sample, prediction = _weighted_errors(model, scheduler, batch,
                                                                        elements=hard or masked)
    masked_frame = mask_frame = mask = None
    if masked:
        mask = batch["loss_mask"].float()  # (B, T, h, w)
        if mask_dilate > 0:
            size = 2 * mask_dilate + 1
            mask = torch.nn.functional.max_pool2d(mask.flatten(0, 1), size, stride=1, padding=mask_dilate).view_as(mask)
        mask = mask * noisy[:, :, None, None]  # 0 on clean frames
        masked_frame = (errors * mask[:, :, None]).sum(dim=(2, 3, 4))  # (B, T)
        mask_frame = mask.sum(dim=(2, 3)) * errors.shape[2]  # every channel of a position
        if mask_weight > 0:
            per_sample = per_sample + mask_weight * masked_frame.sum(dim=1) / mask_frame.sum(dim=1).clamp(min=1e-8)
    if hard:
        flat = torch.where(noisy[:, :, None, None, None], errors, torch.zeros((), device=errors.device)).flatten(1)
        per_element = errors[0].numel() // errors.shape[1]
        k = (noisy.sum(dim=1) * per_element * hard_fraction).round().clamp(min=1).long()  # (B,)
        top = flat.topk(int(k.max()), dim=1).values  # (B, k_max), descending
        take = torch.arange(top.shape[1], device=top.device)[None] < k[:, None]
        per_sample = per_sample + hard_weight * (top * take).sum(dim=1) / k
    if frames_per_segment is not None:
        boundary_frames = continuing_first_frames(batch["scene_start"], per_frame.shape[1], frames_per_segment) & noisy
        if boundary_weight > 0:
            per_sample = per_sample + boundary_weight * ((per_frame * boundary_frames).sum(dim=1)
                                                         / boundary_frames.sum(dim=1).clamp(min=1))
    if told:
        with torch.no_grad():
            told_batch = {**batch, "text": batch["told_text"], "text_mask": batch["told_text_mask"]}
            target = predict_v(model if teacher is None else teacher, scheduler, told_batch)
        # the weighted squared distance of the x_0 estimates, (√(1 - ᾱ_t) Δv)² / (1 - ᾱ_t): that of the predictions
        distance = (prediction - target).pow(2)  # (B, T, C, h, w)
        first = per_frame.shape[1] - (batch["text"].shape[1] - 1) * frames_per_segment
        told_frames = noisy & batch["told"][:, None]
        told_frames[:, :first] = False  # segments 2..n
        told_frame = distance.flatten(2).mean(dim=2)
        term = (told_frame * told_frames).sum(dim=1) / told_frames.sum(dim=1).clamp(min=1)
        if mask is not None and mask_weight > 0:
            on = mask * told_frames[:, :, None, None]
            term = term + mask_weight * ((distance * on[:, :, None]).sum(dim=(1, 2, 3, 4))
                                         / (on.sum(dim=(1, 2, 3)) * distance.shape[2]).clamp(min=1e-8))
        per_sample = per_sample + told_weight * term
    return LossTerms(per_sample, per_frame, noisy, masked_frame, mask_frame, boundary_frames, told_frame, told_frames)


def predict_v(model: torch.nn.Module, scheduler: CogVideoXDDIMScheduler,
              batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's v prediction (B, T, C, h, w) float32 for a `DiffusionCollate` batch, noised as the loss noises it:
    the told term's target, and what benchmarks/text_dependence.py compares across texts."""
    return _weighted_errors(model, scheduler, batch)[4]


def _weighted_errors(model: torch.nn.Module, scheduler: CogVideoXDDIMScheduler, batch: dict[str, torch.Tensor],
                     elements: bool = False) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
    """(errors, noisy, per_frame, per_sample, prediction): (1 / (1 - ᾱ_t)) (x0_pred - x0)^2 per latent element
    (B, T, C, h, w) float32 (with one level per sample only when `elements`: otherwise None, no extra tensor of the
    latents' size), which frames are noisy (B, T), the per-frame mean (B, T) (0 on clean frames), the per-sample loss
    (B,) over the noisy frames, in the original objective's order of operations; and the model's v prediction
    (B, T, C, h, w) float32."""
    latents, noise = batch["latents"], batch["noise"]
    if "frame_timesteps" not in batch:  # one level per sample: the original objective
        timesteps = batch["timesteps"]
        noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, T, C, h, w)
        prediction = model(hidden_states=noisy, encoder_hidden_states=batch["text"], timestep=timesteps,
                           encoder_attention_mask=batch["text_mask"], scene_start=batch["scene_start"],
                           return_dict=False)[0]
        x0 = scheduler.get_velocity(prediction.float(), noisy.float(), timesteps)  # v → x_0 estimate
        alphas_cumprod = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps]  # (B,)
        weights = 1.0 / (1.0 - alphas_cumprod)
        squared = (x0 - latents.float()).pow(2)
        all_frames = torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device)
        errors = weights[:, None, None, None, None] * squared if elements else None
        return (errors, all_frames, weights[:, None] * squared.flatten(2).mean(dim=2),
                weights * squared.flatten(1).mean(dim=1), prediction.float())
    # a level per segment: each frame noised and weighted at its segment's level; clean frames enter as the clean
    # latents (exactly as the sampler gives them) and are left out of the loss
    noisy_frames = batch["frame_noisy"]
    alphas_cumprod = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
    a = alphas_cumprod[batch["frame_timesteps"]][:, :, None, None, None]  # (B, T, 1, 1, 1)
    noisy = (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)
    noisy = torch.where(~noisy_frames[:, :, None, None, None], latents, noisy)
    prediction = model(hidden_states=noisy, encoder_hidden_states=batch["text"], timestep=batch["timesteps"],
                       encoder_attention_mask=batch["text_mask"], scene_start=batch["scene_start"],
                       return_dict=False)[0]
    x0 = a.sqrt() * noisy.float() - (1 - a).sqrt() * prediction.float()  # v → x_0 estimate
    errors = (x0 - latents.float()).pow(2) / (1 - a)
    per_frame = torch.where(noisy_frames, errors.flatten(2).mean(dim=2), torch.zeros((), device=errors.device))
    return (errors, noisy_frames, per_frame, per_frame.sum(dim=1) / noisy_frames.sum(dim=1).clamp(min=1),
            prediction.float())
