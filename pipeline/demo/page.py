"""The Gradio demo: edit a storyboard, press Generate, watch it denoise, download the video (docs/demo.md).

`build_demo(pipe)` makes the Blocks app around one loaded `TTTVideoPipeline`; `launch(demo, ...)` serves it.

- Editor: a table with one row per 3-s segment (text, "new scene", negative text), buttons that add, remove and move
  the selected row, the bundled examples, storyboard files in and out (pipeline/storyboard.py's formats).
- After a generation, rows ticked "keep" are kept exactly (their latents) in the next Generate, which redoes only
  the unticked rows and any rows added at the end.
- Generate runs the pipeline on a worker thread. Every few denoising steps its latents become a cheap preview (a fixed
  linear map of latent channels to RGB, one frame per segment); gr.Progress shows the step and the time left. Stop
  ends the run after the current step.
- One generation at a time per loaded model (the queue shows the others their place in line, up to `max_queue`);
  bad input and pipeline errors come back as readable messages and the app keeps serving; each result lives in its
  own folder under the output directory, of which the newest `keep_outputs` are kept.
"""

from __future__ import annotations

import html
import logging
import re
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from ..cache import CACHES
from ..schedulers import SCHEDULERS
from ..storyboard import (
    DEFAULT_MAX_SEGMENTS,
    SEGMENT_SECONDS,
    StoryboardError,
    load_storyboard,
)
from .editor import (
    COLUMNS,
    EXAMPLES_DIR,
    STORYBOARD_SUFFIXES,
    edit_table,
    example_choices,
    format_seconds,
    kept_rows,
    rows_from_storyboard,
    storyboard_from_rows,
    storyboard_summary,
)
from .worker import (
    KEEP_OUTPUTS,
    MAX_STEPS,
    LastVideos,
    OutputFolders,
    Renderer,
    Settings,
    SettingsError,
    StopSignals,
    generate_updates,
    keep_arguments,
)

logger = logging.getLogger(__name__)

CSS = """
#storyboard-info p { margin: 0; }
#status p { margin: 0; }
"""




