"""The demo's generation worker: checked settings, latent previews, output folders, the renderer thread and Stop."""

from __future__ import annotations

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import CACHES, cache_problems, set_cache
from ..schedulers import SCHEDULERS, make_scheduler, scheduler_name
from ..segment_context import latent_segments, latents_path, load_latents, save_latents
from ..storyboard import (
    Storyboard,
)
from ..video_io import write_video
from .editor import format_seconds

logger = logging.getLogger(__name__)

MAX_STEPS = 200
MAX_SEED = 2**32 - 1
MAX_MEMORY_GUIDANCE = 50.0  # the toy world was measured up to 48 (docs/results.md); a model's own scale may be higher
PREVIEW_HEIGHT = 96  # pixels per preview frame
PREVIEW_COLUMNS = 7  # preview frames per row (21 segments = 3 rows)
PREVIEWS_PER_RUN = 10  # previews over a run, whatever the step count
KEEP_OUTPUTS = 8
_OUTPUT_NAME = re.compile(r"\d{8}-\d{6}-\d+-\d{5}")  # OutputFolders' folder names


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
    """How to sample: seed -1 draws a random one (the one used is reported with the result); guidance None: the
    pipeline's own scale (its config's guidance_scale, as the page's slider starts); memory_guidance: the pipeline's
    memory_guidance_scale, on the segments its config's memory_guidance_segments names (every segment, or those that
    continue a scene); None: the pipeline's own scale, as the page's slider starts; > 0 needs TTT layers, and of the
    caches only those that keep a state per call combine with it (docs/sampling.md)."""

    steps: int = 50
    guidance: float | None = None
    dynamic_cfg: bool = False
    seed: int = -1
    sampler: str = "ddim"
    cache: str = "none"
    memory_guidance: float | None = None

    def checked(self, max_memory_guidance: float = MAX_MEMORY_GUIDANCE) -> Settings:
        """The settings with whole numbers as ints; raises SettingsError naming each bad field.
        max_memory_guidance: the most memory guidance allowed (a model's own scale may lie above the default)."""
        problems = []
        if not is_whole(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            problems.append(f"steps: expected a whole number from 1 to {MAX_STEPS}, got {self.steps!r}")
        if self.guidance is not None and (not isinstance(self.guidance, (int, float)) or not 0 <= self.guidance <= 30):
            problems.append(f"guidance: expected a number from 0 to 30, got {self.guidance!r}")
        if not is_whole(self.seed) or not -1 <= self.seed <= MAX_SEED:
            problems.append(f"seed: expected -1 (random) or a whole number from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.sampler not in SCHEDULERS:
            problems.append(f"sampler: expected one of {', '.join(SCHEDULERS)}, got {self.sampler!r}")
        if self.cache not in CACHES:
            problems.append(f"cache: expected one of {', '.join(CACHES)}, got {self.cache!r}")
        memory_ok = self.memory_guidance is None or (
            isinstance(self.memory_guidance, (int, float)) and not isinstance(self.memory_guidance, bool)
            and 0 <= self.memory_guidance <= max_memory_guidance)
        if not memory_ok:
            problems.append(f"memory_guidance: expected a number from 0 (off) to {max_memory_guidance:g}, got "
                            f"{self.memory_guidance!r}")
        if self.cache in CACHES:  # None (the pipeline's own): checked again once Renderer.resolved knows it
            guidance = self.guidance if isinstance(self.guidance, (int, float)) else None
            memory = memory_ok and self.memory_guidance is not None and self.memory_guidance > 0
            problems += [f"cache: {p}" for p in cache_problems(self.cache, guidance, "batched", memory)]
        if problems:
            raise SettingsError(problems)
        guidance = None if self.guidance is None else float(self.guidance)
        memory = None if self.memory_guidance is None else float(self.memory_guidance)
        return Settings(int(self.steps), guidance, bool(self.dynamic_cfg), int(self.seed), self.sampler, self.cache,
                        memory)


@dataclass(frozen=True)
class Result:
    """One finished video: its files, the seed used, how long it took, what it holds."""

    video: Path
    storyboard: Path
    seed: int
    seconds: float
    num_frames: int
    fps: float
    latents: Path | None = None  # the final latents beside the video, for keeping its segments in the next run
    kept: tuple[int, ...] = ()  # 0-based segments kept from the previous result




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
        self._schedulers = {name: make_scheduler(name, pipe.scheduler.config) for name in SCHEDULERS}

    @property
    def default_sampler(self) -> str:
        return scheduler_name(self.pipe.scheduler)

    @property
    def has_ttt(self) -> bool:
        """Whether the model has TTT layers (memory guidance needs them)."""
        return bool(getattr(self.pipe.transformer, "has_ttt", False))

    @property
    def max_memory_guidance(self) -> float:
        """The most memory guidance the demo takes: MAX_MEMORY_GUIDANCE, or the model's own scale where higher."""
        return max(MAX_MEMORY_GUIDANCE, float(self.pipe.config.memory_guidance_scale))

    def resolved(self, settings: Settings) -> Settings:
        """Checked settings for this model: guidance and memory guidance None become the pipeline's own scales
        (checked against the cache like chosen ones), and memory guidance is refused for a model without TTT layers.
        Raises SettingsError."""
        if settings.guidance is None:
            settings = replace(settings, guidance=float(self.pipe.config.guidance_scale))
        if settings.memory_guidance is None:
            settings = replace(settings, memory_guidance=float(self.pipe.config.memory_guidance_scale))
        settings = settings.checked(self.max_memory_guidance)
        if settings.memory_guidance > 0 and not self.has_ttt:
            raise SettingsError(["memory_guidance: this model has no TTT layers to guide by; set it to 0"])
        return settings

    def render(self, storyboard: Storyboard, settings: Settings,
               on_step: Callable[[int, np.ndarray | None], None] | None = None,
               stop: threading.Event | None = None, keep: list[int] | None = None,
               previous: Path | None = None) -> Result:
        """Generates the video for a validated storyboard and writes video.mp4, its final latents
        (video.latents.safetensors) and storyboard.json to a new folder.

        on_step(steps_done, preview or None): called after every denoising step, with a `latent_preview` every few
        steps and on the last one. stop: when set, the run ends after the current step with GenerationStopped.
        keep: 0-based segments to keep from `previous` (an earlier result's video.mp4): their latents are kept exactly
        and only the other segments, and any beyond the previous video, are generated (`keep_arguments`).
        """
        settings = self.resolved(settings)
        context = keep_arguments(keep or [], previous, self.pipe, storyboard.num_segments)
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
            set_cache(self.pipe, settings.cache)
            output = self.pipe(storyboard=storyboard, num_inference_steps=settings.steps,
                               guidance_scale=settings.guidance, use_dynamic_cfg=settings.dynamic_cfg,
                               memory_guidance_scale=settings.memory_guidance,
                               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", max_segments=None,
                               strict_text=True,  # in the editor, shortening the row beats a silent cut
                               callback_on_step_end=step_end, callback_on_step_end_tensor_inputs=["latents"],
                               **context)
            frames = output.frames[0]  # (F, H, W, 3)
            folder = self.outputs.new()
            video = write_video(frames, folder / "video.mp4", output.fps)
            save_latents(output.latents, latents_path(video), video=video)
            saved = storyboard.save(folder / "storyboard.json")
            return Result(video=video, storyboard=saved, seed=seed, seconds=time.perf_counter() - start,
                          num_frames=len(frames), fps=output.fps, latents=Path(latents_path(video)),
                          kept=tuple(keep or ()))


def keep_arguments(keep: list[int], previous: Path | None, pipe, num_segments: int) -> dict:
    """The pipeline's arguments that keep rows `keep` (0-based) of the previous result `previous` (video.mp4 with its
    latents beside it): its latents, cut to the storyboard's length, and the rows to regenerate. Raises ValueError
    (one line, naming rows) when there is nothing to keep from or a kept row is past the previous video."""
    if not keep:
        return {}
    rows = f"row {keep[0] + 1} is" if len(keep) == 1 else f"rows {', '.join(str(i + 1) for i in keep)} are"
    if previous is None:
        raise ValueError(f"{rows} marked keep, but there is no earlier video to keep them from (generate "
                         "one first, or untick keep)")
    if not Path(latents_path(previous)).is_file():
        raise ValueError(f"{rows} marked keep, but the last video is gone (only the newest results are "
                         "kept); untick keep to generate anew")
    latents, _ = load_latents(latents_path(previous))
    config = pipe.transformer.config
    covered = latent_segments(latents, config.latent_frames_first, config.latent_frames_per_segment,
                              "the last video's latents")
    past = [i + 1 for i in keep if i >= covered]
    if past:
        raise ValueError(f"row {past[0]} is marked keep, but the last video has only {covered} segments")
    covered = min(covered, num_segments)  # rows removed at the end: keep the first ones
    latents = latents[:, : pipe.transformer.num_latent_frames(covered)]
    regenerate = [i for i in range(covered) if i not in keep]
    if not regenerate and covered == num_segments:
        raise ValueError("every row is marked keep: untick the rows to generate anew, or add rows")
    return {"video_latents": latents, "regenerate": regenerate}


class LastVideos:
    """Per browser session, the video.mp4 of its last finished generation (whose rows can be kept next time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._videos: dict[str, Path] = {}

    def get(self, session: str) -> Path | None:
        with self._lock:
            return self._videos.get(session)

    def set(self, session: str, video: Path) -> None:
        with self._lock:
            self._videos[session] = video


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
                     progress: Callable[..., Any] | None = None, keep: list[int] | None = None,
                     previous: Path | None = None) -> Iterator[tuple[str, Any]]:
    """Runs `renderer.render` on a worker thread and yields what the page shows as it happens.

    Yields ("preview", (H, W, 3) uint8) every few steps and finally ("done", Result); ("stopped", message) when
    stopped. Pipeline errors are re-raised here. progress(fraction or (done, total), desc=...) gets every step.
    Closing the iterator (the client went away) stops the worker after its current step. keep, previous: as
    `Renderer.render`.
    """
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            events.put(("done", renderer.render(storyboard, settings, lambda done, preview: events.put(
                ("step", (done, preview))), stop, keep, previous)))
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
                            else f"Step {done} of {settings.steps}, about {format_seconds(left)} left")
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


def is_whole(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
