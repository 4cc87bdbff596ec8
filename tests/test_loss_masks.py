"""Loss masks (train.mask_weight, docs/training.md): the toy world's character masks, the metadata's "mask" video,
precompute's pooled loss_mask, the dataset and collate that carry it, and the loss term that weighs it."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from test_segment_noise import CONTEXT_FIRST, FRAMES_FIRST, FRAMES_PER_SEGMENT, N, Recorder, collate
from tiny_training import CONFIG, SOURCE_FPS, debug_overrides, prepared

from pipeline.data import DatasetError, SequenceDataset, VideoRecord, item_path, read_metadata, write_metadata
from pipeline.data.format import parse_record
from pipeline.data.precompute import decode_segments, pool_mask, precompute
from pipeline.schedulers import make_scheduler
from pipeline.training import DiffusionCollate, diffusion_terms
from pipeline.training.config import ConfigError, load_config
from pipeline.video_io import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("tiny"))


# the toy world's masks


def test_the_mask_covers_exactly_the_pixels_a_characters_colour_changes():
    """Rendering the same story with every character red and then blue changes a pixel exactly where the mask says a
    character covers it (anti-aliased edges included), and the colour moves by the coverage the mask gives."""
    from pipeline.toyworld.render import render_story, render_story_mask
    from pipeline.toyworld.sampler import sample_story
    from pipeline.toyworld.world import COLORS, Appearance

    story = sample_story(3, 4, 4)
    mask = render_story_mask(story, 64)

    def recoloured(colour):
        looks = {name: Appearance(look.shape, colour, look.size) for name, look in story.cast.items()}
        return render_story(story, 64, looks=[looks] * len(story.segments)).astype(float)

    red, blue = recoloured("red"), recoloured("blue")
    assert mask.shape == red.shape[:3] and mask.dtype == np.uint8
    changed = np.abs(red - blue).max(axis=-1) > 0
    assert 0.02 < (mask > 0).mean() < 0.4
    # outside the mask nothing changes, but for a coverage below half a level that rounding still shows (one level)
    assert np.abs(red - blue)[mask == 0].max() <= 1 and (changed & (mask == 0)).mean() < 1e-4
    covered = mask >= 4  # a coverage of 4/255 moves a channel by at least one step when the colours differ by 64+
    assert changed[covered].all()
    # the red channel moves by coverage x (red - blue) between the two renders (rounding to uint8: +-1)
    step = abs(COLORS["red"][0] - COLORS["blue"][0])
    predicted = mask.astype(float) / 255.0 * step
    solo = mask == 255
    np.testing.assert_allclose(np.abs(red - blue)[..., 0][solo], step, atol=1.0)
    assert np.abs(np.abs(red - blue)[..., 0] - predicted)[(mask > 0) & (mask < 255)].mean() < 1.0


def test_generate_writes_masks_and_a_folder_without_them_gets_the_same(tmp_path):
    from pipeline.toyworld.cli import main
    from pipeline.toyworld.dataset import generate, load_truth
    from pipeline.toyworld.render import render_story_mask

    generate(tmp_path / "new", stories=2, min_segments=2, max_segments=2, seed=0, size=32, progress=False)
    records = read_metadata(tmp_path / "new")
    assert [r.mask for r in records] == ["story_00000.mask.mp4", "story_00001.mask.mp4"]
    frames, _ = read_video(tmp_path / "new" / records[0].mask)
    truth = render_story_mask(load_truth(tmp_path / "new" / "story_00000.truth.json"), 32)
    assert frames.shape == (*truth.shape, 3)
    assert np.abs(frames.astype(float).mean(-1) - truth).mean() < 3  # H.264 keeps the mask to a few levels

    # a folder from before masks: the same stories, no mask videos, no "mask" fields
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    for r in records:
        (tmp_path / "old" / r.mask).unlink()
    write_metadata(tmp_path / "old", [dataclasses.replace(r, mask=None) for r in records])
    assert main(["masks", "--data", str(tmp_path / "old")]) == 0
    assert read_metadata(tmp_path / "old") == records
    for r in records:
        old, new = read_video(tmp_path / "old" / r.mask)[0], read_video(tmp_path / "new" / r.mask)[0]
        # the same frames encoded twice: H.264 is not bit-exact from run to run (it failed once in a fresh clone;
        # two generations of one story differed by 0.3 levels on average), so equal up to a little encoder noise
        assert old.shape == new.shape and np.abs(old.astype(float) - new.astype(float)).mean() < 1
    (tmp_path / "old" / "story_00001.truth.json").unlink()
    assert main(["masks", "--data", str(tmp_path / "old")]) == 1


# the metadata's mask field


def test_the_mask_field_round_trips_and_leaves_records_without_one_as_they_were(tmp_path):
    segments = [{"start": 0.0, "text": "a"}, {"start": 3.0, "text": "b"}]
    plain = parse_record({"video": "v.mp4", "fps": 8, "segments": segments}, "m:1")
    masked = parse_record({"video": "v.mp4", "fps": 8, "segments": segments, "mask": "m/v.mp4"}, "m:2")
    assert plain.mask is None and masked.mask == "m/v.mp4"
    assert "mask" not in plain.to_json() and masked.to_json()["mask"] == "m/v.mp4"
    assert plain.key != masked.key  # a cache item holds the mask: another item
    # the key of a record without a mask is the hash it had before the field existed (old caches stay valid)
    import hashlib
    old = {"video": "v.mp4", "fps": 8.0, "segments": [{"start": 0.0, "text": "a", "scene_start": False},
                                                     {"start": 3.0, "text": "b", "scene_start": False}]}
    assert plain.key == "v-" + hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    write_metadata(tmp_path, [plain, masked])
    assert read_metadata(tmp_path) == [plain, masked]
    for bad in ("", 3):
        with pytest.raises(DatasetError, match=r"^m:3: mask: expected the path of a mask video"):
            parse_record({"video": "v.mp4", "fps": 8, "segments": segments, "mask": bad}, "m:3")


# precompute


def test_pool_mask_averages_the_pixels_of_each_latent_element():
    """Latent frame 0 is pixel frame 0, latent frame i >= 1 pixel frames r (i - 1) + 1 ... r i; each position a
    block of pixels; brightness is the mean of the three channels over 255. Checked against plain loops."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (1 + 4 * 3, 16, 24, 3), dtype=np.uint8)
    pooled = pool_mask(frames, 4, 4, 3)
    assert pooled.shape == (4, 4, 3) and pooled.dtype == torch.float32
    grey = frames.astype(np.float64).mean(axis=-1) / 255.0
    groups = [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    for i, group in enumerate(groups):
        for y in range(4):
            for x in range(3):
                expected = grey[group, 4 * y:4 * y + 4, 8 * x:8 * x + 8].mean()
                assert math.isclose(pooled[i, y, x].item(), expected, rel_tol=0, abs_tol=1e-6)
    with pytest.raises(DatasetError, match=r"^mask: 13 frames of 16x24 do not map onto 4 latent frames of 5x3"):
        pool_mask(frames, 4, 5, 3)


def write_masks(root: Path, records: list[VideoRecord], seed: int = 0) -> list[VideoRecord]:
    """A random grey mask video beside every video (same frame count and rate), and the records naming them."""
    rng = np.random.default_rng(seed)
    masked = []
    for r in records:
        frames, _ = read_video(root / r.video)
        grey = rng.integers(0, 256, frames.shape[:3], dtype=np.uint8)
        name = r.video.replace(".mp4", ".mask.mp4")
        write_video(np.repeat(grey[..., None], 3, axis=-1), root / name, SOURCE_FPS)
        masked.append(dataclasses.replace(r, mask=name))
    write_metadata(root, masked)
    return masked


def config(base, *overrides):
    return load_config(CONFIG, [*debug_overrides(base), *overrides])


def test_precompute_stores_the_pooled_mask_and_keeps_the_latents_of_a_cache_without_masks(base, tmp_path):
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    records = write_masks(tmp_path / "dataset", read_metadata(tmp_path / "dataset"))
    for r in records:  # the videos are not read again: their latents come from the cache made before the masks
        (tmp_path / "dataset" / r.video).unlink()
    cfg = config(tmp_path, f"model.pretrained={base / 'pipeline'}", f"data.latents_from={base / 'cache'}")
    assert precompute(cfg, torch.float32, Accelerator(cpu=True)) == {"done": 3, "skipped": 0, "failed": 0}
    for r in records:
        ours = load_file(item_path(tmp_path / "cache", r))
        source = load_file(item_path(base / "cache", dataclasses.replace(r, mask=None)))
        assert torch.equal(ours["latent_mean"], source["latent_mean"])
        segments, frames, _, h, w = ours["latent_mean"].shape
        assert ours["loss_mask"].shape == (segments, frames, h, w)
        decoded = dict(decode_segments(tmp_path / "dataset" / r.mask, r, cfg.data.fps, cfg.data.height,
                                       cfg.data.width))
        for j in range(segments):
            torch.testing.assert_close(ours["loss_mask"][j], pool_mask(decoded[j], frames, h, w))
    # a missing mask video is that video's failure, named
    (tmp_path / "dataset" / records[0].mask).unlink()
    shutil.rmtree(tmp_path / "cache")
    counts = precompute(cfg, torch.float32, Accelerator(cpu=True))
    assert counts == {"done": 2, "skipped": 0, "failed": 1}


# dataset, collate


def test_the_dataset_joins_masks_like_latents_and_requires_them_when_asked(base, tmp_path):
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    records = write_masks(tmp_path / "dataset", read_metadata(tmp_path / "dataset"))
    precompute(config(tmp_path, f"model.pretrained={base / 'pipeline'}"), torch.float32, Accelerator(cpu=True))
    ds = SequenceDataset(tmp_path / "dataset", tmp_path / "cache", segments=2, loss_mask=True)
    path = item_path(tmp_path / "cache", records[2])
    stored = load_file(path)["loss_mask"]
    index = next(i for i, (p, s) in enumerate(ds.windows) if p == path and s == 1)
    sample = ds[index]
    assert sample["loss_mask"].shape == sample["latent_mean"].shape[:1] + sample["latent_mean"].shape[2:]
    torch.testing.assert_close(sample["loss_mask"], torch.cat([stored[1], stored[2, 1:]]))
    assert "loss_mask" not in SequenceDataset(tmp_path / "dataset", tmp_path / "cache", segments=2)[index]
    batch = DiffusionCollate(1000, ds.scaling_factor)([ds[0], ds[1]])
    torch.testing.assert_close(batch["loss_mask"], torch.stack([ds[0]["loss_mask"], ds[1]["loss_mask"]]))
    # a dataset without masks cannot train with them: the metadata line is named
    with pytest.raises(DatasetError, match=r"metadata.jsonl:1: clips/video0.mp4 has no \"mask\" video; "
                       r"train.mask_weight > 0 needs one"):
        SequenceDataset(base / "dataset", base / "cache", segments=2, loss_mask=True)


# the loss term


def masked_batch(noise=CONTEXT_FIRST, seed=0):
    batch = collate(noise)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch["latents"].shape[:2] + batch["latents"].shape[3:], generator=g)
    batch["loss_mask"] = torch.where(mask > 0.7, mask, torch.zeros(()))  # sparse, with soft values
    return batch


