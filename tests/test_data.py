"""Dataset format, precompute (decode → resample → crop → VAE / text encoder → cache) and the sequence dataset."""

import dataclasses
import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tiny import other_weights
from tiny_training import CONFIG, cpu_launch, debug_overrides, prepared

from pipeline.data import (
    DatasetError,
    EpochSampler,
    SegmentInfo,
    SequenceDataset,
    VideoRecord,
    check_manifest,
    item_path,
    read_metadata,
    write_metadata,
)
from pipeline.data.precompute import decode_segments, encode_frames, precompute, segment_frame_times
from pipeline.data.precompute import main as precompute_main
from pipeline.data.prepare import prepare_captions, prepare_scenes, whole_segments
from pipeline.text_encoding import encode_text
from pipeline.training.components import build_components, training_scheduler
from pipeline.training.config import ConfigError, load_config
from pipeline.training.loss import DiffusionCollate
from pipeline.training.setup import build_loader, build_replay_loader
from pipeline.video_io import read_video, write_video


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("tiny"))


def config(base, *overrides):
    return load_config(CONFIG, [*debug_overrides(base), *overrides])


def record(segments=3, cuts=(), fps=8.0, start=0.0, video="v.mp4"):
    return VideoRecord(video, fps, tuple(SegmentInfo(start + 3.0 * i, f"text {i}", i in cuts) for i in range(segments)))


# metadata


def test_metadata_round_trip(tmp_path):
    records = [record(3, cuts=(1,)), record(1, video="sub/w.mp4", start=1.5)]
    path = write_metadata(tmp_path, records)
    assert not list(tmp_path.glob(".*.tmp"))
    assert read_metadata(tmp_path) == records
    assert len(path.read_text().splitlines()) == 2
    assert records[0].key != record(3, cuts=()).key  # an edited record is a new cache item


