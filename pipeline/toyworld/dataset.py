"""Toy-world dataset folders: generate them, and score a folder of videos against their storyboards.

Layout of a generated folder (one story per id, `story_00000` ...)::

    DIR/metadata.jsonl                  one line per video, the project's training metadata format
    DIR/<id>.mp4                        24 n + 1 frames at 8 fps, H.264 yuv420p
    DIR/<id>.storyboard.json            the storyboard ({"title", "scenes": [{"segments": [{"text"}]}]})
    DIR/<id>.truth.json                 the sampled story (cast, backdrops, actions), enough to re-render it
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..data.format import SegmentInfo, VideoRecord, write_metadata
from ..storyboard import Segment, Storyboard
from ..video_io import read_video, write_video
from .checks import VideoResult, score_video
from .render import render_story
from .sampler import sample_story
from .world import FPS, FRAMES_PER_SEGMENT, Story


def story_storyboard(story: Story) -> Storyboard:
    """The story as a project storyboard; every scene after the first opens with a cut."""
    segments = [Segment(seg.text, scene_start=i > 0 and seg.scene_start) for i, seg in enumerate(story.segments)]
    return Storyboard(segments, title=story.title)


def storyboard_dict(story: Story) -> dict:
    """The story's storyboard in the project's JSON format (`Storyboard.to_dict`)."""
    return story_storyboard(story).to_dict()


def story_record(story: Story, video: str) -> VideoRecord:
    """The story's record of metadata.jsonl (pipeline/data/: starts exactly 3 s apart): segment i starts at 3 i s,
    the frame 24 i that its motion starts from (the previous segment's last frame, shared), and precompute encodes
    frames 24 i ... 24 (i + 1) for it."""
    return VideoRecord(video, FPS, tuple(
        SegmentInfo(FRAMES_PER_SEGMENT * i / FPS, seg.text, i > 0 and seg.scene_start)
        for i, seg in enumerate(story.segments)))


def metadata_line(story: Story, video: str) -> dict:
    """The story's line of metadata.jsonl in the project's format (`story_record` as JSON)."""
    return story_record(story, video).to_json()


def story_seed(seed: int, index: int) -> int:
    """The seed of story `index` of a dataset generated with `seed` (independent streams per story)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_story(out: Path, story_id: str, story: Story, frames: np.ndarray) -> VideoRecord:
    """Writes one story's video, storyboard and ground truth into `out`; returns its metadata record."""
    write_video(frames, out / f"{story_id}.mp4", fps=FPS)
    story_storyboard(story).save(out / f"{story_id}.storyboard.json")
    atomic_write_text(out / f"{story_id}.truth.json", json.dumps(story.to_dict()) + "\n")
    return story_record(story, f"{story_id}.mp4")


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


def score_folder(videos: str | os.PathLike, storyboards: str | os.PathLike | None = None,
                 progress: bool = True) -> list[tuple[Path, VideoResult]]:
    """Scores every .mp4 in folder `videos` against its storyboard (see `find_storyboard`)."""
    videos = Path(videos)
    paths = sorted(videos.glob("*.mp4"))
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