@pytest.mark.parametrize("noise", [None, CONTEXT_FIRST], ids=["one level", "clean segment 1"])
def test_the_mask_term_is_the_mask_weighted_mean_error_over_noisy_frames(noise):
    """loss = plain loss + mask_weight x sum(mask x error) / sum(mask) over each sample's noisy frames and every
    channel, written out in float64 from the scheduler's formulas."""
    batch = masked_batch(noise)
    scheduler = make_scheduler("ddim")
    prediction = torch.randn(batch["latents"].shape)
    plain = diffusion_terms(Recorder(prediction.clone()), scheduler, batch).per_sample
    terms = diffusion_terms(Recorder(prediction.clone()), scheduler, batch, mask_weight=3.0)
    if noise is None:  # one level per sample, every frame noisy
        frame_t = batch["timesteps"][:, None].expand(batch["latents"].shape[:2])
        noisy = torch.ones(batch["latents"].shape[:2], dtype=torch.bool)
    else:
        frame_t, noisy = batch["frame_timesteps"], batch["frame_noisy"]
    a = scheduler.alphas_cumprod.double()[frame_t][:, :, None, None, None]
    latents, noise_ = batch["latents"].double(), batch["noise"].double()
    inputs = torch.where(noisy[:, :, None, None, None], a.sqrt() * latents + (1 - a).sqrt() * noise_, latents)
    errors = (a.sqrt() * inputs - (1 - a).sqrt() * prediction.double() - latents).pow(2) / (1 - a)
    mask = (batch["loss_mask"].double() * noisy[:, :, None, None])[:, :, None].expand_as(errors)
    expected = plain.double() + 3.0 * (errors * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
    torch.testing.assert_close(terms.per_sample.double(), expected, rtol=1e-5, atol=0)
    total, weight = terms.later_masked(N, FRAMES_PER_SEGMENT)
    later = mask[:, FRAMES_FIRST:]
    torch.testing.assert_close(total.double(), (errors[:, FRAMES_FIRST:] * later).sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(weight.double(), later.sum(), rtol=1e-6, atol=0)


def test_mask_dilate_grows_the_mask_by_its_neighbourhoods_largest_value():
    """train.mask_dilate=d: every latent position takes the mask's largest value within d positions (in the same
    frame) before the term weighs the errors; written out with plain loops in float64."""
    batch = masked_batch(seed=1)
    scheduler = make_scheduler("ddim")
    prediction = torch.randn(batch["latents"].shape)
    plain = diffusion_terms(Recorder(prediction.clone()), scheduler, batch, mask_weight=1.0)
    for d in (1, 2):
        grown = torch.zeros(batch["loss_mask"].shape, dtype=torch.float64)
        mask = batch["loss_mask"].double()
        B, T, h, w = mask.shape
        for b, f, y, x in np.ndindex(B, T, h, w):
            grown[b, f, y, x] = mask[b, f, max(0, y - d):y + d + 1, max(0, x - d):x + d + 1].max()
        assert (grown > mask).any()  # the test's mask has room to grow
        by_hand = dict(batch, loss_mask=grown.float())
        expected = diffusion_terms(Recorder(prediction.clone()), scheduler, by_hand, mask_weight=1.0)
        dilated = diffusion_terms(Recorder(prediction.clone()), scheduler, batch, mask_weight=1.0, mask_dilate=d)
        torch.testing.assert_close(dilated.per_sample, expected.per_sample, rtol=1e-6, atol=0)
        torch.testing.assert_close(dilated.mask_frame, expected.mask_frame, rtol=1e-6, atol=0)
        assert not torch.allclose(dilated.per_sample, plain.per_sample)
    with pytest.raises(ConfigError, match=r"train.mask_dilate: expected a whole number of latent positions >= 0, "
                       r"got -1"):
        load_config(None, ["train.mask_dilate=-1"])


def test_the_mask_term_is_zero_without_mask_and_needs_a_mask():
    batch = masked_batch()
    batch["loss_mask"][0] = 0.0  # sample 0 shows nothing the mask marks
    scheduler = make_scheduler("ddim")
    prediction = torch.randn(batch["latents"].shape)
    plain = diffusion_terms(Recorder(prediction.clone()), scheduler, batch).per_sample
    weighted = diffusion_terms(Recorder(prediction.clone()), scheduler, batch, mask_weight=2.0).per_sample
    assert weighted[0] == plain[0] and weighted[1] > plain[1]
    del batch["loss_mask"]
    with pytest.raises(ValueError, match=r"train.mask_weight > 0 needs the batch's loss_mask"):
        diffusion_terms(Recorder(prediction.clone()), scheduler, batch, mask_weight=2.0)
    with pytest.raises(ConfigError, match=r"train.mask_weight: expected a weight >= 0, got -1"):
        load_config(None, ["train.mask_weight=-1"])


def test_train_py_trains_with_masks_and_logs_the_later_masked_loss(base, tmp_path):
    """train.mask_weight wires the dataset's masks into the loss; the log has loss/later_masked beside
    loss/later_segments; a dataset without masks stops the run before training, naming the metadata line."""
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    write_masks(tmp_path / "dataset", read_metadata(tmp_path / "dataset"))
    precompute(config(tmp_path, f"model.pretrained={base / 'pipeline'}"), torch.float32, Accelerator(cpu=True))
    run = tmp_path / "run"
    common = [sys.executable, "train.py", "--config", str(CONFIG), *debug_overrides(tmp_path),
              f"model.pretrained={base / 'pipeline'}", "train.steps=2", "log.every=1", "checkpoint.every=0",
              "validation.every=0", "train.mask_weight=2.0"]
    result = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs] == [1, 2]
    assert all(math.isfinite(log["loss/later_masked"]) and math.isfinite(log["loss/later_segments"]) for log in logs)
    # train.mask_dilate reaches the loss: the same first step with the grown mask logs another masked loss
    result = subprocess.run([*common, "train.steps=1", "train.mask_dilate=1", f"output_dir={tmp_path / 'grown'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    grown = json.loads((tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isclose(grown["loss/later_segments"], logs[0]["loss/later_segments"], rel_tol=1e-6)
    assert not math.isclose(grown["loss/later_masked"], logs[0]["loss/later_masked"], rel_tol=1e-5)
    result = subprocess.run([*common, f"data.root={base / 'dataset'}", f"data.cache={base / 'cache'}",
                             f"output_dir={tmp_path / 'run2'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0
    assert 'metadata.jsonl:1: clips/video0.mp4 has no "mask" video' in result.stderr.splitlines()[-1]
