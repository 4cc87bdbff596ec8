"""The Gradio demo: edit a storyboard, press Generate, watch it denoise, download the video (docs/demo.md).

`build_demo(pipe)` makes the Blocks app around one loaded `TTTVideoPipeline`; `launch(demo, ...)` serves it.

- Editor: a table with one row per 3-s segment (text, "new scene", negative text), buttons that add, remove and move
  the selected row, the bundled examples, storyboard files in and out (pipeline/storyboard.py's formats).
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
import math
import os
import queue
import random
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from .storyboard import (
    DEFAULT_MAX_SEGMENTS,
    SEGMENT_SECONDS,
    Segment,
    Storyboard,
    StoryboardError,
    count_problems,
    load_storyboard,
)
from .video_io import write_video

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
STORYBOARD_SUFFIXES = (".json", ".yaml", ".yml", ".txt")
COLUMNS = ["text", "new scene", "negative text"]
SAMPLERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
MAX_TEXT_CHARS = 1000  # about 250 T5 tokens, past the 226 CogVideoX reads; the pipeline checks the exact budget
MAX_STEPS = 200
MAX_SEED = 2**32 - 1
PREVIEW_HEIGHT = 96  # pixels per preview frame
PREVIEW_COLUMNS = 7  # preview frames per row (21 segments = 3 rows)
PREVIEWS_PER_RUN = 10  # previews over a run, whatever the step count
KEEP_OUTPUTS = 8
_OUTPUT_NAME = re.compile(r"\d{8}-\d{6}-\d+-\d{5}")  # OutputFolders' folder names

CSS = """
#storyboard-info p { margin: 0; }
#status p { margin: 0; }
"""


class GenerationStopped(Exception):
    """Raised from the step callback when the user pressed Stop (the pipeline's own `_interrupt` would still decode the
    half-denoised latents, which costs time and shows noise)."""


class SettingsError(ValueError):
    """Settings that cannot be used; `problems` holds one line per bad field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Settings:
    """How to sample: seed -1 draws a random one (the one used is reported with the result)."""

    steps: int = 50
    guidance: float = 6.0
    dynamic_cfg: bool = False
    seed: int = -1
    sampler: str = "ddim"

    def checked(self) -> Settings:
        """The settings with whole numbers as ints; raises SettingsError naming each bad field."""
        problems = []
        if not _is_whole(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            problems.append(f"steps: expected a whole number from 1 to {MAX_STEPS}, got {self.steps!r}")
        if not isinstance(self.guidance, (int, float)) or not 0 <= self.guidance <= 30:
            problems.append(f"guidance: expected a number from 0 to 30, got {self.guidance!r}")
        if not _is_whole(self.seed) or not -1 <= self.seed <= MAX_SEED:
            problems.append(f"seed: expected -1 (random) or a whole number from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler: expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if problems:
            raise SettingsError(problems)
        return Settings(int(self.steps), float(self.guidance), bool(self.dynamic_cfg), int(self.seed), self.sampler)


@dataclass(frozen=True)
class Result:
    """One finished video: its files, the seed used, how long it took, what it holds."""

    video: Path
    storyboard: Path
    seed: int
    seconds: float
    num_frames: int
    fps: float


# storyboard <-> table rows


def storyboard_from_rows(rows: list[list[Any]] | None, title: str | None = None, negative_text: str | None = None,
                         max_segments: int | None = DEFAULT_MAX_SEGMENTS,
                         max_text_chars: int = MAX_TEXT_CHARS) -> Storyboard:
    """The editor's table as a validated Storyboard; raises StoryboardError with one line per problem.

    rows: [text, new scene, negative text] per segment, as gr.Dataframe(type="array") passes them. Blank rows at the
    end are ignored (the table keeps an empty row for typing); "new scene" on the first row is ignored (nothing to cut
    from). Segment places are "row N", so the pipeline's own errors (e.g. the token budget) name the row too.
    """
    cells = [_row_cells(row) for row in rows or []]
    while cells and not cells[-1][0] and not cells[-1][2]:
        cells.pop()
    problems = []
    segments = []
    for i, (text, new_scene, negative) in enumerate(cells, start=1):
        if not text:
            problems.append(f"row {i}: no text; write what happens in this segment, or remove the row")
        for name, value in (("text", text), ("negative text", negative)):
            if len(value) > max_text_chars:
                problems.append(f"row {i} {name}: {len(value)} characters; the limit is {max_text_chars}")
        segments.append(Segment(text=text, negative_text=negative or None, scene_start=new_scene and i > 1,
                                place=f"row {i}"))
    title, negative_text = (title or "").strip(), (negative_text or "").strip()
    for name, value in (("title", title), ("negative text for every segment", negative_text)):
        if len(value) > max_text_chars:
            problems.append(f"{name}: {len(value)} characters; the limit is {max_text_chars}")
    if not segments:
        problems.append("the storyboard is empty; write at least one segment")
    else:
        problems += count_problems(len(segments), max_segments)
    if problems:
        raise StoryboardError(problems)
    return Storyboard(segments=segments, title=title or None, negative_text=negative_text or None).validate(
        max_segments)


def rows_from_storyboard(storyboard: Storyboard) -> list[list[Any]]:
    """The editor's table for a storyboard: [text, new scene, negative text] per segment."""
    return [[s.text, s.scene_start, s.negative_text or ""] for s in storyboard.segments]


def edit_table(rows: list[list[Any]] | None, selected: int | None, action: str) -> tuple[list[list[Any]], int | None]:
    """The editor's row buttons. action: "add" (an empty row after the selected one, else at the end), "remove",
    "up", "down" (the selected row) or "clear" (one empty row). Returns the new rows and the new selected index
    (None: nothing selected); the table never becomes empty, so there is always a row to type into."""
    if action not in ("add", "remove", "up", "down", "clear"):
        raise ValueError(f"action: expected add, remove, up, down or clear, got {action!r}")
    rows = [list(row) for row in rows or []]
    row = selected if selected is not None and 0 <= selected < len(rows) else None
    if action == "add":
        row = len(rows) if row is None else row + 1
        rows.insert(row, ["", False, ""])
    elif action == "remove" and row is not None:
        del rows[row]
        row = min(row, len(rows) - 1) if rows else None
    elif action == "up" and row is not None and row > 0:
        rows[row - 1], rows[row] = rows[row], rows[row - 1]
        row -= 1
    elif action == "down" and row is not None and row + 1 < len(rows):
        rows[row + 1], rows[row] = rows[row], rows[row + 1]
        row += 1
    elif action == "clear":
        rows, row = [], None
    return rows or [["", False, ""]], row


def storyboard_summary(rows: list[list[Any]] | None, max_segments: int | None) -> str:
    """One line for the editor: segments, seconds and scenes of the non-blank rows, and what is over a limit."""
    cells = [_row_cells(row) for row in rows or []]
    while cells and not cells[-1][0] and not cells[-1][2]:
        cells.pop()
    n = len(cells)
    scenes = 1 + sum(1 for _, new_scene, _ in cells[1:] if new_scene) if n else 0
    text = (f"**{n} segment{'s' * (n != 1)} · {_seconds(n * SEGMENT_SECONDS)} · "
            f"{scenes} scene{'s' * (scenes != 1)}**")
    if max_segments is not None and n > max_segments:
        text += f" — over the limit of {max_segments} segments ({_seconds(max_segments * SEGMENT_SECONDS)})"
    blank = [str(i) for i, (t, _, _) in enumerate(cells, start=1) if not t]
    if blank:
        text += f" — row{'s' * (len(blank) > 1)} {', '.join(blank)} without text"
    return text


def example_choices(examples_dir: Path = EXAMPLES_DIR) -> list[tuple[str, str]]:
    """(label, file name) of every storyboard file in examples_dir; the label shows the title when there is one."""
    choices = []
    for path in sorted(examples_dir.glob("*")) if examples_dir.is_dir() else []:
        if path.suffix.lower() not in STORYBOARD_SUFFIXES:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                storyboard = load_storyboard(path, max_segments=None)
        except StoryboardError:
            logger.warning("skipping example %s: not a valid storyboard", path)
            continue
        label = f"{storyboard.title} ({path.name})" if storyboard.title not in (None, path.stem) else path.name
        choices.append((f"{label}, {_seconds(storyboard.duration_seconds)}", path.name))
    return choices


# previews


def latent_preview(latents: torch.Tensor, latent_frames_first: int, latent_frames_per_segment: int,
                   height: int = PREVIEW_HEIGHT, columns: int = PREVIEW_COLUMNS) -> np.ndarray:
    """A cheap look at latents being denoised: the middle latent frame of every segment, as colours.

    latents (1, T, C, h, w), T = latent_frames_first + (n - 1) * latent_frames_per_segment. Each channel is normalised
    over the whole video and given its own hue (channel c of C points at angle 2 pi c / C on the RGB colour wheel),
    which is a fixed linear map to RGB that works for any channel count without knowing the VAE; frames are upsampled
    by an integer factor to about `height` pixels and tiled left to right, `columns` per row, with 2-pixel gaps.
    Returns (H, W, 3) uint8.
    """
    x = latents[0].detach().float().cpu()  # (T, C, h, w)
    num_frames, channels, h, w = x.shape
    starts = [0] + list(range(latent_frames_first, num_frames, latent_frames_per_segment))
    ends = starts[1:] + [num_frames]
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / (x.std(dim=(0, 2, 3), keepdim=True) + 1e-6)
    x = x[[(s + e - 1) // 2 for s, e in zip(starts, ends)]]  # (n, C, h, w)
    angles = 2 * math.pi * torch.arange(channels) / channels
    hues = torch.stack([torch.cos(angles - k * 2 * math.pi / 3) for k in range(3)], dim=1)  # (C, 3)
    rgb = torch.einsum("nchw,cd->nhwd", x, hues) / math.sqrt(max(channels / 2, 1))  # about unit variance
    frames = ((0.5 + 0.25 * rgb).clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # (n, h, w, 3)
    scale = max(1, round(height / h))
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    gap = 2
    n = len(frames)
    cols = min(columns, n)
    rows = -(-n // cols)
    fh, fw = frames.shape[1:3]
    sheet = np.full((rows * (fh + gap) - gap, cols * (fw + gap) - gap, 3), 255, dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        sheet[r * (fh + gap): r * (fh + gap) + fh, c * (fw + gap): c * (fw + gap) + fw] = frame
    return sheet


# generation


class OutputFolders:
    """One folder per result under `root`; only the newest `keep` are kept."""

    def __init__(self, root: str | Path | None = None, keep: int = KEEP_OUTPUTS):
        if keep < 1:
            raise ValueError(f"keep: expected at least 1 output folder, got {keep}")
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="ttt-video-demo-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()
        self._count = 0

    def new(self) -> Path:
        """A fresh, empty folder; the oldest beyond `keep` are deleted (only folders named like ours)."""
        with self._lock:
            self._count += 1
            folder = self.root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self._count:05d}"
            folder.mkdir()
            ours = sorted(p for p in self.root.iterdir() if p.is_dir() and _OUTPUT_NAME.fullmatch(p.name))
            for old in ours[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            return folder


class Renderer:
    """Runs one loaded pipeline, one storyboard at a time, and writes the results.

    pipe: a `TTTVideoPipeline`, already on its device. Samplers are switched by swapping in a scheduler built from
    the pipeline's own scheduler config; the lock keeps that and the run together.
    """

    def __init__(self, pipe, outputs: OutputFolders):
        self.pipe = pipe
        self.outputs = outputs
        self._lock = threading.Lock()
        self._schedulers = {name: cls.from_config(pipe.scheduler.config) for name, cls in SAMPLERS.items()}

    @property
    def default_sampler(self) -> str:
        return "dpm" if isinstance(self.pipe.scheduler, CogVideoXDPMScheduler) else "ddim"

    def render(self, storyboard: Storyboard, settings: Settings,
               on_step: Callable[[int, np.ndarray | None], None] | None = None,
               stop: threading.Event | None = None) -> Result:
        """Generates the video for a validated storyboard and writes video.mp4 and storyboard.json to a new folder.

        on_step(steps_done, preview or None): called after every denoising step, with a `latent_preview` every few
        steps and on the last one. stop: when set, the run ends after the current step with GenerationStopped.
        """
        seed = settings.seed if settings.seed >= 0 else random.SystemRandom().randrange(MAX_SEED + 1)
        config = self.pipe.transformer.config
        every = max(1, round(settings.steps / PREVIEWS_PER_RUN))

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            if stop is not None and stop.is_set():
                raise GenerationStopped(f"stopped after {step + 1} of {settings.steps} steps")
            if on_step is not None:
                done = step + 1
                preview = None
                if done % every == 0 or done == settings.steps:
                    preview = latent_preview(tensors["latents"], config.latent_frames_first,
                                             config.latent_frames_per_segment)
                on_step(done, preview)
            return {}

        with self._lock:
            start = time.perf_counter()
            self.pipe.scheduler = self._schedulers[settings.sampler]
            output = self.pipe(storyboard=storyboard, num_inference_steps=settings.steps,
                               guidance_scale=settings.guidance, use_dynamic_cfg=settings.dynamic_cfg,
                               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", max_segments=None,
                               callback_on_step_end=step_end, callback_on_step_end_tensor_inputs=["latents"])
            frames = output.frames[0]  # (F, H, W, 3)
            folder = self.outputs.new()
            video = write_video(frames, folder / "video.mp4", output.fps)
            saved = storyboard.save(folder / "storyboard.json")
            return Result(video=video, storyboard=saved, seed=seed, seconds=time.perf_counter() - start,
                          num_frames=len(frames), fps=output.fps)


class StopSignals:
    """Per browser session, the Stop flag of its running generation."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}

    def start(self, session: str) -> threading.Event:
        with self._lock:
            event = self._events[session] = threading.Event()
            return event

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]

    def stop(self, session: str) -> bool:
        """Sets the session's flag; False when it has nothing running."""
        with self._lock:
            event = self._events.get(session)
        if event is None:
            return False
        event.set()
        return True


def generate_updates(renderer: Renderer, storyboard: Storyboard, settings: Settings, stop: threading.Event,
                     progress: Callable[..., Any] | None = None) -> Iterator[tuple[str, Any]]:
    """Runs `renderer.render` on a worker thread and yields what the page shows as it happens.

    Yields ("preview", (H, W, 3) uint8) every few steps and finally ("done", Result); ("stopped", message) when
    stopped. Pipeline errors are re-raised here. progress(fraction or (done, total), desc=...) gets every step.
    Closing the iterator (the client went away) stops the worker after its current step.
    """
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            events.put(("done", renderer.render(storyboard, settings, lambda done, preview: events.put(
                ("step", (done, preview))), stop)))
        except GenerationStopped as e:
            events.put(("stopped", str(e)))
        except BaseException as e:  # handed to the caller's thread, which reports it
            events.put(("error", e))

    worker = threading.Thread(target=work, name="ttt-video-demo-render", daemon=True)
    started = time.perf_counter()
    worker.start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "step":
                done, preview = payload
                if progress is not None:
                    left = (time.perf_counter() - started) / done * (settings.steps - done)
                    desc = ("Decoding the video" if done == settings.steps
                            else f"Step {done} of {settings.steps}, about {_seconds(left)} left")
                    progress((done, settings.steps), desc=desc, unit="steps")
                if preview is not None:
                    yield "preview", preview
            elif kind == "error":
                raise payload
            else:
                yield kind, payload
                return
    finally:
        stop.set()
        worker.join()


def build_demo(pipe, max_segments: int | None = DEFAULT_MAX_SEGMENTS, max_queue: int | None = 16,
               examples_dir: str | Path = EXAMPLES_DIR, output_dir: str | Path | None = None,
               keep_outputs: int = KEEP_OUTPUTS, default_steps: int = 50) -> gr.Blocks:
    """The demo app for a loaded TTTVideoPipeline (see the module docstring), with its queue set up.

    max_segments: the most rows a storyboard may have (None: no limit); max_queue: the most generations waiting;
    output_dir: where results go (default: a new temporary folder); keep_outputs: results kept there.
    """
    renderer = Renderer(pipe, OutputFolders(output_dir, keep_outputs))
    stops = StopSignals()
    examples_dir = Path(examples_dir)
    examples = example_choices(examples_dir)
    first_example = next((name for _, name in examples if name == "two_scenes.yaml"),
                         examples[0][1] if examples else None)
    if first_example is not None:
        start = load_storyboard(examples_dir / first_example, max_segments=None)
        start_rows, start_title = rows_from_storyboard(start), start.title or ""
    else:
        start_rows, start_title = [["", False, ""]], ""
    limit = f"Up to {max_segments} segments ({_seconds(max_segments * SEGMENT_SECONDS)})" if max_segments else ""

    with gr.Blocks(title="TTT-Video", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# TTT-Video\nWrite a storyboard, one row per 3-second segment, then press **Generate**. "
                    f"Tick *new scene* where the story cuts to a new scene. {limit}")
        with gr.Row():
            with gr.Column(scale=3):
                example = gr.Dropdown(examples, value=first_example, label="Example stories", elem_id="example")
                table = gr.Dataframe(start_rows, headers=COLUMNS, datatype=["str", "bool", "str"], type="array",
                                     interactive=True, wrap=True, column_count=3, show_row_numbers=True,
                                     column_widths=["60%", "12%", "28%"], label="Storyboard", elem_id="storyboard")
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
                    guidance = gr.Slider(0, 15, value=6.0, step=0.5, label="Guidance",
                                         info="How strongly to follow the text (1 or less: no guidance).")
                    dynamic_cfg = gr.Checkbox(False, label="Dynamic guidance (CogVideoX's schedule)")
                    seed = gr.Number(-1, precision=0, label="Seed", elem_id="seed",
                                     info="-1 picks a random seed; the one used is shown with the result.")
                    sampler = gr.Radio(list(SAMPLERS), value=renderer.default_sampler, label="Sampler",
                                       info="ddim: DDIM; dpm: CogVideoX's DPM-Solver++ (adds noise each step).")
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
                request: gr.Request, progress=gr.Progress()):  # noqa: B008 (gradio finds the tracker here)
            try:
                storyboard = storyboard_from_rows(rows, title_text, negative_text, max_segments)
                settings = Settings(steps_value, guidance_value, dynamic, seed_value, sampler_name).checked()
            except StoryboardError as e:
                yield from _report("Check the storyboard", e.problems)
            except SettingsError as e:
                yield from _report("Check the settings", e.problems)
            session = request.session_hash or "api"
            signal = stops.start(session)
            yield None, None, None, f"Starting: {storyboard.num_segments} segments, {settings.steps} steps…"
            last_preview = None
            try:
                for kind, payload in generate_updates(renderer, storyboard, settings, signal, progress):
                    if kind == "preview":
                        last_preview = payload
                        yield payload, gr.skip(), gr.skip(), gr.skip()
                    elif kind == "stopped":
                        yield last_preview, None, None, f"Stopped ({payload})."
                    else:
                        yield last_preview, str(payload.video), [str(payload.video), str(payload.storyboard)], (
                            f"Done in {_seconds(payload.seconds)} · seed **{payload.seed}** · "
                            f"{storyboard.num_segments} segments, {payload.num_frames} frames at {payload.fps:.3g} fps")
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

        def load_upload(file):
            return _load_into_editor(Path(file))

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
        settings_inputs = [steps, guidance, dynamic_cfg, seed, sampler]
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


def _load_into_editor(path: Path) -> tuple[list[list[Any]], str, str]:
    """Table rows, title and default negative text of a storyboard file; unknown keys become warning toasts.
    Messages name the file, not the folder it was uploaded to."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            storyboard = load_storyboard(path, max_segments=None)
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


def _row_cells(row: list[Any]) -> tuple[str, bool, str]:
    """(text, new scene, negative text) of one table row, whatever the browser sent for empty cells."""
    row = list(row) + [None] * (3 - len(row))
    text, new_scene, negative = row[:3]
    if isinstance(new_scene, str):
        new_scene = new_scene.strip().lower() in ("true", "1", "yes", "y", "x")
    return ("" if text is None else str(text).strip(), bool(new_scene),
            "" if negative is None else str(negative).strip())


def _is_whole(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 and seconds != int(seconds) else f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def _as_html(lines: list[str]) -> str:
    """gr.Error renders HTML: escape the lines (they may quote user text) and keep one per line."""
    return "<br>".join(html.escape(line, quote=False) for line in lines)