@pytest.mark.parametrize("line, message", [
    ('{"video": "a.mp4", "fps": 30, "segments": [{"start": 0}, {"start": 4}]}',
     "metadata.jsonl:2: segments[1].start: expected 3 (3 s after the previous segment), got 4"),
    ('{"fps": 30, "segments": [{"start": 0}]}', "metadata.jsonl:2: video: expected a path"),
    ('{"video": "a.mp4", "fps": 0, "segments": [{"start": 0}]}', "metadata.jsonl:2: fps: expected the source frame"),
    ('{"video": "a.mp4", "fps": 30, "segments": []}', "metadata.jsonl:2: segments: expected a non-empty list"),
    ('{"video": "a.mp4", "fps": 30, "segments": [{"start": 0, "caption": "x"}]}',
     "metadata.jsonl:2: segments[0]: unknown field 'caption'"),
    ('{"video": "a.mp4", "fps": 30, "segments": [{"start": 0, "scene_start": "yes"}]}',
     "metadata.jsonl:2: segments[0].scene_start: expected true or false"),
    ('{"video": "a.mp4", "fps": 30, "segments": [{"start": 0, "text": 3}]}', "segments[0].text: expected a string"),
    ('{"video": "a.mp4", "fps": 30, "segments": [{"start": 0}], "extra": 1}', "unknown field 'extra'"),
    ('{"video": "a.mp4", "fps": 30, "segments": [{"start": 0, "captions": {"dense": 3}}]}',
     "segments[0].captions: expected an object of register name -> text"),
    ('{"video": "a.mp4", "fps": 30, "segments": [{"start": 0, "captions": {"text": "x"}}]}',
     "segments[0].captions: 'text' is the segment's own text field"),
    ("{not json", "metadata.jsonl:2: not valid JSON"),
])
def test_bad_metadata_names_line_and_field(tmp_path, line, message):
    good = json.dumps(record(1).to_json())
    (tmp_path / "metadata.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(DatasetError) as e:
        read_metadata(tmp_path)
    assert message in str(e.value)


def test_missing_metadata(tmp_path):
    with pytest.raises(DatasetError, match="metadata.jsonl: not found"):
        read_metadata(tmp_path)


# decoding and resampling


def test_frame_times_stop_at_cuts_and_the_end():
    times = segment_frame_times(record(3, cuts=(2,)), fps=4)  # 12 frames per segment, 13 times each
    assert [len(t) for t in times] == [13, 13, 13]
    assert times[0] == [i / 4 for i in range(12)] + [3.0]  # continues into segment 1: its first frame
    assert times[1][-1] == times[1][-2] == 3.0 + 11 / 4  # segment 2 opens a scene: the last frame repeats
    assert times[2][-1] == times[2][-2]  # end of the video


def test_decode_resamples_by_source_index_and_crops(tmp_path):
    """Every source frame is a flat grey level that encodes its index; at 8 → 4 fps frame i of segment j must be
    source frame 24 j + 2 i. The 48x64 source is covered and center-cropped to 32x32."""
    levels = (np.arange(3 * 24) * 3).astype(np.uint8)
    frames = np.repeat(levels[:, None, None, None], 48 * 64 * 3, axis=1).reshape(-1, 48, 64, 3)
    write_video(frames, tmp_path / "grey.mp4", fps=8, crf=0)
    rec = record(3, fps=8.0, video="grey.mp4")
    segments = list(decode_segments(tmp_path / "grey.mp4", rec, fps=4, height=32, width=32))
    assert [j for j, _ in segments] == [0, 1, 2]
    for j, seg in segments:
        assert seg.shape == (13, 32, 32, 3) and seg.dtype == np.uint8
        wanted = [24 * j + 2 * i for i in range(12)] + [24 * (j + 1) if j < 2 else 24 * j + 22]
        np.testing.assert_allclose(seg.reshape(13, -1).mean(axis=1), levels[wanted], atol=2)


def test_decode_reports_a_short_video(tmp_path):
    write_video(np.zeros((10, 32, 32, 3), np.uint8), tmp_path / "short.mp4", fps=8)
    with pytest.raises(DatasetError, match="short.mp4: segment 0 needs frame"):
        list(decode_segments(tmp_path / "short.mp4", record(1, video="short.mp4"), 4, 32, 32))


# precompute


def test_precompute_matches_direct_encoding(base):
    """The cache holds, per segment, exactly the VAE posterior of the resampled frames and encode_text of the text
    (the sampler's text function); null.safetensors holds the encoded empty text."""
    cfg = config(base)
    parts = build_components(cfg.model, cfg.train, ("tokenizer", "text_encoder", "vae"))
    manifest = json.loads((base / "cache" / "manifest.json").read_text())
    assert manifest == {"version": 1, "model": str(base / "pipeline"), "height": 32, "width": 32, "fps": 4,
                        "max_text_length": 8, "latent_frames_first": 4, "latent_frames_per_segment": 3,
                        "latent_channels": 4, "text_embed_dim": 16, "caption": "text",
                        "scaling_factor": parts["vae"].config.scaling_factor}
    rec = read_metadata(base / "dataset")[0]
    item = load_file(item_path(base / "cache", rec))
    assert item["latent_mean"].shape == (3, 4, 4, 4, 4)  # (segments, 1 + 3 latent frames, C, h, w)
    assert item["scene_start"].tolist() == [s.scene_start for s in rec.segments]

    # reference frames: read independently with read_video, source index round(t * 8), resized by covering
    # (48x64 → 32x43) and center-cropped; PyAV's area resize and torch's differ by rounding only
    source, fps = read_video(base / "dataset" / rec.video)
    assert fps == 8
    decoded = dict(decode_segments(base / "dataset" / rec.video, rec, 4, 32, 32))
    for j, times in enumerate(segment_frame_times(rec, 4)):
        frames = torch.from_numpy(source[[round(t * fps) for t in times]]).permute(0, 3, 1, 2).float()
        reference = torch.nn.functional.interpolate(frames, size=(32, 43), mode="area")[..., 5:37]
        assert (torch.from_numpy(decoded[j]).permute(0, 3, 1, 2).float() - reference).abs().mean() < 2.5
        mean, logvar = encode_frames(parts["vae"], decoded[j])
        torch.testing.assert_close(item["latent_mean"][j], mean)
        torch.testing.assert_close(item["latent_logvar"][j], logvar)

    text, mask = encode_text(parts["tokenizer"], parts["text_encoder"], [s.text for s in rec.segments], 8)
    torch.testing.assert_close(item["text"], text)
    assert torch.equal(item["text_mask"], mask)
    null = load_file(base / "cache" / "null.safetensors")
    null_text, null_mask = encode_text(parts["tokenizer"], parts["text_encoder"], [""], 8)
    torch.testing.assert_close(null["text"], null_text[0])
    assert torch.equal(null["text_mask"], null_mask[0])


# what build_loader and build_replay_loader read of a model: the tiny test pipeline's sizes
MODEL_SIZES = SimpleNamespace(config=SimpleNamespace(
    max_text_seq_length=8, latent_frames_first=4, latent_frames_per_segment=3, in_channels=4, text_embed_dim=16))


def with_dense(records: list[VideoRecord], skip: str | None = None) -> list[VideoRecord]:
    """The records with a "dense" caption on every segment (none on the video named `skip`)."""
    return [dataclasses.replace(r, segments=tuple(
        dataclasses.replace(s, captions={} if r.video == skip else {"dense": f"dense {i} {r.video}"})
        for i, s in enumerate(r.segments))) for r in records]


def test_captions_in_other_registers_round_trip(tmp_path):
    records = with_dense([record(2)])
    write_metadata(tmp_path, records)
    line = json.loads((tmp_path / "metadata.jsonl").read_text())
    assert line["segments"][1]["captions"] == {"dense": "dense 1 v.mp4"}
    assert read_metadata(tmp_path) == records
    assert records[0].segments[1].caption("dense") == "dense 1 v.mp4"
    assert records[0].segments[1].caption("text") == "text 1" and records[0].segments[1].caption("other") is None
    assert "captions" not in json.dumps(record(2).to_json())  # metadata without registers is written as before


def test_precompute_embeds_the_register_the_config_names(base, tmp_path):
    """data.caption=dense: the cache holds encode_text of each segment's dense caption, the manifest says so, and
    training that expects the story register (data.caption=text) refuses that cache."""
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    records = with_dense(read_metadata(tmp_path / "dataset"))
    write_metadata(tmp_path / "dataset", records)
    cfg = config(tmp_path, f"model.pretrained={base / 'pipeline'}", "data.caption=dense")
    assert precompute(cfg, torch.float32, Accelerator(cpu=True))["done"] == len(records)
    parts = build_components(cfg.model, cfg.train, ("tokenizer", "text_encoder"))
    item = load_file(item_path(tmp_path / "cache", records[0]))
    dense = [s.captions["dense"] for s in records[0].segments]
    text, mask = encode_text(parts["tokenizer"], parts["text_encoder"], dense, 8)
    torch.testing.assert_close(item["text"], text)
    assert torch.equal(item["text_mask"], mask)
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["caption"] == "dense"
    with pytest.raises(DatasetError, match=r"the cache was precomputed with caption='dense' .* training expects "
                       r"caption='text'"):
        SequenceDataset(tmp_path / "dataset", tmp_path / "cache", segments=2, expected={"caption": "text"})
    SequenceDataset(tmp_path / "dataset", tmp_path / "cache", segments=2, expected={"caption": "dense"})


def dense_dataset_with_story_cache(base, tmp_path) -> tuple[list[VideoRecord], Path]:
    """A copy of the dataset in tmp_path/dataset with a "dense" caption on every segment, and its story-register
    cache precomputed in tmp_path/story: (its records, the cache)."""
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    records = with_dense(read_metadata(tmp_path / "dataset"))
    write_metadata(tmp_path / "dataset", records)
    story = tmp_path / "story"
    precompute(config(tmp_path, f"model.pretrained={base / 'pipeline'}", f"data.cache={story}"), torch.float32,
               Accelerator(cpu=True))
    return records, story


def test_a_second_register_copies_the_latents_of_the_first_cache(base, tmp_path):
    """data.latents_from: the dense cache takes its latents from the story cache (the videos are not read again:
    they are gone here) and embeds its own texts; a source made with other latents is refused, naming the field."""
    records, story = dense_dataset_with_story_cache(base, tmp_path)
    for r in records:
        (tmp_path / "dataset" / r.video).unlink()
    cfg = config(tmp_path, f"model.pretrained={base / 'pipeline'}", "data.caption=dense", f"data.latents_from={story}")
    assert precompute(cfg, torch.float32, Accelerator(cpu=True)) == {"done": len(records), "skipped": 0, "failed": 0}
    for r in records:
        ours, source = load_file(item_path(tmp_path / "cache", r)), load_file(item_path(story, r))
        assert torch.equal(ours["latent_mean"], source["latent_mean"])
        assert torch.equal(ours["latent_logvar"], source["latent_logvar"])
        assert not torch.equal(ours["text"], source["text"])  # the dense captions, not the story texts
    other = tmp_path / "other"
    shutil.copytree(story, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "scaling_factor": 0.5}))
    cfg = config(tmp_path, f"model.pretrained={base / 'pipeline'}", "data.caption=dense",
                 f"data.latents_from={other}", f"data.cache={tmp_path / 'cache2'}")
    with pytest.raises(DatasetError, match=r"^data.latents_from: .*manifest.json was made with other latents "
                       r"\(scaling_factor=0.5, here "):
        precompute(cfg, torch.float32, Accelerator(cpu=True))


