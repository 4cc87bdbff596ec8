"""Training data: the dataset format, the precomputed cache and the dataset of n-segment sequences.

Dataset format (docs/dataset.md): a folder of videos plus metadata.jsonl, one line per source video::

    {"video": "clips/a.mp4", "fps": 30, "segments": [{"start": 0.0, "text": "...", "scene_start": true}, ...]}

Segments are 3 s each and consecutive (start_{i+1} = start_i + 3). pipeline/precompute.py turns every video into a
cache item (VAE latent distribution and text embedding per segment); `SequenceDataset` reads windows of the stage's
number of consecutive segments from those items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset, Sampler

from .atomic import atomic_write_text
from .storyboard import SEGMENT_SECONDS

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
MANIFEST_FILE = "manifest.json"
NULL_FILE = "null.safetensors"
ITEMS_DIR = "items"
_START_TOLERANCE = 1e-3  # seconds; starts written with a few decimals still count as consecutive

# manifest fields that decide tensor shapes: a cache made with other values cannot feed the model
SHAPE_FIELDS = ("height", "width", "fps", "max_text_length", "latent_frames_first", "latent_frames_per_segment",
                "latent_channels", "text_embed_dim")


class DatasetError(ValueError):
    """Bad dataset metadata or cache; the message names the file (and line/field) and what was expected."""


@dataclass(frozen=True)
class SegmentInfo:
    """One 3-s segment of a source video: it starts `start` seconds into the file."""

    start: float
    text: str = ""
    scene_start: bool = False


@dataclass(frozen=True)
class VideoRecord:
    """One line of metadata.jsonl: a video (path relative to the dataset folder), its fps and its segments."""

    video: str
    fps: float
    segments: tuple[SegmentInfo, ...]

    @property
    def key(self) -> str:
        """Cache item name: a hash of the whole record, so edited texts or segments make a new item."""
        digest = hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]
        return f"{Path(self.video).stem[:40]}-{digest}"

    def to_json(self) -> dict:
        return {"video": self.video, "fps": self.fps, "segments": [asdict(s) for s in self.segments]}


def parse_record(data: object, place: str) -> VideoRecord:
    """Validate one metadata entry; `place` (e.g. "metadata.jsonl:3") prefixes every error."""
    if not isinstance(data, dict):
        raise DatasetError(f"{place}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"video", "fps", "segments"})
    if unknown:
        raise DatasetError(f"{place}: unknown field {unknown[0]!r}; expected video, fps, segments")
    video, fps, segments = data.get("video"), data.get("fps"), data.get("segments")
    if not isinstance(video, str) or not video:
        raise DatasetError(f"{place}: video: expected a path relative to the dataset folder, got {video!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise DatasetError(f"{place}: fps: expected the source frame rate (a positive number), got {fps!r}")
    if not isinstance(segments, list) or not segments:
        raise DatasetError(f"{place}: segments: expected a non-empty list, got {segments!r}")
    parsed = []
    for i, seg in enumerate(segments):
        where = f"{place}: segments[{i}]"
        if not isinstance(seg, dict):
            raise DatasetError(f"{where}: expected an object with start, text, scene_start, got {seg!r}")
        unknown = sorted(set(seg) - {"start", "text", "scene_start"})
        if unknown:
            raise DatasetError(f"{where}: unknown field {unknown[0]!r}; expected start, text, scene_start")
        start, text, scene_start = seg.get("start"), seg.get("text", ""), seg.get("scene_start", False)
        if isinstance(start, bool) or not isinstance(start, (int, float)) or start < 0:
            raise DatasetError(f"{where}.start: expected seconds >= 0, got {start!r}")
        if parsed and abs(start - parsed[-1].start - SEGMENT_SECONDS) > _START_TOLERANCE:
            raise DatasetError(f"{where}.start: expected {parsed[-1].start + SEGMENT_SECONDS:g} "
                               f"({SEGMENT_SECONDS:g} s after the previous segment), got {start!r}")
        if not isinstance(text, str):
            raise DatasetError(f"{where}.text: expected a string, got {text!r}")
        if not isinstance(scene_start, bool):
            raise DatasetError(f"{where}.scene_start: expected true or false, got {scene_start!r}")
        parsed.append(SegmentInfo(float(start), text, scene_start))
    return VideoRecord(video, float(fps), tuple(parsed))


def read_metadata(root: str | os.PathLike) -> list[VideoRecord]:
    """All records of root/metadata.jsonl (blank lines ignored), validated."""
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: not found; a dataset folder holds the videos and {METADATA_FILE}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        place = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{place}: not valid JSON ({e.msg})") from None
        records.append(parse_record(data, place))
    return records


def write_metadata(root: str | os.PathLike, records: list[VideoRecord]) -> Path:
    """Write root/metadata.jsonl atomically."""
    path = Path(root) / METADATA_FILE
    return atomic_write_text(path, "".join(json.dumps(r.to_json()) + "\n" for r in records))


def item_path(cache: str | os.PathLike, record: VideoRecord) -> Path:
    return Path(cache) / ITEMS_DIR / f"{record.key}.safetensors"


def read_manifest(cache: str | os.PathLike) -> dict:
    path = Path(cache) / MANIFEST_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: not found; run `python -m pipeline.precompute --config ...` first")
    return json.loads(path.read_text())


def check_manifest(manifest: dict, expected: dict, cache: str | os.PathLike) -> None:
    """Raise if the cache was made for other shapes than `expected` (keys from SHAPE_FIELDS)."""
    for key, want in expected.items():
        have = manifest.get(key)
        if have != want:
            raise DatasetError(
                f"{Path(cache) / MANIFEST_FILE}: the cache was precomputed with {key}={have!r} (model "
                f"{manifest.get('model')!r}) but training expects {key}={want!r}; precompute again into another "
                "cache folder or change the config")


class EpochSampler(Sampler):
    """Shuffled order per epoch, yielding (index, sample_seed) pairs.

    The seed of each sample is a function of (seed, epoch, position) only, so the randomness drawn for a sample
    (text dropout here, latent sample / noise / timestep in training) does not depend on how many processes
    share the batch, and a resumed run draws exactly what an uninterrupted one would.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        self.num_items, self.seed, self.shuffle, self.epoch = num_items, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        for position, index in enumerate(order):
            yield index, sample_seed(self.seed, self.epoch, position)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    digest = hashlib.sha1(f"{seed}/{epoch}/{position}".encode()).digest()
    return int.from_bytes(digest[:7], "little")  # < 2**56: fits an int64 tensor and torch's manual_seed


