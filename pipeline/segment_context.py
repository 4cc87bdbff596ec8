"""Clean context segments for sampling: extend a video, regenerate some of its segments, or start from a reference clip.

The transformer takes one noise level per segment (docs/model.md, "Per-segment noise levels"); a segment at t = 0 is
clean context. `SegmentContext` says which segments of the sequence the sampler keeps, and holds their clean latents;
`TTTVideoPipeline` feeds them at t = 0 and re-sets them after every scheduler step, so only the other segments are
denoised and the kept latents leave the loop unchanged. Uses (docs/sampling.md):
- extend: a video of the first k segments, a storyboard of n > k; segments k+1..n are generated.
- regenerate: a video of the whole storyboard and the segments to redo; the others are kept.
- reference: a clip of r segments placed before segment 1 as clean context (with the null text); not in the output.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.layout import num_segments_for_frames

from .atomic import atomic_path
from .vae_decode import onload
from .video_io import read_video

VideoInput = torch.Tensor | np.ndarray | list[PIL.Image.Image]


@dataclass(frozen=True)
class SegmentContext:
    """Which segments of an n-segment sequence stay clean, and their latents.

    latents: (1, T, C, h, w) over the whole sequence (frames of generated segments are ignored);
    keep: (n,) bool on the latents' device, True for a clean (kept) segment.
    """

    latents: torch.Tensor
    keep: torch.Tensor

    def keep_frames(self, frame_segment: torch.Tensor) -> torch.Tensor:
        """(1, T, 1, 1, 1) bool over latent frames, from the layout's frame_segment (T,)."""
        return self.keep[frame_segment][None, :, None, None, None]

    def timesteps(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch, n) per-segment levels: 0 for kept segments, t for the others."""
        return torch.where(self.keep, torch.zeros_like(t), t).expand(batch, -1)


def latent_segments(latents: torch.Tensor, frames_first: int, frames_per_segment: int, what: str) -> int:
    """Segments covered by latents (1, T, C, h, w); a clear error when T is not a whole number of segments."""
    k = num_segments_for_frames(latents.shape[1], frames_first, frames_per_segment)
    if k is None:
        raise ValueError(f"{what}: {latents.shape[1]} latent frames are not a whole number of segments "
                         f"({frames_first} for the first, {frames_per_segment} for each further one)")
    return k


def segments_in_video(count: int, temporal: int, frames_first: int, frames_per_segment: int) -> int | None:
    """Segments covered by `count` video frames (temporal * (T - 1) + 1 for T latent frames), None when they are not
    a whole number of segments."""
    if (count - 1) % temporal:
        return None
    return num_segments_for_frames((count - 1) // temporal + 1, frames_first, frames_per_segment)


@torch.no_grad()
def encode_video(vae, video_processor, frames: VideoInput, height: int, width: int, frames_first: int,
                 frames_per_segment: int, what: str = "video") -> torch.Tensor:
    """Frames of whole segments → latents (1, T, C, h, w), scaled by the VAE's scaling factor (the mean of the
    posterior: the same frames always give the same latents). Never differentiated: with autograd on, the VAE's
    activations for every frame would be kept with the latents (about 3 GB for a 60-s toy video).

    frames: (F, H, W, 3) uint8 or float in [0, 1] array, (F, 3, H, W) tensor in [0, 1], or a list of PIL images, with
    F = 4 (T - 1) + 1 for the T latent frames of whole segments; they must be height x width already (a video is kept
    as it is or refused, never resized).
    """
    temporal = vae.config.temporal_compression_ratio
    count = len(frames)
    if not segments_in_video(count, temporal, frames_first, frames_per_segment):
        per = frames_per_segment * temporal
        raise ValueError(f"{what}: {count} frames are not a whole number of segments ({per} k + 1 frames: "
                         f"{per + 1}, {2 * per + 1}, {3 * per + 1}, ...)")
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
        frames = frames.astype(np.float32) / 255.0
    video = video_processor.preprocess_video([frames])  # (1, 3, F, H, W) in [-1, 1]
    if tuple(video.shape[-2:]) != (height, width):
        raise ValueError(f"{what}: frames are {video.shape[-1]}x{video.shape[-2]}, the pipeline makes "
                         f"{width}x{height}")
    onload(vae)  # model CPU offload moves the VAE in on its forward; encode is not one
    video = video.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(video).latent_dist.mode() * vae.config.scaling_factor  # (1, C, T, h, w)
    return latents.permute(0, 2, 1, 3, 4)


def parse_segment_list(text: str, num_segments: int, flag: str = "--regenerate") -> list[int]:
    """"3,5" (1-based, as users count) → [2, 4] (0-based), checked against num_segments."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"{flag}: expected segment numbers like 3,5, got {text!r}")
        number = int(part)
        if not 1 <= number <= num_segments:
            raise ValueError(f"{flag}: segment {number} is out of range: the video has segments 1 to {num_segments}")
        out.append(number - 1)
    return sorted(set(out))