def test_a_dataset_that_gained_a_register_keeps_the_latents_of_the_cache_made_before(base, tmp_path):
    """A register added to the metadata changes every record's key, but data.latents_from still finds the items
    made before it (the same record with fewer registers): the videos are not read again (they are gone here)."""
    records, story = dense_dataset_with_story_cache(base, tmp_path)
    grown = [dataclasses.replace(r, segments=tuple(
        dataclasses.replace(s, captions={**s.captions, "extra": f"extra {i}"}) for i, s in enumerate(r.segments)))
        for r in records]
    write_metadata(tmp_path / "dataset", grown)
    for old, new in zip(records, grown):
        assert old.key != new.key
        (tmp_path / "dataset" / old.video).unlink()
    cfg = config(tmp_path, f"model.pretrained={base / 'pipeline'}", "data.caption=extra", f"data.latents_from={story}")
    assert precompute(cfg, torch.float32, Accelerator(cpu=True)) == {"done": len(grown), "skipped": 0, "failed": 0}
    for old, new in zip(records, grown):
        ours, source = load_file(item_path(tmp_path / "cache", new)), load_file(item_path(story, old))
        assert torch.equal(ours["latent_mean"], source["latent_mean"])


def test_a_register_missing_from_the_metadata_stops_precompute_before_loading(base, tmp_path, monkeypatch):
    import pipeline.data.precompute as module

    shutil.copytree(base / "dataset", tmp_path / "dataset")
    records = read_metadata(tmp_path / "dataset")
    write_metadata(tmp_path / "dataset", with_dense(records, skip=records[1].video))
    monkeypatch.setattr(module, "build_components", lambda *a, **k: pytest.fail("components loaded"))
    with pytest.raises(DatasetError, match=rf"^{records[1].video}: segment 1 has no caption in register 'dense'"):
        precompute(config(tmp_path, "data.caption=dense"), torch.float32, Accelerator(cpu=True))


def test_a_manifest_from_before_registers_means_the_story_register(base):
    manifest = json.loads((base / "cache" / "manifest.json").read_text())
    del manifest["caption"]
    check_manifest(manifest, {"caption": "text"}, base / "cache")
    with pytest.raises(DatasetError, match=r"precomputed with caption='text' .* training expects caption='dense'"):
        check_manifest(manifest, {"caption": "dense"}, base / "cache")


def test_precompute_resumes_and_skips_bad_videos(base, tmp_path):
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    shutil.copytree(base / "cache", tmp_path / "cache")
    shutil.copytree(base / "pipeline", tmp_path / "pipeline")
    records = read_metadata(tmp_path / "dataset")
    item_path(tmp_path / "cache", records[1]).unlink()
    (tmp_path / "dataset" / "clips" / "broken.mp4").write_bytes(b"not a video")
    write_metadata(tmp_path / "dataset", [*records, record(1, video="clips/broken.mp4"),
                                          record(1, video="clips/absent.mp4")])
    counts = precompute(config(tmp_path), torch.float32, Accelerator(cpu=True))
    assert counts == {"done": 1, "skipped": 2, "failed": 2}
    assert item_path(tmp_path / "cache", records[1]).is_file()
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_precompute_reads_a_manifest_from_before_registers_as_the_story_register(base, tmp_path):
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    shutil.copytree(base / "cache", tmp_path / "cache")
    path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["caption"]
    path.write_text(json.dumps(manifest))
    records = read_metadata(tmp_path / "dataset")
    pipeline_dir = f"model.pretrained={base / 'pipeline'}"
    assert precompute(config(tmp_path, pipeline_dir), torch.float32, Accelerator(cpu=True))["skipped"] == len(records)
    write_metadata(tmp_path / "dataset", with_dense(records))
    with pytest.raises(DatasetError, match=r"this cache was made with other settings \(caption='text', now 'dense'\)"):
        precompute(config(tmp_path, pipeline_dir, "data.caption=dense"), torch.float32, Accelerator(cpu=True))


