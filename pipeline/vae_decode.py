"""The windowed VAE decode: a minute of latents decoded window by window with the CogVideoX VAE's causal conv cache
carried from window to window, so the video never sits on the device as one float tensor and has no seams."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from diffusers import AutoencoderKLCogVideoX


def frame_batches(vae: AutoencoderKLCogVideoX, num_latent_frames: int) -> list[tuple[int, int]]:
    """The latent frame ranges the CogVideoX VAE decodes together (its `_decode`): the first batch takes the odd
    frames out, then num_latent_frames_batch_size frames each. Each range is one call of the decoder, whose
    GroupNorms see all frames of that call, so any other split would change the pixels."""
    size = vae.num_latent_frames_batch_size
    remainder = num_latent_frames % size
    ends = [size * (i + 1) + remainder for i in range(max(num_latent_frames // size, 1))]
    starts = [0] + ends[:-1]
    return [(s, min(e, num_latent_frames)) for s, e in zip(starts, ends)]


def onload(vae: AutoencoderKLCogVideoX) -> None:
    """Runs the model CPU offload hook that `vae.forward` would (it moves the VAE to the device), for callers of the
    VAE's other methods (encode, the decoder's parts); nothing without offload."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


@torch.no_grad()
def decode_windows(vae: AutoencoderKLCogVideoX, latents: torch.Tensor, decode_window: int) -> Iterator[torch.Tensor]:
    """Decodes latents (B, T, C, h, w) window by window, carrying the VAE's causal conv cache across windows.

    decode_window: latent frames per window (rounded to whole VAE frame batches, at least one). Yields pixel windows
    (B, 3, F_w, H, W) in [-1, 1] whose concatenation along frames equals `vae.decode` of the whole sequence, with or
    without `vae.enable_tiling()` / `enable_slicing()`.
    """
    onload(vae)  # vae.decode would trigger it; we call the decoder's parts directly
    z = latents.to(vae.dtype).permute(0, 2, 1, 3, 4) / vae.config.scaling_factor  # (B, C, T, h, w)
    slices = list(z.split(1)) if vae.use_slicing and z.shape[0] > 1 else [z]
    caches: list[Any] = [None] * len(slices)
    window: list[tuple[int, int]] = []
    batches = frame_batches(vae, z.shape[2])
    for k, (start, end) in enumerate(batches):
        window.append((start, end))
        if k + 1 < len(batches) and batches[k + 1][1] - window[0][0] <= decode_window:
            continue
        parts = []
        for s, z_slice in enumerate(slices):
            frames = []
            for a, b in window:
                pixels, caches[s] = _decode_frame_batch(vae, z_slice[:, :, a:b], caches[s])
                frames.append(pixels)
            parts.append(torch.cat(frames, dim=2))
        window = []
        yield torch.cat(parts, dim=0)


def _decode_frame_batch(vae: AutoencoderKLCogVideoX, z: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One decoder call on z (B, C, t, h, w) → (B, 3, f, H, W), tiled as the VAE's `tiled_decode` when tiling is on
    (one conv cache per tile then).

    One difference: `tiled_decode` keeps tile_sample_min * (1 - overlap) pixels of each tile and blends
    tile_sample_min * overlap, which adds up to the frame only when that equals its latent step (rounded down) times
    the VAE's spatial scale — true for CogVideoX's 480x720 tiles, not for small models (the default 64x64 model came
    out 70x68). Here each tile keeps exactly its latent step's pixels and blends the rest of the tile, which is the
    same where tiled_decode adds up and the frame's own size everywhere."""
    height, width = z.shape[-2:]
    if not (vae.use_tiling and (width > vae.tile_latent_min_width or height > vae.tile_latent_min_height)):
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z, conv_cache=cache)
    cache = cache or {}
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent, as enable_tiling computes it
    step_h = max(1, int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor_height)))
    step_w = max(1, int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor_width)))
    keep_h, keep_w = step_h * scale, step_w * scale
    blend_h = max(vae.tile_latent_min_height * scale - keep_h, 0)
    blend_w = max(vae.tile_latent_min_width * scale - keep_w, 0)
    rows = []
    for i in range(0, height, step_h):
        row = []
        for j in range(0, width, step_w):
            tile = z[:, :, :, i: i + vae.tile_latent_min_height, j: j + vae.tile_latent_min_width]
            if vae.post_quant_conv is not None:
                tile = vae.post_quant_conv(tile)
            tile, cache[i, j] = vae.decoder(tile, conv_cache=cache.get((i, j)))
            row.append(tile)
        rows.append(row)
    # blend each tile with the one above and the one to its left (in place, as tiled_decode does), then crop
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend_h)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend_w)
            out_row.append(tile[:, :, :, :keep_h, :keep_w])
        out_rows.append(torch.cat(out_row, dim=4))
    return torch.cat(out_rows, dim=3), cache