def build_demo(pipe, max_segments: int | None = DEFAULT_MAX_SEGMENTS, max_queue: int | None = 16,
               examples_dir: str | Path = EXAMPLES_DIR, output_dir: str | Path | None = None,
               keep_outputs: int = KEEP_OUTPUTS, default_steps: int = 50) -> gr.Blocks:
    """The demo app for a loaded TTTVideoPipeline (see the module docstring), with its queue set up.

    max_segments: the most rows a storyboard may have (None: no limit); max_queue: the most generations waiting;
    output_dir: where results go (default: a new temporary folder); keep_outputs: results kept there. The guidance
    slider starts at the pipeline's own scale (its config's guidance_scale).
    """
    renderer = Renderer(pipe, OutputFolders(output_dir, keep_outputs))
    stops = StopSignals()
    last_videos = LastVideos()
    examples_dir = Path(examples_dir)
    examples = example_choices(examples_dir)
    first_example = next((name for _, name in examples if name == "two_scenes.yaml"),
                         examples[0][1] if examples else None)
    if first_example is not None:
        start = load_storyboard(examples_dir / first_example, max_segments=None)
        start_rows, start_title = rows_from_storyboard(start), start.title or ""
    else:
        start_rows, start_title = [["", False, ""]], ""
    limit = f"Up to {max_segments} segments ({format_seconds(max_segments * SEGMENT_SECONDS)})." if max_segments else ""

    with gr.Blocks(title="TTT-Video", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# TTT-Video\nWrite a storyboard, one row per 3-second segment, then press **Generate**. "
                    f"Tick *new scene* where the story cuts to a new scene. {limit} After a video, tick *keep* on "
                    "the rows you like: the next Generate keeps them exactly and redoes the others and any new rows.")
        with gr.Row():
            with gr.Column(scale=3):
                example = gr.Dropdown(examples, value=first_example, label="Example stories", elem_id="example")
                table = gr.Dataframe(start_rows, headers=COLUMNS, datatype=["str", "bool", "str", "bool"],
                                     type="array", interactive=True, wrap=True, column_count=4, show_row_numbers=True,
                                     column_widths=["43%", "13%", "22%", "13%"], label="Storyboard",  # +row numbers
                                     elem_id="storyboard")
                info = gr.Markdown(storyboard_summary(start_rows, max_segments), elem_id="storyboard-info")
                with gr.Row():
                    add = gr.Button("Add segment", size="sm", elem_id="add-row")
                    remove = gr.Button("Remove", size="sm", elem_id="remove-row")
                    up = gr.Button("Move up", size="sm", elem_id="move-up")
                    down = gr.Button("Move down", size="sm", elem_id="move-down")
                    clear = gr.Button("New storyboard", size="sm", elem_id="clear")
                with gr.Row():
                    title = gr.Textbox(start_title, label="Title", max_lines=1, scale=2, elem_id="title")
                    negative = gr.Textbox("", label="Negative text for every segment", max_lines=2, scale=3,
                                          elem_id="negative")
                with gr.Accordion("Storyboard files", open=False, elem_id="files"):
                    with gr.Row():
                        upload = gr.UploadButton("Load a storyboard file…", file_types=list(STORYBOARD_SUFFIXES),
                                                 size="md", elem_id="load")
                        save_format = gr.Dropdown(["json", "yaml", "txt"], value="json", label="Save as",
                                                  container=False, min_width=80)
                        save = gr.Button("Save storyboard", size="md", elem_id="save")
                    saved = gr.File(label="Saved storyboard", height=80, interactive=False, elem_id="saved")
                # open from the start: gradio 6 mounts a closed accordion's children only when it opens, and a value
                # typed right after that mount could be lost to a re-render (seen once in CI: the seed)
                with gr.Accordion("Settings", open=True, elem_id="settings"):
                    steps = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Steps",
                                      info="Denoising steps: more is slower and usually cleaner.")
                    guidance = gr.Slider(0, 15, value=float(pipe.config.guidance_scale), step=0.5, label="Guidance",
                                         info="How strongly to follow the text (1 or less: no guidance).")
                    dynamic_cfg = gr.Checkbox(False, label="Dynamic guidance (CogVideoX's schedule)")
                    seed = gr.Number(-1, precision=0, label="Seed", elem_id="seed",
                                     info="-1 picks a random seed; the one used is shown with the result.")
                    sampler = gr.Radio(list(SCHEDULERS), value=renderer.default_sampler, label="Sampler",
                                       info="ddim: DDIM; dpm: CogVideoX's DPM-Solver++ (adds noise each step).")
                    cache = gr.Radio(list(CACHES), value="none", label="Cache", elem_id="cache",
                                     info="Reuse work across steps (diffusers' cache hooks): faster, slightly "
                                          "different; see docs/sampling.md.")
                    where = ("every segment that continues a scene" if pipe.config.memory_guidance_segments
                             == "continuing" else "every segment")
                    memory = gr.Slider(0, renderer.max_memory_guidance, value=float(pipe.config.memory_guidance_scale),
                                       step=0.5, label="Memory guidance", visible=renderer.has_ttt,
                                       elem_id="memory-guidance",
                                       info=f"Push {where} toward what the TTT layers remember of earlier ones "
                                            "(0: off; one more pass per step; of the caches, only "
                                            "first-block and taylorseer combine with it).")
            with gr.Column(scale=2):
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown("Ready.", elem_id="status")
                preview = gr.Image(label="Preview: the latents being denoised, one frame per segment", format="png",
                                   interactive=False, height=200, buttons=[], elem_id="preview")
                video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, buttons=["download"],
                                 elem_id="video")
                files = gr.File(label="Downloads (video and storyboard)", file_count="multiple", interactive=False,
                                elem_id="downloads")
        selected = gr.State(None)  # index of the last row clicked in the table

        def run(rows, title_text, negative_text, steps_value, guidance_value, dynamic, seed_value, sampler_name,
                cache_name, memory_value, request: gr.Request,
                progress=gr.Progress()):  # noqa: B008 (gradio finds the tracker)
            try:
                storyboard = storyboard_from_rows(rows, title_text, negative_text, max_segments)
                settings = renderer.resolved(Settings(steps_value, guidance_value, dynamic, seed_value, sampler_name,
                                                      cache_name, memory_value))
            except StoryboardError as e:
                yield from _report("Check the storyboard", e.problems)
            except SettingsError as e:
                yield from _report("Check the settings", e.problems)
            session = request.session_hash or "api"
            keep, previous = kept_rows(rows), last_videos.get(session)
            try:
                keep_arguments(keep, previous, renderer.pipe, storyboard.num_segments)
            except ValueError as e:
                yield from _report("Check the keep marks", [str(e)])
            signal = stops.start(session)
            kept = f", keeping rows {', '.join(str(i + 1) for i in keep)}" if keep else ""
            yield None, None, None, f"Starting: {storyboard.num_segments} segments{kept}, {settings.steps} steps…"
            last_preview = None
            try:
                for kind, payload in generate_updates(renderer, storyboard, settings, signal, progress, keep,
                                                      previous):
                    if kind == "preview":
                        last_preview = payload
                        yield payload, gr.skip(), gr.skip(), gr.skip()
                    elif kind == "stopped":
                        yield last_preview, None, None, f"Stopped ({payload})."
                    else:
                        last_videos.set(session, payload.video)
                        yield last_preview, str(payload.video), [str(payload.video), str(payload.storyboard)], (
                            f"Done in {format_seconds(payload.seconds)} · seed **{payload.seed}** · "
                            f"{storyboard.num_segments} segments{kept}, {payload.num_frames} frames at "
                            f"{payload.fps:.3g} fps")
            except StoryboardError as e:  # the pipeline's own checks, e.g. a text over the token budget
                yield from _report("Check the storyboard", e.problems)
            except Exception as e:
                logger.exception("generation failed")
                yield from _report("Generation failed", [f"{type(e).__name__}: {e}"])
            finally:
                stops.finish(session, signal)

        def request_stop(request: gr.Request) -> str | Any:
            return "Stopping after the current step…" if stops.stop(request.session_hash or "api") else gr.skip()

        def load_example(name):
            if not name:
                return gr.skip(), gr.skip(), gr.skip()
            return _load_into_editor(examples_dir / Path(name).name)

        def load_upload(file):  # the limits of typed input: max_segments rows, MAX_TEXT_CHARS per text
            return _load_into_editor(Path(file), max_segments, check_rows=True)

        def save_rows(rows, title_text, negative_text, fmt):
            try:
                storyboard = storyboard_from_rows(rows, title_text, negative_text, max_segments=None)
            except StoryboardError as e:
                raise gr.Error(_as_html(e.problems), title="Cannot save", print_exception=False) from None
            name = re.sub(r"[^A-Za-z0-9_-]+", "_", storyboard.title or "storyboard").strip("_") or "storyboard"
            target = renderer.outputs.new() / f"{name}.{fmt}"
            try:
                return str(storyboard.save(target))
            except StoryboardError as e:  # e.g. negative texts in a .txt; name the file, not the server's folder
                raise gr.Error(_as_html([p.replace(str(target), target.name) for p in e.problems]),
                               title="Cannot save", print_exception=False) from None

        def select_row(evt: gr.SelectData):
            return evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index

        editor = [table, title, negative]
        settings_inputs = [steps, guidance, dynamic_cfg, seed, sampler, cache, memory]
        generate.click(run, editor + settings_inputs, [preview, video, files, status], api_name="generate",
                       concurrency_limit=1, concurrency_id="model", show_progress="full", show_progress_on=[video])
        stop.click(request_stop, None, status, api_name="stop", queue=False)
        example.input(load_example, example, editor, api_name="load_example", queue=False)
        # queued: gr.Warning and gr.Error messages reach the page only through the queue's messages
        upload.upload(load_upload, upload, editor, api_name="load_storyboard")
        save.click(save_rows, editor + [save_format], saved, api_name="save_storyboard")
        table.change(lambda rows: storyboard_summary(rows, max_segments), table, info, queue=False,
                     api_visibility="private", show_progress="hidden")
        table.select(select_row, None, selected, queue=False, api_visibility="private", show_progress="hidden")
        for button, action in ((add, "add"), (remove, "remove"), (up, "up"), (down, "down"), (clear, "clear")):
            button.click(partial(edit_table, action=action), [table, selected], [table, selected], queue=False,
                         api_visibility="private", show_progress="hidden")
        clear.click(lambda: ("", ""), None, [title, negative], queue=False, api_visibility="private",
                    show_progress="hidden")
    demo.queue(max_size=max_queue)
    return demo