def test_precompute_command_fails_when_videos_failed(base, tmp_path):
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    shutil.copytree(base / "cache", tmp_path / "cache")
    records = read_metadata(tmp_path / "dataset")
    write_metadata(tmp_path / "dataset", [*records, record(1, video="clips/absent.mp4")])
    metadata = tmp_path / "dataset" / "metadata.jsonl"
    with pytest.raises(DatasetError, match=r"^1 of 4 videos failed \(the warnings above name them and why\) and are "
                       rf"not in {tmp_path / 'cache'}; fix or remove them in {metadata}"):
        precompute_main(["--config", str(CONFIG), "--dtype", "float32", *debug_overrides(tmp_path),
                         f"model.pretrained={base / 'pipeline'}"])


def test_corrupt_manifest_and_null_embedding_name_the_file(base, tmp_path):
    shutil.copytree(base / "cache", tmp_path / "cache")
    (tmp_path / "cache" / "null.safetensors").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'cache' / 'null.safetensors'}: unreadable .*run the "
                       "precompute again"):
        SequenceDataset(base / "dataset", tmp_path / "cache", segments=2)
    (tmp_path / "cache" / "manifest.json").write_text("[1, 2")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'cache' / 'manifest.json'}: not valid JSON"):
        SequenceDataset(base / "dataset", tmp_path / "cache", segments=2)


