"""The dataset format: metadata.jsonl records and the precomputed cache's layout and manifest.

Dataset format (docs/dataset.md): a folder of videos plus metadata.jsonl, one line per source video::

    {"video": "clips/a.mp4", "fps": 30, "segments": [{"start": 0.0, "text": "...", "scene_start": true}, ...]}

and optionally "mask": "masks/a.mp4", a video of the same frames whose brightness marks where the loss should look
hardest (the characters: `train.mask_weight`).

Segments are 3 s each and consecutive (start_{i+1} = start_i + 3). pipeline/data/precompute.py turns every video into
a cache item (VAE latent distribution and text embedding per segment) under ITEMS_DIR, beside MANIFEST_FILE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..storyboard import SEGMENT_SECONDS

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
MANIFEST_FILE = "manifest.json"
NULL_FILE = "null.safetensors"
ITEMS_DIR = "items"
_START_TOLERANCE = 1e-3  # seconds; starts written with a few decimals still count as consecutive

# manifest fields that decide tensor shapes: a cache made with other values cannot feed the model
SHAPE_FIELDS = ("height", "width", "fps", "max_text_length", "latent_frames_first", "latent_frames_per_segment",
                "latent_channels", "text_embed_dim", "caption")
# what a manifest written before a field existed meant by it
FIELD_DEFAULTS = {"caption": "text"}


class DatasetError(ValueError):
    """Bad dataset metadata or cache; the message names the file (and line/field) and what was expected."""


@dataclass(frozen=True)
class SegmentInfo:
    """One 3-s segment of a source video: it starts `start` seconds into the file.

    text: its caption, the one sampling-style storyboards hold; captions: other registers of the same segment by name
    (for example the toy world's "dense": every segment names its backdrop and describes every character on stage),
    which precompute embeds instead when `data.caption` names one.
    """

    start: float
    text: str = ""
    scene_start: bool = False
    captions: dict[str, str] = field(default_factory=dict)

    def caption(self, register: str) -> str | None:
        """The caption in `register` ("text": `text`), or None when this segment has none in it."""
        return self.text if register == "text" else self.captions.get(register)


@dataclass(frozen=True)
class VideoRecord:
    """One line of metadata.jsonl: a video (path relative to the dataset folder), its fps and its segments; mask
    (optional): a video of the same frame rate and length, white where the loss should weigh more (precompute stores
    it per latent element as loss_mask, `train.mask_weight` uses it), black elsewhere."""

    video: str
    fps: float
    segments: tuple[SegmentInfo, ...]
    mask: str | None = None

    @property
    def key(self) -> str:
        """Cache item name: a hash of the whole record, so edited texts or segments make a new item."""
        digest = hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]
        return f"{Path(self.video).stem[:40]}-{digest}"

    def to_json(self) -> dict:
        segments = [{k: v for k, v in asdict(s).items() if k != "captions" or v} for s in self.segments]
        mask = {"mask": self.mask} if self.mask else {}  # absent when unset: older records keep their keys
        return {"video": self.video, "fps": self.fps, "segments": segments, **mask}


def parse_record(data: object, place: str) -> VideoRecord:
    """Validate one metadata entry; `place` (e.g. "metadata.jsonl:3") prefixes every error."""
    if not isinstance(data, dict):
        raise DatasetError(f"{place}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"video", "fps", "segments", "mask"})
    if unknown:
        raise DatasetError(f"{place}: unknown field {unknown[0]!r}; expected video, fps, segments, mask")
    video, fps, segments, mask = data.get("video"), data.get("fps"), data.get("segments"), data.get("mask")
    if not isinstance(video, str) or not video:
        raise DatasetError(f"{place}: video: expected a path relative to the dataset folder, got {video!r}")
    if mask is not None and (not isinstance(mask, str) or not mask):
        raise DatasetError(f"{place}: mask: expected the path of a mask video relative to the dataset folder, got "
                           f"{mask!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise DatasetError(f"{place}: fps: expected the source frame rate (a positive number), got {fps!r}")
    if not isinstance(segments, list) or not segments:
        raise DatasetError(f"{place}: segments: expected a non-empty list, got {segments!r}")
    parsed = []
    for i, seg in enumerate(segments):
        where = f"{place}: segments[{i}]"
        if not isinstance(seg, dict):
            raise DatasetError(f"{where}: expected an object with start, text, scene_start, got {seg!r}")
        unknown = sorted(set(seg) - {"start", "text", "scene_start", "captions"})
        if unknown:
            raise DatasetError(f"{where}: unknown field {unknown[0]!r}; expected start, text, scene_start, captions")
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
        captions = seg.get("captions", {})
        if not isinstance(captions, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in captions.items()):
            raise DatasetError(f"{where}.captions: expected an object of register name -> text, got {captions!r}")
        if "text" in captions:
            raise DatasetError(f"{where}.captions: 'text' is the segment's own text field, not a register name")
        parsed.append(SegmentInfo(float(start), text, scene_start, dict(captions)))
    return VideoRecord(video, float(fps), tuple(parsed), mask)


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
        raise DatasetError(f"{path}: not found; run `python -m pipeline.data.precompute --config ...` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); expected the JSON object the precompute writes "
                           "(delete it and run the precompute again)") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def shape_fields(data, *, max_text_length: int, latent_frames_first: int, latent_frames_per_segment: int,
                 latent_channels: int, text_embed_dim: int) -> dict:
    """The manifest's SHAPE_FIELDS for `data` (a DataConfig: height, width, fps) and the model's sizes: what
    precompute records in a cache and what training checks a cache against (`check_manifest`); caption is the
    register of the embedded texts (`data.caption`)."""
    return {"height": data.height, "width": data.width, "fps": data.fps, "max_text_length": max_text_length,
            "latent_frames_first": latent_frames_first, "latent_frames_per_segment": latent_frames_per_segment,
            "latent_channels": latent_channels, "text_embed_dim": text_embed_dim, "caption": data.caption}


def manifest_field(manifest: dict, key: str):
    """manifest[key], or what a manifest written before `key` existed meant by it (FIELD_DEFAULTS)."""
    return manifest.get(key, FIELD_DEFAULTS.get(key))


def check_manifest(manifest: dict, expected: dict, cache: str | os.PathLike) -> None:
    """Raise if the cache was made for other shapes than `expected` (keys from SHAPE_FIELDS)."""
    for key, want in expected.items():
        have = manifest_field(manifest, key)
        if have != want:
            raise DatasetError(
                f"{Path(cache) / MANIFEST_FILE}: the cache was precomputed with {key}={have!r} (model "
                f"{manifest.get('model')!r}) but training expects {key}={want!r}; precompute again into another "
                "cache folder or change the config")


def num_pixel_frames(fps: int) -> int:
    """Pixel frames of one 3-s segment at `fps`, checked to be whole."""
    frames = fps * SEGMENT_SECONDS
    if not math.isclose(frames, round(frames)):
        raise DatasetError(f"fps={fps} does not give a whole number of frames per {SEGMENT_SECONDS:g}-s segment")
    return round(frames)

