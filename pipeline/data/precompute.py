"""Precompute the training cache: VAE latent distributions and text embeddings of every 3-s segment.

    python -m pipeline.data.precompute --config configs/cogvideox-5b-ttt-mlp/3s.yaml [key=value ...]
    accelerate launch -m pipeline.data.precompute --config ...     # several processes/GPUs: videos split by rank

For every video of data.root/metadata.jsonl: decode with PyAV, resample to data.fps (nearest source frame), resize to
cover data.height x data.width and center-crop, then encode each segment separately as 1 + frames_per_segment
frames (its frames and the first frame of the next segment of the same scene; at a cut or at the end the last frame
is repeated) into the VAE posterior (mean, logvar), and encode each segment's text with the pipeline's
`encode_text`. A record with a mask video also gets its loss_mask: the mask decoded the same way and averaged over
each latent element's pixels (`pool_mask`). One safetensors file per video under data.cache/items/, written
atomically, so an interrupted run resumes where it stopped; unreadable videos are skipped and counted (the command
then exits non-zero, saying how many). data.cache/null.safetensors holds the null embedding (the encoded empty
text); data.cache/manifest.json records what produced the cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import av
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..atomic import atomic_path, atomic_write_text
from ..text_encoding import encode_text
from ..training.components import build_components, torch_dtype
from ..training.config import Config, ConfigError, load_config
from .format import (
    MANIFEST_FILE,
    NULL_FILE,
    SHAPE_FIELDS,
    DatasetError,
    VideoRecord,
    item_path,
    manifest_field,
    num_pixel_frames,
    read_manifest,
    read_metadata,
    shape_fields,
)

logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def segment_frame_times(record: VideoRecord, fps: int) -> list[list[float]]:
    """Per segment, the 1 + frames_per_segment times (seconds into the file) of the frames it is encoded from."""
    frames = num_pixel_frames(fps)
    times = []
    for j, segment in enumerate(record.segments):
        t = [segment.start + i / fps for i in range(frames + 1)]
        continues = j + 1 < len(record.segments) and not record.segments[j + 1].scene_start
        if not continues:  # do not reach across a cut or past the end: repeat the segment's last frame
            t[-1] = t[-2]
        times.append(t)
    return times


def decode_segments(path: str | os.PathLike, record: VideoRecord, fps: int, height: int, width: int
                    ) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (segment index, frames (1 + frames_per_segment, height, width, 3) uint8), segments in order.

    Frame times map to source frames by index (round(t * record.fps)); a time at most one frame past the end of the
    file takes the last frame, anything further is an error naming the video.
    """
    wanted = [[round(t * record.fps) for t in times] for times in segment_frame_times(record, fps)]
    frames: dict[int, np.ndarray] = {}
    needed = {i for indices in wanted for i in indices}
    next_segment, decoded, final = 0, 0, None
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if decoded in needed:
                frames[decoded] = _cover_crop(frame, height, width)
            final = frame
            decoded += 1
            while next_segment < len(wanted) and wanted[next_segment][-1] < decoded:
                yield next_segment, np.stack([frames[i] for i in wanted[next_segment]])
                next_segment += 1
                if next_segment < len(wanted):  # free what no later segment uses
                    frames = {i: f for i, f in frames.items() if i >= wanted[next_segment][0]}
            if next_segment == len(wanted):
                return
    for j in range(next_segment, len(wanted)):
        if final is None or wanted[j][-1] > decoded:
            raise DatasetError(f"{path}: segment {j} needs frame {wanted[j][-1]} at {record.fps:g} fps but the video "
                               f"has {decoded} frames; check the segments' start times and fps")
        frames[decoded] = _cover_crop(final, height, width)  # at most one frame past the end: repeat the last
        yield j, np.stack([frames[min(i, decoded)] for i in wanted[j]])