def test_precompute_on_two_processes_splits_the_videos(base, tmp_path):
    """`accelerate launch -m pipeline.data.precompute` on 2 CPU processes writes the same cache as one process."""
    launch, env = cpu_launch(2)
    command = [*launch, "-m", "pipeline.data.precompute", "--config", str(CONFIG), "--dtype", "float32",
               *debug_overrides(base), f"data.cache={tmp_path / 'cache'}"]
    result = subprocess.run(command, cwd=CONFIG.parents[1], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precompute [0]: {'done': 2" in result.stderr and "precompute [1]: {'done': 1" in result.stderr
    for rec in read_metadata(base / "dataset"):
        ours, reference = load_file(item_path(tmp_path / "cache", rec)), load_file(item_path(base / "cache", rec))
        assert ours.keys() == reference.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "cache" / "manifest.json").read_text() == (base / "cache" / "manifest.json").read_text()


def test_precompute_refuses_a_cache_made_with_other_settings(base, tmp_path):
    shutil.copytree(base / "cache", tmp_path / "cache")
    cfg = config(base, f"data.cache={tmp_path / 'cache'}", "data.height=64")
    with pytest.raises(DatasetError, match="height=32, now 64"):
        precompute(cfg, torch.float32, Accelerator(cpu=True))


# the sequence dataset


def test_sequences_join_segments(base):
    cache = base / "cache"
    ds = SequenceDataset(base / "dataset", cache, segments=2)
    assert len(ds) == 2 + 1 + 3  # windows of 2 in videos of 3, 2 and 4 segments
    ds3 = SequenceDataset(base / "dataset", cache, segments=3, stride=2)
    assert len(ds3) == 1 + 0 + 1  # starts 0 (3 segments), none (2), 0 (4; start 2 would run past the end)
    assert ds3.skipped["too_short"] == 1

    rec = read_metadata(base / "dataset")[2]  # 4 segments, scenes open at 1 and 3
    item = load_file(item_path(cache, rec))
    index = next(i for i, (p, s) in enumerate(ds.windows) if p == item_path(cache, rec) and s == 1)
    sample = ds[index]
    assert sample["latent_mean"].shape == (4 + 3, 4, 4, 4)
    expected = torch.cat([item["latent_mean"][1], item["latent_mean"][2, 1:]])  # later segments drop latent 0
    torch.testing.assert_close(sample["latent_mean"], expected)
    torch.testing.assert_close(sample["text"], item["text"][1:3])
    assert sample["scene_start"].tolist() == [False, False]  # segment 1 opens a scene, but it starts the sequence
    index = next(i for i, (p, s) in enumerate(ds.windows) if p == item_path(cache, rec) and s == 2)
    assert ds[index]["scene_start"].tolist() == [False, True]


def test_sequences_whose_caption_matches_appear_repeat_times_per_epoch(base):
    """data.repeat_pattern / repeat_times: a window with a segment whose caption (the cache's register) matches
    appears repeat_times times; the others once; no match at all, or a bad pattern, is refused up front."""
    root, cache = base / "dataset", base / "cache"
    plain = SequenceDataset(root, cache, segments=1)
    records = {item_path(cache, r): r for r in read_metadata(root)}
    red = [(item, start) for item, start in plain.windows if "red" in records[item].segments[start].text]
    assert len(plain) == 9 and len(red) == 2  # "a red square slides to the right" in videos 1 and 3
    thrice = SequenceDataset(root, cache, segments=1, repeat_pattern=r"\bred\b", repeat_times=3)
    assert len(thrice) == 9 + 2 * 2 and thrice.repeated == 2
    assert sorted(thrice.windows) == sorted(plain.windows + red + red)
    pairs = SequenceDataset(root, cache, segments=2, repeat_pattern="red", repeat_times=2)
    assert len(pairs) == 6 + 3  # windows of 2 that hold a red segment: (1-2) of video 1, (2-3), (3-4) of video 3
    assert len(SequenceDataset(root, cache, segments=1, repeat_pattern="red", repeat_times=1)) == 9
    with pytest.raises(DatasetError, match=r"^data.repeat_pattern: no sequence's 'text' caption matches 'purple'"):
        SequenceDataset(root, cache, segments=1, repeat_pattern="purple", repeat_times=2)
    cfg = config(base, "data.segments=1", "data.repeat_pattern=red", "data.repeat_times=3")
    assert len(build_loader(cfg, MODEL_SIZES, 1000).dataset) == 13  # the config reaches the dataset
    with pytest.raises(ConfigError, match=r"^data.repeat_pattern: expected a regular expression for "
                       r"data.repeat_times 2, got none$"):
        config(base, "data.repeat_times=2")
    with pytest.raises(ConfigError, match=r"^data.repeat_pattern: not a regular expression .*: '\(red'$"):
        config(base, "data.repeat_pattern=(red", "data.repeat_times=2")
    with pytest.raises(ConfigError, match=r"data.repeat_times"):
        config(base, "data.repeat_times=0")


def test_text_dropout_uses_the_null_embedding(base):
    null = load_file(base / "cache" / "null.safetensors")
    always = SequenceDataset(base / "dataset", base / "cache", segments=2, text_dropout=1.0)
    never = SequenceDataset(base / "dataset", base / "cache", segments=2, text_dropout=0.0)
    sample = always[(0, 7)]
    torch.testing.assert_close(sample["text"], null["text"].expand(2, -1, -1))
    assert torch.equal(sample["text_mask"], null["text_mask"].expand(2, -1))
    assert not torch.allclose(never[(0, 7)]["text"], sample["text"])
    half = SequenceDataset(base / "dataset", base / "cache", segments=2, text_dropout=0.5)
    dropped = [torch.equal(half[(0, seed)]["text"], sample["text"]) for seed in range(200)]
    assert 60 < sum(dropped) < 140  # about half
    assert dropped == [torch.equal(half[(0, seed)]["text"], sample["text"]) for seed in range(200)]  # by seed


def story_and_dense_caches(base, tmp_path):
    """A copy of the base dataset with dense captions, and two caches of it: the story register's and the dense one's
    (its latents copied from the story cache). Returns (root, story cache, dense cache, records)."""
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    records = with_dense(read_metadata(tmp_path / "dataset"))
    write_metadata(tmp_path / "dataset", records)
    root, story, dense = tmp_path / "dataset", tmp_path / "story", tmp_path / "dense"
    dense_overrides = ["data.caption=dense", f"data.latents_from={story}", f"data.cache={dense}"]
    for overrides in ([f"data.cache={story}"], dense_overrides):
        precompute(config(tmp_path, f"model.pretrained={base / 'pipeline'}", *overrides), torch.float32,
                   Accelerator(cpu=True))
    return root, story, dense, records


def test_a_mix_cache_gives_some_sequences_the_other_registers_texts(base, tmp_path):
    """data.mix_cache / mix_rate: with probability mix_rate a sequence takes all its texts from the other register's
    cache (its latents still from data.cache), chosen by the sample's seed; text dropout still wins; rate 0 reads
    exactly what it always did; a mix cache without every video, or a rate without a cache, is refused up front."""
    root, story, dense, records = story_and_dense_caches(base, tmp_path)
    plain = SequenceDataset(root, story, segments=2)
    always = SequenceDataset(root, story, segments=2, mix_cache=dense, mix_rate=1.0)
    start = plain.windows[1][1]
    dense_item = load_file(item_path(dense, records[0]))
    sample, mixed = plain[(1, 3)], always[(1, 3)]
    torch.testing.assert_close(mixed["text"], dense_item["text"][start:start + 2].float())
    assert torch.equal(mixed["text_mask"], dense_item["text_mask"][start:start + 2].bool())
    assert not torch.allclose(mixed["text"], sample["text"])
    for key in ("latent_mean", "latent_logvar", "scene_start"):
        assert torch.equal(mixed[key], sample[key])
    half = SequenceDataset(root, story, segments=2, mix_cache=dense, mix_rate=0.5, text_dropout=0.2)
    never = SequenceDataset(root, story, segments=2, text_dropout=0.2)
    null = load_file(base / "cache" / "null.safetensors")["text"]

    def kind(seed):  # which texts sample (0, seed) of `half` got
        text = half[(0, seed)]["text"]
        if torch.equal(text, never[(0, seed)]["text"]):
            return "null" if torch.allclose(text, null.expand_as(text)) else "story"
        torch.testing.assert_close(text, always[(0, seed)]["text"])
        return "dense"

    kinds = [kind(seed) for seed in range(200)]
    assert 10 < kinds.count("null") < 70 and 50 < kinds.count("dense") < 110  # about 40 and 80 of 200
    assert kinds == [kind(seed) for seed in range(200)]  # the same by seed
    cfg = config(tmp_path, f"data.root={root}", f"data.cache={story}", f"data.mix_cache={dense}", "data.mix_rate=0.5")
    loaded = build_loader(cfg, MODEL_SIZES, 1000).dataset  # the config reaches the dataset
    assert (loaded.mix_rate, loaded.mix_cache, len(loaded.mix_items)) == (0.5, dense, 3)
    dropped = SequenceDataset(root, story, segments=2, mix_cache=dense, mix_rate=1.0, text_dropout=1.0)
    torch.testing.assert_close(dropped[(0, 5)]["text"], null.expand(2, -1, -1))
    item_path(dense, records[-1]).unlink()
    with pytest.raises(DatasetError, match=r"items/video2-.*safetensors: not found in the mix cache; expected the "
                       r"texts of the video's 4 segments"):
        SequenceDataset(root, story, segments=2, mix_cache=dense, mix_rate=0.5)
    with pytest.raises(ConfigError, match=r"^data.mix_cache: expected a precompute cache folder for data.mix_rate "
                       r"0.3, got none$"):
        config(tmp_path, "data.mix_rate=0.3")
    with pytest.raises(ConfigError, match=r"^data.mix_rate: expected a probability in \[0, 1\], got 1.5$"):
        config(tmp_path, "data.mix_rate=1.5", f"data.mix_cache={dense}")


def test_a_told_cache_gives_every_sequence_the_told_texts_beside_its_own(base, tmp_path):
    """data.told_cache (for train.told_weight): every item also carries the told cache's texts of its segments, and
    told says whether its own texts are the cache's (not dropped, not mixed); its own texts are drawn as without it."""
    root, story, dense, records = story_and_dense_caches(base, tmp_path)
    mixing = {"segments": 2, "mix_cache": dense, "mix_rate": 0.5, "text_dropout": 0.2}
    plain = SequenceDataset(root, story, segments=2, text_dropout=0.2)
    without, told = SequenceDataset(root, story, **mixing), SequenceDataset(root, story, told_cache=dense, **mixing)
    start = told.windows[1][1]
    dense_item = load_file(item_path(dense, records[0]))
    null = load_file(base / "cache" / "null.safetensors")["text"]
    owns = []
    for seed in range(60):
        item = told[(1, seed)]
        torch.testing.assert_close(item["told_text"], dense_item["text"][start:start + 2].float())
        assert torch.equal(item["told_text_mask"], dense_item["text_mask"][start:start + 2].bool())
        torch.testing.assert_close(item["text"], without[(1, seed)]["text"])  # the same draws as without it
        owns.append(bool(item["told"]))
        if owns[-1]:  # the story texts
            torch.testing.assert_close(item["text"], plain[(1, seed)]["text"])
        else:  # dropped or mixed
            assert torch.allclose(item["text"], null.expand_as(item["text"])) or torch.equal(item["text"],
                                                                                               item["told_text"])
    assert 10 < sum(owns) < 50  # about 0.8 x 0.5 of 60
    assert "told_text" not in without[(1, 0)]
    cfg = config(tmp_path, f"data.root={root}", f"data.cache={story}", f"data.told_cache={dense}",
                 "train.told_weight=1.0")
    assert build_loader(cfg, MODEL_SIZES, 1000).dataset.told_cache == dense  # the config reaches the dataset
    unused = config(tmp_path, f"data.root={root}", f"data.cache={story}", f"data.told_cache={dense}")
    assert build_loader(unused, MODEL_SIZES, 1000).dataset.told_cache is None  # read only for the term
    item_path(dense, records[-1]).unlink()
    with pytest.raises(DatasetError, match=r"items/video2-.*safetensors: not found in the told cache; expected the "
                       r"texts of the video's 4 segments"):
        SequenceDataset(root, story, segments=2, told_cache=dense)
    with pytest.raises(ConfigError, match=r"^data.told_cache: expected a precompute cache folder for "
                       r"train.told_weight 0.5, got none$"):
        config(tmp_path, "train.told_weight=0.5")
    with pytest.raises(ConfigError, match=r"^train.told_weight: expected a weight >= 0, got -1"):
        config(tmp_path, "train.told_weight=-1", f"data.told_cache={dense}")


def test_repeat_pattern_matches_the_mix_caches_register_too_and_reaches_the_replay(base, tmp_path):
    """A sequence repeats when its captions match in the cache's register or in the mix cache's (its texts may come
    from either); data.replay.repeat_pattern / repeat_times reach the replayed segments, whose texts come from
    data.replay.cache; a pattern that matches neither register is refused, naming the setting."""
    shutil.copytree(base / "dataset", tmp_path / "dataset")
    records = with_dense(read_metadata(tmp_path / "dataset"))  # "dense 0 video0.mp4", ...: only in that register
    write_metadata(tmp_path / "dataset", records)
    root, story, dense = tmp_path / "dataset", tmp_path / "story", tmp_path / "dense"
    for overrides in ([f"data.cache={story}"], ["data.caption=dense", f"data.latents_from={story}",
                                                 f"data.cache={dense}"]):
        precompute(config(tmp_path, f"model.pretrained={base / 'pipeline'}", *overrides), torch.float32,
                   Accelerator(cpu=True))
    first = r"^dense 0 "  # the first segment of every video
    with pytest.raises(DatasetError, match=r"^data.repeat_pattern: no sequence's 'text' caption matches"):
        SequenceDataset(root, story, segments=1, repeat_pattern=first, repeat_times=3)
    plain = SequenceDataset(root, story, segments=1, mix_cache=dense, mix_rate=0.5)
    thrice = SequenceDataset(root, story, segments=1, mix_cache=dense, mix_rate=0.5, repeat_pattern=first,
                             repeat_times=3)
    assert thrice.repeated == len(records) == 3
    assert sorted(thrice.windows) == sorted(plain.windows + 2 * [w for w in plain.windows if w[1] == 0])
    with pytest.raises(DatasetError, match=r"^data.repeat_pattern: no sequence's 'text' or 'dense' caption matches "
                       r"'purple'"):
        SequenceDataset(root, story, segments=1, mix_cache=dense, mix_rate=0.5, repeat_pattern="purple",
                        repeat_times=2)
    replay = [f"data.root={root}", f"data.cache={story}", "data.segments=2", "data.replay.every=2",
              f"data.replay.cache={dense}"]
    assert len(build_replay_loader(config(tmp_path, *replay), MODEL_SIZES, 1000).dataset) == len(plain)
    cfg = config(tmp_path, *replay, f"data.replay.repeat_pattern={first}", "data.replay.repeat_times=3")
    assert sorted(build_replay_loader(cfg, MODEL_SIZES, 1000).dataset.windows) == sorted(thrice.windows)
    assert len(build_loader(cfg, MODEL_SIZES, 1000).dataset) == len(SequenceDataset(root, story, segments=2))  # once
    with pytest.raises(DatasetError, match=r"^data.replay.repeat_pattern: no sequence's 'text' or 'dense' caption"):
        build_replay_loader(config(tmp_path, *replay, "data.replay.repeat_pattern=purple",
                                   "data.replay.repeat_times=2"), MODEL_SIZES, 1000)
    with pytest.raises(ConfigError, match=r"^data.replay.repeat_pattern: expected a regular expression for "
                       r"data.replay.repeat_times 2, got none$"):
        config(tmp_path, "data.replay.every=2", "data.replay.repeat_times=2")


def test_missing_and_corrupt_items_are_skipped_and_counted(base, tmp_path, caplog):
    shutil.copytree(base / "cache", tmp_path / "cache")
    records = read_metadata(base / "dataset")
    item_path(tmp_path / "cache", records[0]).unlink()
    corrupt = item_path(tmp_path / "cache", records[1])
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated
    with caplog.at_level("INFO"):
        ds = SequenceDataset(base / "dataset", tmp_path / "cache", segments=2)
    assert ds.skipped == {"missing": 1, "corrupt": 1, "too_short": 0}
    assert len(ds) == 3  # only the 4-segment video is left
    assert "skipped videos: {'missing': 1, 'corrupt': 1" in caplog.text


def test_manifest_mismatch_is_a_clear_error(base):
    with pytest.raises(DatasetError, match="precomputed with height=32 .* but training expects height=64"):
        SequenceDataset(base / "dataset", base / "cache", segments=1, expected={"height": 64})
    with pytest.raises(DatasetError, match="no sequence of 5 segments"):
        SequenceDataset(base / "dataset", base / "cache", segments=5)


def test_sampler_and_collate_randomness_follows_the_sample_seed(base):
    sampler = EpochSampler(6, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(6))
    assert first == list(sampler)  # same epoch, same order and seeds
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert len({s for _, s in first + list(sampler)}) == 12

    ds = SequenceDataset(base / "dataset", base / "cache", segments=2)
    collate = DiffusionCollate(1000, ds.scaling_factor)
    a, b = ds[(0, 11)], ds[(1, 12)]
    pair, alone = collate([a, b]), collate([b])
    for key in ("latents", "noise", "timesteps", "text"):
        torch.testing.assert_close(pair[key][1], alone[key][0])  # independent of the batch it is in
    mean, std = a["latent_mean"], torch.exp(0.5 * a["latent_logvar"])
    z = (pair["latents"][0] / ds.scaling_factor - mean) / std  # the drawn posterior noise
    assert z.abs().max() < 6 and 0.5 < z.std() < 1.5


# preparing raw footage and captioned clips


def raw_video(path, scenes, fps=10):
    """Flat-colour scenes (seconds, RGB) with a moving square, cut hard from one to the next."""
    frames = []
    for seconds, colour in scenes:
        for i in range(round(seconds * fps)):
            frame = np.empty((48, 64, 3), np.uint8)
            frame[:] = colour
            frame[10:20, 2 * i % 50:2 * i % 50 + 10] = 128
            frames.append(frame)
    write_video(np.stack(frames), path, fps)


SCENES = ((7.2, (150, 0, 0)), (4.1, (20, 240, 20)), (2.0, (0, 0, 0)), (3.5, (255, 255, 255)))


def test_prepare_scenes_keeps_whole_segments_of_each_scene(tmp_path):
    pytest.importorskip("scenedetect")
    raw_video(tmp_path / "raw" / "show" / "ep1.mp4", SCENES)
    records = prepare_scenes(tmp_path / "raw", tmp_path / "out")
    assert records == read_metadata(tmp_path / "out")
    (rec,) = records
    assert rec.video == "videos/show/ep1.mp4" and rec.fps == 10
    # 7.2 s → 2 segments, 4.1 s → 1, 2.0 s dropped, 3.5 s → 1; texts left empty for captioning
    assert [s.scene_start for s in rec.segments] == [True, False, True, True]
    assert [s.start for s in rec.segments] == [0.0, 3.0, 6.0, 9.0] and all(s.text == "" for s in rec.segments)
    frames, fps = read_video(tmp_path / "out" / rec.video)
    assert frames.shape == (120, 48, 64, 3) and fps == 10
    corner = frames[:, 40:, 40:].reshape(120, -1, 3).mean(axis=1)  # away from the moving square
    for segment, colour in zip(range(4), ((150, 0, 0), (150, 0, 0), (20, 240, 20), (255, 255, 255))):
        np.testing.assert_allclose(corner[30 * segment:30 * (segment + 1)], np.broadcast_to(colour, (30, 3)), atol=8)


def test_whole_segments_are_centred_in_their_scene():
    # 7.2 s → 6 s from frame 6, 4.1 s → 3 s from frame 77, 2 s dropped
    assert whole_segments([(0, 72), (72, 113), (113, 133)], Fraction(10)) == [(6, 60, 2), (77, 30, 1)]
    assert whole_segments([(0, 90)], Fraction(30000, 1001)) == [(0, 90, 1)]  # 3 s at 29.97 fps is 89.9 frames


def test_prepare_scenes_detector_none(tmp_path):
    raw_video(tmp_path / "raw" / "a.mp4", ((6.5, (10, 10, 10)),))
    (rec,) = prepare_scenes(tmp_path / "raw", tmp_path / "out", detector="none")
    assert [s.scene_start for s in rec.segments] == [True, False]
    assert read_video(tmp_path / "out" / rec.video)[0].shape[0] == 60


def test_prepare_captions_from_text_files_and_csv(tmp_path):
    raw_video(tmp_path / "clips" / "a.mp4", ((7.0, (10, 10, 10)),))
    raw_video(tmp_path / "clips" / "b.mp4", ((2.0, (10, 10, 10)),))  # too short: skipped
    (tmp_path / "clips" / "a.txt").write_text("a square glides\n")
    (tmp_path / "clips" / "b.txt").write_text("too short")
    (rec,) = prepare_captions(tmp_path / "clips")
    assert rec.video == "a.mp4" and [s.text for s in rec.segments] == ["a square glides"] * 2
    assert read_metadata(tmp_path / "clips") == [rec]

    (tmp_path / "captions.csv").write_text('path,text\na.mp4,"from the csv"\n')
    (rec,) = prepare_captions(tmp_path / "clips", tmp_path / "captions.csv", video_column="path", text_column="text")
    assert rec.segments[0].text == "from the csv"
    with pytest.raises(DatasetError, match="no column 'caption'"):
        prepare_captions(tmp_path / "clips", tmp_path / "captions.csv", video_column="path")
    (tmp_path / "missing.csv").write_text("video,caption\nnope.mp4,x\n")
    with pytest.raises(DatasetError, match="nope.mp4: video file not found"):
        prepare_captions(tmp_path / "clips", tmp_path / "missing.csv")


def test_toy_world_datasets_are_read_as_they_are_written(tmp_path):
    """pipeline/toyworld writes this dataset format (8 fps, 24 frames per segment + 1): it validates and decodes
    into whole segments at the toy model's frame rate."""
    from pipeline.toyworld.dataset import generate

    generate(tmp_path, stories=1, min_segments=2, max_segments=2, seed=0, size=32, progress=False)
    (rec,) = read_metadata(tmp_path)
    assert rec.fps == 8 and [s.start for s in rec.segments] == [0.0, 3.0]
    # both caption registers in the metadata; the storyboard users see is in the story register only
    assert all(s.captions["dense"].startswith("Scene: a ") and " On stage: " in s.captions["dense"]
               for s in rec.segments)
    storyboard = (tmp_path / rec.video).with_suffix(".storyboard.json").read_text()
    assert "On stage" not in storyboard and json.loads(storyboard)["scenes"][0]["segments"][0]["text"] == \
        rec.segments[0].text
    segments = dict(decode_segments(tmp_path / rec.video, rec, fps=8, height=32, width=32))
    assert sorted(segments) == [0, 1] and segments[1].shape == (25, 32, 32, 3)
    source, _ = read_video(tmp_path / rec.video)
    np.testing.assert_array_equal(segments[0][24], segments[1][0])  # segment 0 ends on segment 1's first frame
    np.testing.assert_allclose(segments[1][0].astype(float), source[24].astype(float), atol=1)


def test_text_dependence_reads_how_far_the_prediction_moves_with_the_texts(base, tmp_path, capsys):
    """benchmarks/text_dependence.py: the same noisy windows for every model, each at one level in [t_min, 1000); the
    story prediction's mean squared distance from the null-text one and from the told one. Told what its own texts
    tell, the told distance is 0 and the rest reads the same; the last column reads the distance from another model's
    told predictions (the first model's on the command line); a window count past the dataset's is refused."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from text_dependence import COLUMNS, main, text_dependence, windows

    root, story, dense, _ = story_and_dense_caches(base, tmp_path)
    batches, null_text, null_mask = windows(root, story, dense, 2, 3, 600, seed=0, batch_size=2)
    assert [len(b["timesteps"]) for b in batches] == [2, 1] and all((b["timesteps"] >= 600).all() for b in batches)
    cfg = config(base)
    parts = build_components(cfg.model, cfg.train, ("scheduler", "transformer"))
    model, scheduler = parts["transformer"].eval(), training_scheduler(parts["scheduler"])  # the tiny TTT model

    def measure(net, windows_, reference=None):
        return text_dependence(net, scheduler, windows_, null_text, null_mask, reference)

    read, tolds = measure(model, batches)
    assert list(read) == list(COLUMNS) and all(value > 0 for value in read.values())
    assert read[COLUMNS[3]] == read[COLUMNS[2]]  # its own told predictions
    again, *_ = windows(root, story, dense, 2, 3, 600, seed=0, batch_size=2)
    assert measure(model, again)[0] == read  # every model sees the same windows
    same, *_ = windows(root, story, story, 2, 3, 600, seed=0, batch_size=2)
    told_itself = measure(model, same)[0]
    assert told_itself[COLUMNS[2]] == 0.0
    assert [told_itself[c] for c in COLUMNS[:2]] == [read[c] for c in COLUMNS[:2]]
    # the last column against another model's told predictions of the same windows: told what their own texts tell,
    # those are its story predictions, so the distance reads the same from either side
    other = other_weights(model)
    model_side = measure(model, same, reference=measure(other, same)[1])[0]
    other_side = measure(other, same, reference=measure(model, same)[1])[0]
    assert model_side[COLUMNS[3]] > 0 and model_side[COLUMNS[3]] == pytest.approx(other_side[COLUMNS[3]], rel=1e-9)
    assert [model_side[c] for c in COLUMNS[:3]] == [told_itself[c] for c in COLUMNS[:3]]
    with pytest.raises(ValueError, match=r"^--windows: the dataset has \d+ windows of 2 segments, asked for 999$"):
        windows(root, story, dense, 2, 999, 600, seed=0)
    model.save_pretrained(tmp_path / "exported" / "transformer")  # the command line reads an exported pipeline
    parts["scheduler"].save_pretrained(tmp_path / "exported" / "scheduler")
    assert main([str(tmp_path / "exported"), "--root", str(root), "--cache", str(story), "--told-cache", str(dense),
                 "--windows", "3", "--segments", "2", "--seed", "0"]) == 0
    name, *values = capsys.readouterr().out.strip().splitlines()[-1].strip("| ").split(" | ")
    assert name == str(tmp_path / "exported")  # the windows in other batches: the same means
    assert [float(v) for v in values] == pytest.approx(list(read.values()), abs=1e-4)