def launch(demo: gr.Blocks, server_name: str | None = None, server_port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False, allowed_paths: list[str] | None = None) -> None:
    """Serves the demo (gradio prints its local URL, and the public one with share=True).

    allowed_paths: folders gradio may serve files from besides the temporary folder (a custom output_dir)."""
    demo.launch(server_name=server_name, server_port=server_port, share=share, prevent_thread_lock=prevent_thread_lock,
                quiet=quiet, css=CSS, theme=gr.themes.Soft(), show_error=True, allowed_paths=allowed_paths)


def _load_into_editor(path: Path, max_segments: int | None = None,
                      check_rows: bool = False) -> tuple[list[list[Any]], str, str]:
    """Table rows, title and default negative text of a storyboard file; unknown keys become warning toasts.
    Messages name the file, not the folder it was uploaded to.

    max_segments: the most segments accepted (None: any number). check_rows: also apply the editor's own limits
    (`storyboard_from_rows`), so an uploaded file gets no further than typed rows would. The file's size and YAML
    alias limits (pipeline/storyboard.py) always apply."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            storyboard = load_storyboard(path, max_segments=max_segments)
        if check_rows:
            storyboard_from_rows(rows_from_storyboard(storyboard), storyboard.title, storyboard.negative_text,
                                 max_segments)
    except StoryboardError as e:
        raise gr.Error(_as_html([p.replace(str(path), path.name) for p in e.problems]),
                       title=f"Cannot load {path.name}", print_exception=False) from None
    for warning in caught:
        gr.Warning(html.escape(str(warning.message).replace(str(path), path.name), quote=False))
    return rows_from_storyboard(storyboard), storyboard.title or "", storyboard.negative_text or ""


def _report(title: str, problems: list[str]) -> Iterator[tuple[Any, ...]]:
    """Puts the problems in the status box (where they stay), then raises them as gr.Error (a pop-up on the page, an
    AppError for API clients)."""
    message = _as_html(problems)
    yield gr.skip(), gr.skip(), gr.skip(), f"**{title}:**<br>{message}"
    raise gr.Error(message, title=title, print_exception=False)


def _as_html(lines: list[str]) -> str:
    """gr.Error renders HTML: escape the lines (they may quote user text) and keep one per line."""
    return "<br>".join(html.escape(line, quote=False) for line in lines)
