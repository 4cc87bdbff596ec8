"""The Gradio demo (docs/demo.md): the storyboard editor (editor.py), the generation worker (worker.py) and the page
that puts them together (page.py: `build_demo(pipe)`, `launch(demo, ...)`)."""

from .editor import edit_table, example_choices, rows_from_storyboard, storyboard_from_rows, storyboard_summary
from .page import build_demo, launch
from .worker import (
    MAX_SEED,
    MAX_STEPS,
    PREVIEW_HEIGHT,
    OutputFolders,
    Renderer,
    Result,
    Settings,
    SettingsError,
    generate_updates,
    latent_preview,
)

__all__ = ["MAX_SEED", "MAX_STEPS", "PREVIEW_HEIGHT", "OutputFolders", "Renderer", "Result", "Settings",
           "SettingsError", "build_demo", "edit_table", "example_choices", "generate_updates", "latent_preview",
           "launch", "rows_from_storyboard", "storyboard_from_rows", "storyboard_summary"]
