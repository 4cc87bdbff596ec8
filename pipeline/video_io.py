"""Video files: write frames to mp4 with PyAV (atomically) and read them back."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from .atomic import atomic_path


def to_uint8_frames(frames) -> np.ndarray:
    """One video's frames as a (F, H, W, 3) uint8 array.

    frames: a (F, H, W, 3) numpy array (float in [0, 1] or uint8), a (F, 3, H, W) torch tensor in [0, 1], or a list
    of PIL images or of (H, W, 3) arrays — the pipeline's "np", "pt" and "pil" outputs for one video, and what
    diffusers' export_to_video takes.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    elif isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in frames])
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected (F, H, W, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return frames


def check_output_path(path: str | os.PathLike) -> Path:
    """Checks, before any long work, that `write_video` can write `path`: an .mp4 name (the container is mp4), not a
    folder, in a folder that exists or can be created and that may be written to. Raises ValueError in one line."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: expected a file name ending in .mp4")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected an .mp4 file name")
    folder = path.parent
    while not folder.exists() and not folder.is_symlink():  # the nearest existing folder above it
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: cannot create its folder, {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write in {folder} (permission denied)")
    return path


def write_video(frames, path: str | os.PathLike, fps: float, crf: int = 18) -> Path:
    """Encodes frames to an H.264 mp4 at `fps` (fractional rates are kept exactly, e.g. 8/3).

    frames: see `to_uint8_frames`; height and width must be even (yuv420p). The file is written under a temporary
    name in the same folder and renamed, so `path` is never half-written. The same frames give the same file in any
    process: libx264's macroblock-tree rate control is off, since with it the file depended on what the process had
    done before (frames decoded up to 26/255 apart, measured: docs/sampling.md, "Writing the video").
    """
    frames = to_uint8_frames(frames)
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError("frames: expected at least one frame")
    if height % 2 or width % 2:
        raise ValueError(f"frames: height and width must be even for H.264 (yuv420p), got {height}x{width}")
    if fps <= 0:
        raise ValueError(f"fps: expected a positive number, got {fps}")
    path = Path(path)
    with atomic_path(path, suffix=".mp4.tmp") as tmp, av.open(os.fspath(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decodes a video file. Returns (frames (F, H, W, 3) uint8, fps)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate or stream.base_rate)
    return np.stack(frames), fps
