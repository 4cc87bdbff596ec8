"""A synthetic storyboard world: generated multi-scene videos with named characters, and metrics that read them
back: tracking.py finds the characters and backdrops in a video, checks.py scores them against the storyboard
(docs/toyworld.md).

Python API for benchmarks::

    from pipeline.toyworld import sample_story, render_story, storyboard_dict, score_video, summarize
    story = sample_story(seed=0, min_segments=8, max_segments=8)
    frames = render_story(story, size=64)               # (24 n + 1, 64, 64, 3) uint8, 8 fps
    result = score_video(frames, storyboard_dict(story))  # per segment / per character checks
    print(summarize([result])["identity_recall"])
"""

from .checks import CHANCE, CharacterResult, SegmentResult, VideoResult, score_video, summarize
from .corrupt import Corruption, corrupt
from .dataset import generate, load_truth, metadata_line, score_folder, storyboard_dict
from .render import render_story
from .report import format_table, plot_identity
from .sampler import sample_story
from .text import Script, parse_storyboard
from .world import FPS, FRAMES_PER_SEGMENT, Appearance, Backdrop, Story, num_frames

__all__ = [
    "CHANCE", "FPS", "FRAMES_PER_SEGMENT", "Appearance", "Backdrop", "CharacterResult", "Corruption", "Script",
    "SegmentResult", "Story", "VideoResult", "corrupt", "format_table", "generate", "load_truth", "metadata_line",
    "num_frames", "parse_storyboard", "plot_identity", "render_story", "sample_story", "score_folder",
    "score_video", "storyboard_dict", "summarize",
]