class SequenceDataset(Dataset):
    """Windows of `segments` consecutive 3-s segments of one video, read from a precompute cache.

    Item `(index, seed)` (from EpochSampler; a plain int uses its own value as the seed) returns:
        latent_mean, latent_logvar: (T, C, h, w) float32, T = latent_frames_first + (segments - 1) *
            latent_frames_per_segment; the VAE posterior of the window, unscaled (multiply a sample by
            `scaling_factor`).
        text: (segments, L, D) float32 text embeddings; text_mask: (segments, L) bool (True on real tokens).
        scene_start: (segments,) bool, the first always False (as the sampler gives it).
        seed: () int64, the seed for this sample's latent sample, noise and timestep.
    With probability `text_dropout` the whole sequence's text becomes the null embedding (the encoded empty text
    that classifier-free guidance uses for its unconditional branch).

    Videos whose cache item is missing or unreadable are skipped and counted in the log (`skipped`).
    """

    def __init__(self, root: str | os.PathLike, cache: str | os.PathLike, segments: int, stride: int = 1,
                 text_dropout: float = 0.0, expected: dict | None = None):
        if segments < 1 or stride < 1:
            raise DatasetError(f"segments and stride must be >= 1, got {segments} and {stride}")
        if not 0.0 <= text_dropout <= 1.0:
            raise DatasetError(f"text_dropout: expected a probability in [0, 1], got {text_dropout}")
        self.cache, self.segments, self.text_dropout = Path(cache), segments, text_dropout
        self.manifest = read_manifest(cache)
        check_manifest(self.manifest, expected or {}, cache)
        self.scaling_factor = float(self.manifest["scaling_factor"])
        self.frames_first = self.manifest["latent_frames_first"]
        self.frames_per_segment = self.manifest["latent_frames_per_segment"]
        null = _load_tensors(self.cache / NULL_FILE, ("text", "text_mask"))
        self.null_text, self.null_mask = null["text"].float(), null["text_mask"].bool()

        self.skipped: dict[str, int] = {"missing": 0, "corrupt": 0, "too_short": 0}
        self.windows: list[tuple[Path, int]] = []
        records = read_metadata(root)
        for record in records:
            path = item_path(cache, record)
            if not path.is_file():
                self.skipped["missing"] += 1
                continue
            try:
                num = self._check_item(path, len(record.segments))
            except (OSError, DatasetError, SafetensorError) as e:  # truncated or foreign files: skipped, counted
                self.skipped["corrupt"] += 1
                logger.warning("skipping cache item %s: %s", path, e)
                continue
            if num < segments:
                self.skipped["too_short"] += 1
            self.windows.extend((path, start) for start in range(0, num - segments + 1, stride))
        logger.info("dataset: %d sequences of %d segments from %d videos; skipped videos: %s", len(self.windows),
                    segments, len(records), self.skipped)
        if not self.windows:
            raise DatasetError(f"{cache}: no sequence of {segments} segments found (videos: {len(records)}, "
                               f"skipped: {self.skipped})")

    def _check_item(self, path: Path, num_segments: int) -> int:
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice("latent_mean").get_shape()
            keys = set(f.keys())
        missing = {"latent_mean", "latent_logvar", "text", "text_mask", "scene_start"} - keys
        if missing:
            raise DatasetError(f"tensors {sorted(missing)} missing")
        if shape[0] != num_segments or shape[1] != self.frames_first:
            raise DatasetError(f"latent_mean has shape {shape}, expected ({num_segments}, {self.frames_first}, ...)")
        return shape[0]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        path, start = self.windows[index]
        stop = start + self.segments
        with safe_open(str(path), framework="pt") as f:
            mean = f.get_slice("latent_mean")[start:stop].float()  # (n, F1, C, h, w)
            logvar = f.get_slice("latent_logvar")[start:stop].float()
            text = f.get_slice("text")[start:stop].float()  # (n, L, D)
            text_mask = f.get_slice("text_mask")[start:stop].bool()  # (n, L)
            scene_start = f.get_slice("scene_start")[start:stop].bool()  # (n,)
        scene_start[0] = False
        if random.Random(seed).random() < self.text_dropout:
            text = self.null_text.expand_as(text).clone()
            text_mask = self.null_mask.expand_as(text_mask).clone()
        return {"latent_mean": self._join(mean), "latent_logvar": self._join(logvar), "text": text,
                "text_mask": text_mask, "scene_start": scene_start, "seed": torch.tensor(seed, dtype=torch.int64)}

    def _join(self, per_segment: torch.Tensor) -> torch.Tensor:
        """(n, F1, C, h, w) per-segment encodings → (T, C, h, w): all frames of the first segment, then each later
        segment without its leading single-frame latent (the causal VAE's encoding of the boundary frame, which the
        previous segment's last latent already covers)."""
        skip = self.frames_first - self.frames_per_segment
        return torch.cat([per_segment[0], per_segment[1:, skip:].flatten(0, 1)], dim=0)


def _load_tensors(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found; the precompute did not finish (run it again, it resumes)")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}


def num_pixel_frames(fps: int) -> int:
    """Pixel frames of one 3-s segment at `fps`, checked to be whole."""
    frames = fps * SEGMENT_SECONDS
    if not math.isclose(frames, round(frames)):
        raise DatasetError(f"fps={fps} does not give a whole number of frames per {SEGMENT_SECONDS:g}-s segment")
    return round(frames)


def batch_stream(loader, start: int = 0) -> Iterator:
    """Batches of an Accelerate-prepared loader forever, epoch after epoch (each with its own shuffle), starting
    after `start` batches of this process — where a run resumed after `start` batches continues."""
    from accelerate import skip_first_batches

    per_epoch = len(loader)
    if per_epoch == 0:
        raise DatasetError("the dataset has fewer sequences than one batch; lower train.micro_batch_size")
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader.set_epoch(epoch)
        yield from (skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0
