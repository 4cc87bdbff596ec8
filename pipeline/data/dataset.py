"""The dataset of n-segment sequences read from the precomputed cache, its epoch sampler and batch stream.

`SequenceDataset` reads windows of the stage's number of consecutive segments from the cache items that
pipeline/data/precompute.py wrote (format: pipeline/data/format.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset, Sampler

from .format import METADATA_FILE, NULL_FILE, DatasetError, check_manifest, item_path, read_manifest, read_metadata

logger = logging.getLogger(__name__)

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
        name: str, where the sample comes from: "<video> segments a-b (cache <item file>)", for error messages.
    With probability `text_dropout` the whole sequence's text becomes the null embedding (the encoded empty text
    that classifier-free guidance uses for its unconditional branch). Otherwise, with probability `mix_rate`, the
    sequence's texts come from `mix_cache`: another precompute cache of the same videos and text shapes (another
    caption register); it must hold every video that `cache` holds. With `loss_mask`, items also return loss_mask
    (T, h, w) float32 in [0, 1], joined like the latents; every video then needs a mask (DatasetError otherwise).
    A window with a segment whose caption matches `repeat_pattern`, in the cache's register or the mix cache's,
    appears `repeat_times` times instead of once; `repeat_key` names the setting in the error when none matches.
    With `told_cache` (another cache of the same videos, its texts in a register that tells everything on screen),
    items also return told_text (segments, L, D), told_text_mask (segments, L) from it and told: () bool, True when
    the item's own texts are its cache's (neither dropped nor mixed), for the loss's told term (train.told_weight).

    Videos whose cache item is missing or unreadable are skipped and counted in the log (`skipped`).
    """

    def __init__(self, root: str | os.PathLike, cache: str | os.PathLike, segments: int, stride: int = 1,
                 text_dropout: float = 0.0, expected: dict | None = None, mix_cache: str | os.PathLike | None = None,
                 mix_rate: float = 0.0, loss_mask: bool = False, repeat_pattern: str | None = None,
                 repeat_times: int = 1, repeat_key: str = "data.repeat_pattern",
                 told_cache: str | os.PathLike | None = None):
        if segments < 1 or stride < 1:
            raise DatasetError(f"segments and stride must be >= 1, got {segments} and {stride}")
        if not 0.0 <= text_dropout <= 1.0:
            raise DatasetError(f"text_dropout: expected a probability in [0, 1], got {text_dropout}")
        if not 0.0 <= mix_rate <= 1.0 or (mix_rate > 0 and mix_cache is None):
            raise DatasetError(f"mix_rate: expected a probability in [0, 1] (above 0 only with a mix_cache), got "
                               f"{mix_rate}")
        self.cache, self.segments, self.text_dropout, self.loss_mask = Path(cache), segments, text_dropout, loss_mask
        self.mix_cache, self.mix_rate = (Path(mix_cache), mix_rate) if mix_rate > 0 else (None, 0.0)
        self.told_cache = Path(told_cache) if told_cache is not None else None
        self.manifest = read_manifest(cache)
        check_manifest(self.manifest, expected or {}, cache)
        self.scaling_factor = float(self.manifest["scaling_factor"])
        self.frames_first = self.manifest["latent_frames_first"]
        self.frames_per_segment = self.manifest["latent_frames_per_segment"]
        self.null_text, self.null_mask = read_null_embedding(cache)
        # the caption registers a sequence may take its texts from (repeat_pattern is looked for in each)
        registers = [self.manifest.get("caption", "text")]
        if self.mix_cache is not None:
            mix_manifest = read_manifest(self.mix_cache)
            # the texts must fit the model as the main cache's do; the caption register is what differs
            check_manifest(mix_manifest, {k: v for k, v in (expected or {}).items() if k != "caption"},
                           self.mix_cache)
            registers = list(dict.fromkeys([*registers, mix_manifest.get("caption", "text")]))
        if self.told_cache is not None:  # likewise
            check_manifest(read_manifest(self.told_cache),
                           {k: v for k, v in (expected or {}).items() if k != "caption"}, self.told_cache)

        self.skipped: dict[str, int] = {"missing": 0, "corrupt": 0, "too_short": 0}
        self.windows: list[tuple[Path, int]] = []  # (cache item, first segment)
        self.videos: dict[Path, str] = {}  # cache item -> its video (for error messages)
        self.mix_items: dict[Path, Path] = {}  # cache item -> the mix cache's item of the same video
        self.told_items: dict[Path, Path] = {}  # cache item -> the told cache's item of the same video
        repeat = re.compile(repeat_pattern) if repeat_pattern and repeat_times > 1 else None
        self.repeated = 0  # windows that appear repeat_times times
        records = read_metadata(root)
        for number, record in enumerate(records, start=1):
            if loss_mask and not record.mask:
                raise DatasetError(f"{Path(root) / METADATA_FILE}:{number}: {record.video} has no \"mask\" video; "
                                   "train.mask_weight > 0 needs one for every video (docs/dataset.md), or set "
                                   "train.mask_weight=0")
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
            for start in range(0, num - segments + 1, stride):
                times = repeat_times if repeat and any(
                    repeat.search(record.segments[i].caption(register) or "")
                    for i in range(start, start + segments) for register in registers) else 1
                self.windows.extend([(path, start)] * times)
                self.repeated += times > 1
            self.videos[path] = record.video
            if self.mix_cache is not None and num >= segments:
                self.mix_items[path] = self._check_texts_item(item_path(self.mix_cache, record), num, "mix")
            if self.told_cache is not None and num >= segments:
                self.told_items[path] = self._check_texts_item(item_path(self.told_cache, record), num, "told")
        logger.info("dataset: %d sequences of %d segments from %d videos; skipped videos: %s", len(self.windows),
                    segments, len(records), self.skipped)
        if repeat is not None:
            if not self.repeated:
                raise DatasetError(f"{repeat_key}: no sequence's {' or '.join(map(repr, registers))} caption "
                                   f"matches {repeat_pattern!r} in {cache}")
            logger.info("dataset: %d sequences match %r and appear %d times each", self.repeated, repeat_pattern,
                        repeat_times)
        if not self.windows:
            raise DatasetError(f"{cache}: no sequence of {segments} segments found (videos: {len(records)}, "
                               f"skipped: {self.skipped})")

    def _check_item(self, path: Path, num_segments: int) -> int:
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice("latent_mean").get_shape()
            keys = set(f.keys())
        missing = {"latent_mean", "latent_logvar", "text", "text_mask", "scene_start",
                   *(("loss_mask",) if self.loss_mask else ())} - keys
        if missing:
            raise DatasetError(f"tensors {sorted(missing)} missing")
        if shape[0] != num_segments or shape[1] != self.frames_first:
            raise DatasetError(f"latent_mean has shape {shape}, expected ({num_segments}, {self.frames_first}, ...)")
        return shape[0]

    def _check_texts_item(self, path: Path, num_segments: int, which: str) -> Path:
        """The `which` ("mix", "told") cache's item for a video of `num_segments` segments: readable, with a text per
        segment."""
        if not path.is_file():
            raise DatasetError(f"{path}: not found in the {which} cache; expected the texts of the video's "
                               f"{num_segments} segments (precompute the {which} cache for every video)")
        try:
            with safe_open(str(path), framework="pt") as f:
                shape = f.get_slice("text").get_shape()
                if "text_mask" not in f.keys():
                    raise DatasetError("tensor 'text_mask' missing")
        except (OSError, SafetensorError, DatasetError) as e:
            raise DatasetError(f"{path}: the {which} cache's item is unreadable ({e}); expected the texts of the "
                               f"video's {num_segments} segments (delete it and precompute the {which} cache again)"
                               ) from None
        if shape[0] != num_segments:
            raise DatasetError(f"{path}: the {which} cache's item has texts for {shape[0]} segments, expected "
                               f"{num_segments}")
        return path

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
            mask = f.get_slice("loss_mask")[start:stop].float() if self.loss_mask else None  # (n, F1, h, w)
        scene_start[0] = False
        rng = random.Random(seed)
        own = True  # the texts are the cache's own
        if rng.random() < self.text_dropout:
            text = self.null_text.expand_as(text).clone()
            text_mask = self.null_mask.expand_as(text_mask).clone()
            own = False
        elif self.mix_cache is not None and rng.random() < self.mix_rate:  # drawn only when mixing: no change if not
            text, text_mask = self._texts(self.mix_items[path], start, stop)
            own = False
        item = {"latent_mean": self._join(mean), "latent_logvar": self._join(logvar), "text": text,
                "text_mask": text_mask, "scene_start": scene_start, "seed": torch.tensor(seed, dtype=torch.int64),
                "name": f"{self.videos[path]} segments {start}-{stop - 1} (cache {path.name})"}
        if mask is not None:
            item["loss_mask"] = self._join(mask)
        if self.told_cache is not None:
            item["told_text"], item["told_text_mask"] = self._texts(self.told_items[path], start, stop)
            item["told"] = torch.tensor(own)
        return item

    @staticmethod
    def _texts(path: Path, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments start..stop-1's text (n, L, D) float32 and text_mask (n, L) bool from a cache item."""
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("text")[start:stop].float(), f.get_slice("text_mask")[start:stop].bool()

    def _join(self, per_segment: torch.Tensor) -> torch.Tensor:
        """(n, F1, ...) per-segment encodings → (T, ...): all frames of the first segment, then each later
        segment without its leading single-frame latent (the causal VAE's encoding of the boundary frame, which the
        previous segment's last latent already covers)."""
        skip = self.frames_first - self.frames_per_segment
        return torch.cat([per_segment[0], per_segment[1:, skip:].flatten(0, 1)], dim=0)


def read_null_embedding(cache: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's null embedding: text (L, D) float32 and text_mask (L,) bool (DatasetError if missing/corrupt)."""
    null = _load_tensors(Path(cache) / NULL_FILE, ("text", "text_mask"))
    return null["text"].float(), null["text_mask"].bool()


def _load_tensors(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found; the precompute did not finish (run it again, it resumes)")
    try:
        with safe_open(str(path), framework="pt") as f:
            missing = [k for k in keys if k not in f.keys()]
            if missing:
                raise DatasetError(f"{path}: tensors {missing} missing; expected {list(keys)} (delete the file and run "
                                   "the precompute again)")
            return {k: f.get_tensor(k) for k in keys}
    except (OSError, SafetensorError) as e:
        raise DatasetError(f"{path}: unreadable ({e}); expected a safetensors file with {list(keys)} (delete it and "
                           "run the precompute again)") from None


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
