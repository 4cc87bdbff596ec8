"""Storyboards, the TTT video pipeline and video files.

The storyboard module is imported eagerly (it needs only json/yaml); the pipeline (diffusers, transformers, the
TTT model) and video I/O (PyAV) load on first use, so `import pipeline` stays cheap for data and toy-world code.
"""

import importlib

from .storyboard import DEFAULT_MAX_SEGMENTS, SEGMENT_SECONDS, Segment, Storyboard, StoryboardError, load_storyboard

_LAZY = {
    "TTTVideoPipeline": "pipeline_ttt_video",
    "TTTVideoPipelineOutput": "pipeline_ttt_video",
    "encode_text": "text_encoding",
    "read_video": "video_io",
    "write_video": "video_io",
}

__all__ = ["DEFAULT_MAX_SEGMENTS", "SEGMENT_SECONDS", "Segment", "Storyboard", "StoryboardError", "load_storyboard",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
