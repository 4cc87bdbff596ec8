"""A tiny TTTVideoPipeline saved to a directory, for tests that load a pipeline the way users do (app, CLI).

The components are tests/tiny.py's random ones; the transformer gets TTT layers with 3 latent frames for the first
segment and 2 for every later one, so the VAE (4x temporal) gives 8 frames per segment plus one: 17 frames for two
segments, at 8 / 3 fps (8 frames per 3-s segment).
"""

from __future__ import annotations

from pathlib import Path

from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, tiny_components

FRAMES_PER_SEGMENT_PIXELS = FRAMES_PER_SEGMENT * 4


def tiny_ttt_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A TTTVideoPipeline of tiny random components (CPU, float32)."""
    from models import CogVideoXTTTTransformer3DModel
    from pipeline.pipeline_ttt_video import TTTVideoPipeline

    components = tiny_components(seed, scheduler)
    components["transformer"] = CogVideoXTTTTransformer3DModel.from_base(
        components["transformer"], latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        ttt_mini_batch_size=16)
    return TTTVideoPipeline(**components)


def save_tiny_ttt_pipeline(path: str | Path, seed: int = 0, scheduler: str = "ddim") -> Path:
    """Saves `tiny_ttt_pipeline` with save_pretrained; load it back with TTTVideoPipeline.from_pretrained(path)."""
    tiny_ttt_pipeline(seed, scheduler).save_pretrained(path)
    return Path(path)


def expected_num_frames(num_segments: int) -> int:
    """Pixel frames the tiny pipeline makes for n segments."""
    return FRAMES_PER_SEGMENT_PIXELS * num_segments + 1