def latents_path(video_path: str | os.PathLike) -> str:
    """Where sample.py keeps a video's final latents: OUT.mp4 → OUT.latents.safetensors."""
    root, _ = os.path.splitext(os.fspath(video_path))
    return f"{root}.latents.safetensors"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_latents(latents: torch.Tensor, path: str | os.PathLike, video: str | os.PathLike | None = None) -> None:
    """Writes latents (1, T, C, h, w) as safetensors, atomically (temporary name, then rename). video: the mp4 they
    were decoded to; its hash is stored so that the latents are only ever used for that exact file."""
    metadata = {} if video is None else {"video_sha256": file_sha256(video)}
    with atomic_path(path) as tmp:
        save_file({"latents": latents.detach().to("cpu", torch.float32).contiguous()}, tmp, metadata=metadata)


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, str | None]:
    """Reads latents written by `save_latents`: (1, T, C, h, w) float32 and the hash of their mp4 (or None)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "latents" not in f.keys():
                raise ValueError
            latents = f.get_tensor("latents")
    except Exception:
        raise ValueError(f"{path}: not a latents file written by sample.py --save-latents") from None
    if latents.dim() != 5 or latents.shape[0] != 1:
        raise ValueError(f"{path}: not a latents file written by sample.py --save-latents")
    return latents, metadata.get("video_sha256")


def read_context_video(path: str | os.PathLike, pipe, what: str) -> tuple[torch.Tensor | np.ndarray, int, str]:
    """A video to keep segments of (or a reference clip), for `TTTVideoPipeline` at its default size.

    Returns (given, k, source): the latents saved beside it by `save_latents` (lossless) when they belong to this
    exact file, else its frames (F, H, W, 3) uint8 (the pipeline encodes them with the VAE); k, the segments it covers;
    source, "latents" or "frames". Raises ValueError (one line, naming `what` and the file) when its frame count or
    size does not fit the model.
    """
    frames, _ = read_video(path)
    config, scale = pipe.transformer.config, pipe.vae_scale_factor_spatial
    height, width = config.sample_height * scale, config.sample_width * scale
    if frames.shape[1:3] != (height, width):
        raise ValueError(f"{what} {path}: frames are {frames.shape[2]}x{frames.shape[1]}, the model makes "
                         f"{width}x{height}")
    temporal, per = pipe.vae_scale_factor_temporal, pipe.frames_per_segment
    count = len(frames)
    k = segments_in_video(count, temporal, config.latent_frames_first, config.latent_frames_per_segment)
    if not k:
        raise ValueError(f"{what} {path}: {count} frames are not a whole number of segments of this model "
                         f"({per} k + 1 frames: {per + 1}, {2 * per + 1}, ...)")
    saved = latents_path(path)
    if os.path.isfile(saved):
        latents, video_hash = load_latents(saved)
        if video_hash == file_sha256(path):
            expected = (1, pipe.transformer.num_latent_frames(k), config.in_channels, height // scale, width // scale)
            if tuple(latents.shape) != expected:
                raise ValueError(f"{what} {saved}: latents of shape {tuple(latents.shape)}, this model needs "
                                 f"{expected} for {path}")
            return latents, k, "latents"
    return frames, k, "frames"


def build_context(given: torch.Tensor | None, regenerate: Sequence[int], reference: torch.Tensor | None,
                  num_segments: int, frames_first: int, frames_per_segment: int,
                  full_shape: tuple[int, ...]) -> SegmentContext | None:
    """The SegmentContext of one call, or None when nothing is kept.

    given: (1, T_k, C, h, w) latents of the first k <= n storyboard segments; regenerate: 0-based storyboard segments
    of `given` to generate anew; reference: (1, T_r, C, h, w) latents of r segments put before segment 1 (not with
    `given`).
    num_segments: n (storyboard); full_shape: (1, T, C, h, w) of the whole sequence (reference + storyboard).
    """
    if given is None and reference is None:
        if regenerate:
            raise ValueError("regenerate: needs a video (video or video_latents) to keep the other segments of")
        return None

    def segments_of(latents: torch.Tensor, what: str) -> int:
        if tuple(latents.shape[2:]) != tuple(full_shape[2:]) or latents.shape[0] != 1:
            raise ValueError(f"{what}: latents of shape {tuple(latents.shape)} do not fit the pipeline's "
                             f"(1, T, {', '.join(map(str, full_shape[2:]))})")
        return latent_segments(latents, frames_first, frames_per_segment, what)

    if given is not None and reference is not None:
        raise ValueError("reference: cannot be combined with a video to extend or regenerate; give one of them")
    r = 0 if reference is None else segments_of(reference, "reference")
    k = 0 if given is None else segments_of(given, "video")
    if k > num_segments:
        raise ValueError(f"video: covers {k} segments, the storyboard has only {num_segments}")
    bad = [i + 1 for i in regenerate if not 0 <= i < k]
    if bad:
        raise ValueError(f"regenerate: segment {bad[0]} is out of range: the video has segments 1 to {k}")
    keep_story = [i < k and i not in set(regenerate) for i in range(num_segments)]
    if all(keep_story):
        raise ValueError(f"nothing left to generate: the video covers all {num_segments} segments of the storyboard "
                         "and none is to be regenerated")
    clean = reference if reference is not None else given
    latents = clean.new_zeros(full_shape)
    latents[:, : clean.shape[1]] = clean
    keep = torch.tensor([True] * r + keep_story, device=latents.device)
    return SegmentContext(latents=latents, keep=keep)