def _cover_crop(frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
    """Resize (keeping the aspect ratio) to cover height x width, then center-crop: (height, width, 3) uint8."""
    scale = max(height / frame.height, width / frame.width)
    h, w = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    image = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """frames (F, H, W, 3) uint8 → the VAE posterior's mean and logvar, each (F', C, h, w) float32."""
    pixels = torch.from_numpy(frames).to(device=vae.device, dtype=vae.dtype)
    pixels = pixels.permute(3, 0, 1, 2).unsqueeze(0) / 127.5 - 1.0  # (1, 3, F, H, W) in [-1, 1]
    dist = vae.encode(pixels).latent_dist
    return dist.mean[0].permute(1, 0, 2, 3).float(), dist.logvar[0].permute(1, 0, 2, 3).float()


def make_manifest(cfg: Config, vae, text_embed_dim: int) -> dict:
    frames = num_pixel_frames(cfg.data.fps)
    ratio = vae.config.temporal_compression_ratio
    if frames % ratio:
        raise DatasetError(f"data.fps={cfg.data.fps} gives {frames} frames per segment, not a multiple of the VAE's "
                           f"temporal compression {ratio}")
    shape = shape_fields(cfg.data, max_text_length=cfg.data.max_text_length, latent_frames_first=frames // ratio + 1,
                         latent_frames_per_segment=frames // ratio, latent_channels=vae.config.latent_channels,
                         text_embed_dim=text_embed_dim)
    return {"version": CACHE_VERSION, "model": cfg.model.pretrained, **shape,
            "scaling_factor": vae.config.scaling_factor}


def precompute(cfg: Config, dtype: torch.dtype = torch.bfloat16, accelerator: Accelerator | None = None) -> dict:
    """Fill cfg.data.cache for cfg.data.root (see module docstring). Returns counts: done, skipped (already done),
    failed — for this process."""
    accelerator = accelerator or Accelerator()
    device = accelerator.device
    compute_dtype = torch_dtype(cfg.train.mixed_precision) if device.type == "cuda" else torch.float32
    cache = Path(cfg.data.cache)
    records = read_metadata(cfg.data.root)
    for record in records:  # a register missing from the metadata is found before any model is loaded
        captions(record, cfg.data.caption)
    parts = build_components(cfg.model, cfg.train, ("tokenizer", "text_encoder", "vae"))
    tokenizer, text_encoder, vae = parts["tokenizer"], parts["text_encoder"], parts["vae"]
    text_encoder.to(device, compute_dtype).eval()
    vae.to(device, compute_dtype).eval()
    if cfg.data.vae_tiling:
        vae.enable_tiling()

    null_text, null_mask = encode_text(tokenizer, text_encoder, [""], cfg.data.max_text_length, device)
    manifest = make_manifest(cfg, vae, null_text.shape[-1])
    expected = {"latent_frames_first": cfg.model.ttt.latent_frames_first,
                "latent_frames_per_segment": cfg.model.ttt.latent_frames_per_segment}
    for key, want in expected.items():
        if manifest[key] != want:
            raise DatasetError(f"data.fps={cfg.data.fps} gives {key}={manifest[key]} but model.ttt.{key}={want}")
    if accelerator.is_main_process:
        if (cache / MANIFEST_FILE).is_file():
            existing = read_manifest(cache)
            differs = [k for k in (*SHAPE_FIELDS, "scaling_factor") if manifest_field(existing, k) != manifest[k]]
            if differs:
                raise DatasetError(f"{cache / MANIFEST_FILE}: this cache was made with other settings ("
                                   + ", ".join(f"{k}={manifest_field(existing, k)!r}, now {manifest[k]!r}"
                                               for k in differs)
                                   + "); use another data.cache folder")
        else:
            atomic_write_text(cache / MANIFEST_FILE, _json(manifest))
        _save(cache / NULL_FILE, {"text": null_text[0].to(dtype), "text_mask": null_mask[0]}, {})
    accelerator.wait_for_everyone()
    latents_from = _latent_source(cfg, manifest)

    mine = records[accelerator.process_index::accelerator.num_processes]
    counts = {"done": 0, "skipped": 0, "failed": 0}
    bar = tqdm(mine, desc=f"precompute [{accelerator.process_index}]", disable=not accelerator.is_local_main_process)
    for record in bar:
        path = item_path(cache, record)
        if path.is_file():
            counts["skipped"] += 1
            continue
        try:
            tensors = encode_record(cfg, record, tokenizer, text_encoder, vae, dtype, latents_from)
        except (av.FFmpegError, OSError, DatasetError) as e:
            counts["failed"] += 1
            logger.warning("skipping %s: %s", record.video, e)
            continue
        _save(path, tensors, {"video": record.video})
        counts["done"] += 1
        bar.set_postfix(counts)
    accelerator.wait_for_everyone()
    logger.info("precompute [%d]: %s", accelerator.process_index, counts)
    return counts


def encode_record(cfg: Config, record: VideoRecord, tokenizer, text_encoder, vae, dtype: torch.dtype,
                  latents_from: Path | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one cache item (shapes in SequenceDataset, per segment S of the video); the latents are
    copied from the cache `latents_from` when it holds the item."""
    source = _latent_item(latents_from, record) if latents_from is not None else None
    if source is not None:
        kept = load_file(source)
        latent_mean, latent_logvar = kept["latent_mean"].to(dtype), kept["latent_logvar"].to(dtype)
    else:
        video = Path(cfg.data.root) / record.video
        if not video.is_file():
            raise DatasetError(f"{video}: video file not found")
        means, logvars = [], []
        for _, frames in decode_segments(video, record, cfg.data.fps, cfg.data.height, cfg.data.width):
            mean, logvar = encode_frames(vae, frames)
            means.append(mean.to(dtype).cpu())
            logvars.append(logvar.to(dtype).cpu())
        latent_mean, latent_logvar = torch.stack(means), torch.stack(logvars)
    text, mask = encode_text(tokenizer, text_encoder, captions(record, cfg.data.caption), cfg.data.max_text_length,
                             vae.device)
    tensors = {"latent_mean": latent_mean, "latent_logvar": latent_logvar,  # (S, F1, C, h, w)
               "text": text.to(dtype).cpu(), "text_mask": mask.cpu(),  # (S, L, D), (S, L)
               "scene_start": torch.tensor([s.scene_start for s in record.segments])}  # (S,)
    if record.mask:
        tensors["loss_mask"] = encode_mask(cfg, record, latent_mean.shape).to(dtype)  # (S, F1, h, w)
    return tensors


def encode_mask(cfg: Config, record: VideoRecord, latent_shape: torch.Size) -> torch.Tensor:
    """The record's mask video as loss_mask (S, F1, h, w) float32 in [0, 1] for latents of `latent_shape`
    (S, F1, C, h, w): each segment decoded as its video is (`decode_segments`), then `pool_mask`."""
    path = Path(cfg.data.root) / record.mask
    if not path.is_file():
        raise DatasetError(f"{path}: mask video not found (the \"mask\" field of {record.video}'s metadata line)")
    _, latent_frames, _, height, width = latent_shape
    segments = [pool_mask(frames, latent_frames, height, width)
                for _, frames in decode_segments(path, record, cfg.data.fps, cfg.data.height, cfg.data.width)]
    return torch.stack(segments)


def pool_mask(frames: np.ndarray, latent_frames: int, height: int, width: int) -> torch.Tensor:
    """A segment's mask frames (1 + r k, H, W, 3) uint8 → (latent_frames, height, width) float32 in [0, 1]: the mean
    brightness of the pixels each latent element encodes. The causal VAE's latent frame 0 encodes pixel frame 0 alone
    and latent frame i >= 1 the r frames r (i - 1) + 1 ... r i (r = temporal compression); each latent position a
    (H / height) x (W / width) block."""
    mask = torch.from_numpy(frames).float().mean(dim=-1) / 255.0  # (F, H, W)
    count, pixel_h, pixel_w = mask.shape
    ratio, rest = divmod(count - 1, latent_frames - 1) if latent_frames > 1 else (0, count - 1)
    if rest or pixel_h % height or pixel_w % width:
        raise DatasetError(f"mask: {count} frames of {pixel_h}x{pixel_w} do not map onto {latent_frames} latent "
                           f"frames of {height}x{width}")
    frames_mean = [mask[:1]] + ([mask[1:].unflatten(0, (latent_frames - 1, ratio)).mean(dim=1)] if ratio else [])
    mask = torch.cat(frames_mean)  # (latent_frames, H, W)
    return torch.nn.functional.avg_pool2d(mask[:, None], (pixel_h // height, pixel_w // width))[:, 0]


LATENT_FIELDS = ("model", "height", "width", "fps", "latent_frames_first", "latent_frames_per_segment",
                 "latent_channels", "scaling_factor")  # what the stored latents depend on


def _latent_source(cfg: Config, manifest: dict) -> Path | None:
    """data.latents_from as a Path, checked to hold latents made the way this cache's would be (DatasetError)."""
    if not cfg.data.latents_from:
        return None
    source = Path(cfg.data.latents_from)
    if source.resolve() == Path(cfg.data.cache).resolve():
        raise DatasetError(f"data.latents_from: {source} is data.cache itself; name another cache")
    theirs = read_manifest(source)
    differs = [k for k in LATENT_FIELDS if theirs.get(k) != manifest[k]]
    if differs:
        raise DatasetError(f"data.latents_from: {source / MANIFEST_FILE} was made with other latents ("
                           + ", ".join(f"{k}={theirs.get(k)!r}, here {manifest[k]!r}" for k in differs) + ")")
    return source


def _latent_item(latents_from: Path, record: VideoRecord) -> Path | None:
    """The item of cache `latents_from` holding this video's latents, if any: the record's own, or that of the same
    record without its mask or without some of its caption registers (latents depend on neither: a dataset whose
    metadata gained masks or a register keeps its latents)."""
    registers = sorted({name for s in record.segments for name in s.captions})
    for count in range(len(registers), -1, -1):
        for kept in combinations(registers, count):
            segments = tuple(replace(s, captions={k: v for k, v in s.captions.items() if k in kept})
                             for s in record.segments)
            for candidate in (replace(record, segments=segments), replace(record, segments=segments, mask=None)):
                path = item_path(latents_from, candidate)
                if path.is_file():
                    return path
    return None


def captions(record: VideoRecord, register: str) -> list[str]:
    """The segments' captions in `register` (data.caption); DatasetError naming the video and segment without one."""
    texts = [s.caption(register) for s in record.segments]
    missing = [i for i, t in enumerate(texts) if t is None]
    if missing:
        raise DatasetError(f"{record.video}: segment {missing[0] + 1} has no caption in register {register!r} "
                           "(data.caption); its metadata line needs segments[i].captions."
                           f"{register}, or set data.caption=text")
    return texts


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config YAML (its model and data sections)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the stored latents and embeddings")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.cache=/scratch/cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    accelerator = Accelerator()
    try:
        counts = gather_object([precompute(cfg, getattr(torch, args.dtype), accelerator)])  # every process's
    finally:
        # A process group left to the interpreter's exit can abort it ("terminate called without an active
        # exception", seen under gloo): a finished precompute then exits with SIGABRT. Tear it down here.
        accelerator.end_training()
    failed, total = sum(c["failed"] for c in counts), sum(sum(c.values()) for c in counts)
    if failed:
        raise DatasetError(f"{failed} of {total} videos failed (the warnings above name them and why) and are not in "
                           f"{cfg.data.cache}; fix or remove them in {Path(cfg.data.root) / 'metadata.jsonl'} and run "
                           "again (finished items are kept)")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DatasetError) as e:
        sys.exit(f"precompute: error: {e}")
