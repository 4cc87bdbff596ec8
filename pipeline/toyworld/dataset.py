"""Toy-world dataset folders: generate them, and score a folder of videos against their storyboards.

Layout of a generated folder (one story per id, `story_00000` ...)::

    DIR/metadata.jsonl                  one line per video, the project's training metadata format
    DIR/<id>.mp4                        24 n + 1 frames at 8 fps, H.264 yuv420p
    DIR/<id>.mask.mp4                   the same frames' character masks (white: a character), the record's "mask"
    DIR/<id>.storyboard.json            the storyboard ({"title", "scenes": [{"segments": [{"text"}]}]})
    DIR/<id>.truth.json                 the sampled story (cast, backdrops, actions), enough to re-render it
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..data.format import SegmentInfo, VideoRecord, read_metadata, write_metadata
from ..storyboard import Segment, Storyboard
from ..video_io import read_video, write_video
from .checks import VideoResult, score_video
from .render import render_story, render_story_mask
from .sampler import sample_story
from .text import unshaped_segment_text
from .world import FPS, FRAMES_PER_SEGMENT, Story, on_stage, plan

MASK_SUFFIX = ".mask.mp4"


REGISTERS = ("story", "dense", "unshaped")  # the caption registers of `story_record`


def story_storyboard(story: Story, register: str = "story") -> Storyboard:
    """The story as a project storyboard; every scene after the first opens with a cut. register: the segments'
    texts, "story" (what users write) or one of the captions of `story_captions` ("dense", "unshaped"), the same
    scenes and cuts either way."""
    if register == "story":
        texts = [seg.text for seg in story.segments]
    elif register in REGISTERS:
        texts = [captions.get(register) for captions in story_captions(story)]
        if None in texts:  # truth files written before the dense register have no dense text
            raise ValueError(f"register {register!r}: story {story.seed} has no such caption for segment "
                             f"{texts.index(None) + 1}; regenerate its folder")
    else:
        raise ValueError(f"register: expected one of {REGISTERS}, got {register!r}")
    segments = [Segment(text, scene_start=i > 0 and seg.scene_start)
                for i, (seg, text) in enumerate(zip(story.segments, texts, strict=True))]
    return Storyboard(segments, title=story.title)


def storyboard_dict(story: Story, register: str = "story") -> dict:
    """The story's storyboard in the project's JSON format (`Storyboard.to_dict`), its texts in `register`."""
    return story_storyboard(story, register).to_dict()


def story_record(story: Story, video: str, mask: str | None = None) -> VideoRecord:
    """The story's record of metadata.jsonl (pipeline/data/: starts exactly 3 s apart; text in the story register,
    captions["dense"] in the dense one, for pretraining with data.caption=dense, and captions["unshaped"], the story
    text with the size and colour of everyone on stage: an experiment's register, `unshaped_segment_text`): segment i
    starts at 3 i s, the frame 24 i that its motion starts from (the previous segment's last frame, shared), and
    precompute encodes frames 24 i ... 24 (i + 1) for it. mask: the video of its character masks
    (`render_story_mask`), if any."""
    return VideoRecord(video, FPS, tuple(
        SegmentInfo(FRAMES_PER_SEGMENT * i / FPS, seg.text, i > 0 and seg.scene_start, captions)
        for i, (seg, captions) in enumerate(zip(story.segments, story_captions(story)))), mask)


def story_captions(story: Story) -> list[dict[str, str]]:
    """Every segment's captions beyond the story text: "dense" (from the ground truth, when it has one) and
    "unshaped" (made here from the cast and who is on stage)."""
    captions = []
    for seg, state in zip(story.segments, plan(story)):
        captions.append({**({"dense": seg.dense_text} if seg.dense_text else {}),
                         "unshaped": unshaped_segment_text(story.cast, on_stage(state, seg), seg.text)})
    return captions


def metadata_line(story: Story, video: str) -> dict:
    """The story's line of metadata.jsonl in the project's format (`story_record` as JSON)."""
    return story_record(story, video).to_json()


def story_seed(seed: int, index: int) -> int:
    """The seed of story `index` of a dataset generated with `seed` (independent streams per story)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_story(out: Path, story_id: str, story: Story, frames: np.ndarray) -> VideoRecord:
    """Writes one story's video, character masks, storyboard and ground truth into `out`; returns its metadata
    record."""
    write_video(frames, out / f"{story_id}.mp4", fps=FPS)
    mask = write_mask(out, story_id, story, frames.shape[1])
    story_storyboard(story).save(out / f"{story_id}.storyboard.json")
    atomic_write_text(out / f"{story_id}.truth.json", json.dumps(story.to_dict()) + "\n")
    return story_record(story, f"{story_id}.mp4", mask)


def write_mask(out: Path, story_id: str, story: Story, size: int) -> str:
    """Writes <story_id>.mask.mp4 (the character masks, grey as RGB) into `out`; returns its name."""
    name = f"{story_id}{MASK_SUFFIX}"
    write_video(np.repeat(render_story_mask(story, size)[..., None], 3, axis=-1), out / name, fps=FPS)
    return name


def add_masks(folder: str | os.PathLike, progress: bool = True) -> Path:
    """Gives a dataset folder made by `generate` before it wrote masks its <id>.mask.mp4 files (rendered from
    <id>.truth.json at the videos' size) and rewrites its metadata.jsonl with their "mask" fields (a new cache item
    per video: precompute again, with data.latents_from naming the old cache to keep its latents)."""
    folder = Path(folder)
    records = read_metadata(folder)
    updated = []
    for record in tqdm(records, desc="masks", unit="story", disable=not progress):
        story = record_truth(folder, record, "masks are rendered")
        with av.open(os.fspath(folder / record.video)) as container:
            size = container.streams.video[0].height
        story_id = Path(record.video).name.removesuffix(".mp4")
        updated.append(replace(record, mask=write_mask(folder, story_id, story, size)))
    return write_metadata(folder, updated)


def relabel(folder: str | os.PathLike) -> Path:
    """Rewrites a dataset folder's metadata.jsonl with every caption register that `story_record` writes today,
    made from each story's <id>.truth.json (a folder generated before a register existed; precompute a cache of
    the new register with data.latents_from naming the old cache to keep its latents)."""
    folder = Path(folder)
    updated = []
    for record in read_metadata(folder):
        updated.append(story_record(record_truth(folder, record, "captions are written"), record.video, record.mask))
    return write_metadata(folder, updated)


def record_truth(folder: Path, record: VideoRecord, use: str) -> Story:
    """The story of a metadata record, from the <id>.truth.json beside its video; FileNotFoundError naming the file
    and what needed it (`use`, e.g. "masks are rendered") where there is none."""
    truth = folder / f"{Path(record.video).name.removesuffix('.mp4')}.truth.json"
    if not truth.is_file():
        raise FileNotFoundError(f"{truth}: not found; {use} from a story's ground truth, which 'generate' writes "
                                "beside its video")
    return load_truth(truth)


def generate(out: str | os.PathLike, stories: int, min_segments: int = 1, max_segments: int = 21, seed: int = 0,
             size: int = 64, progress: bool = True) -> Path:
    """Samples, renders and writes `stories` stories into folder `out`; returns the metadata.jsonl path.

    Story i is `sample_story(story_seed(seed, i), min_segments, max_segments)`, so a dataset is reproducible
    from its command line, and the first k stories of a larger dataset are the same k stories.
    """
    if stories < 1:
        raise ValueError(f"stories: expected at least 1, got {stories}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(stories), desc="stories", unit="story", disable=not progress):
        story = sample_story(story_seed(seed, i), min_segments, max_segments)
        records.append(write_story(out, f"story_{i:05d}", story, render_story(story, size)))
    return write_metadata(out, records)


def find_storyboard(video: Path, storyboards: Path | None = None) -> Path:
    """The storyboard of `video`: <stem>.storyboard.json or <stem>.json in `storyboards` (default: its folder)."""
    folder = storyboards or video.parent
    candidates = [folder / f"{video.stem}.storyboard.json", folder / f"{video.stem}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{video}: no storyboard found; expected one of {', '.join(map(str, candidates))}")


def story_videos(folder: str | os.PathLike) -> list[Path]:
    """The story videos of a folder, sorted: its .mp4 files but the character masks (<id>.mask.mp4)."""
    return sorted(p for p in Path(folder).glob("*.mp4") if not p.name.endswith(MASK_SUFFIX))


def score_folder(videos: str | os.PathLike, storyboards: str | os.PathLike | None = None,
                 progress: bool = True) -> list[tuple[Path, VideoResult]]:
    """Scores every story video in folder `videos` (`story_videos`) against its storyboard (see `find_storyboard`)."""
    videos = Path(videos)
    paths = story_videos(videos)
    if not paths:
        raise FileNotFoundError(f"{videos}: no .mp4 files to score")
    results = []
    for path in tqdm(paths, desc="scoring", unit="video", disable=not progress):
        storyboard_path = find_storyboard(path, Path(storyboards) if storyboards else None)
        try:
            storyboard = json.loads(storyboard_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{storyboard_path} line {e.lineno}: invalid JSON: {e.msg}") from None
        frames, _ = read_video(path)
        try:
            results.append((path, score_video(frames, storyboard)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return results


def load_truth(path: str | os.PathLike) -> Story:
    """A story from its <id>.truth.json (to re-render it, e.g. corrupted or at another size)."""
    return Story.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
