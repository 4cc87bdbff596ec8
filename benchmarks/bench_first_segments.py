"""Can a model draw what the text says? The first K segments of the long-range benchmark's held-out stories.

    python benchmarks/bench_first_segments.py outputs/toy/pretrain/final [MODEL ...] [--segments 1] [--stories 50]

With --segments 1 nothing needs memory: the text of a story's first segment names the backdrop and describes every
character it brings in. So this measures the pretrained model itself, the precondition of the long-range benchmark
(benchmarks/bench_long_range.py): a model that cannot draw a character in its introducing segment cannot keep it.
Each MODEL is an exported pipeline directory (a train.py `final/`, with or without TTT). The held-out stories are the
long-range benchmark's (seed 1000, made on first use in OUT/heldout); frames are scored as rendered (no mp4 step);
DPM-solver, 20 steps, each model's own guidance scale (pipeline config; --guidance to set one), seed 1000 (each
story a noise stream of its own derived from it, as in the long-range benchmark), as in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_long_range import scale  # noqa: E402  (after the path insert; no torch)

REPORTED = ("background", "presence", "color", "shape", "size", "identity")


def standard_error(rate: float, count: int) -> float:
    """The binomial standard error of a rate measured on `count` characters (each right or wrong on its own)."""
    return (rate * (1.0 - rate) / count) ** 0.5 if count else float("nan")


def first_segments(storyboard: dict, k: int) -> dict:
    """The storyboard cut after its first k segments (scenes kept as they are)."""
    scenes, left = [], k
    for scene in storyboard["scenes"]:
        if left == 0:
            break
        segments = scene["segments"][:left]
        left -= len(segments)
        scenes.append({**scene, "segments": segments})
    return {**storyboard, "scenes": scenes}


def rendered(model: str, storyboards: list[dict], steps: int, guidance: float | None, seed: int,
             memory_guidance: float | list | None = None, parts: list[list | None] | None = None):
    """Each storyboard sampled by the exported pipeline `model` in joint mode, in order: uint8 (F, H, W, 3) frames.
    Storyboard i draws its noise from story_generator(seed, i). guidance, memory_guidance: None samples at the
    model's own (its model_index.json's guidance_scale; memory_guidance_scale where its _segments say); a list:
    one memory_guidance_scale per storyboard. parts: one segment_parts per storyboard (composed guidance; None: its
    texts as they are)."""
    import numpy as np
    from bench_long_range import story_generator
    from tqdm.auto import tqdm

    from pipeline import TTTVideoPipeline

    pipe = TTTVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    for index, storyboard in enumerate(tqdm(storyboards, desc=Path(model).parent.name or model, unit="story")):
        frames = pipe(storyboard, num_inference_steps=steps, guidance_scale=guidance,
                      memory_guidance_scale=memory_guidance[index] if isinstance(memory_guidance, list)
                      else memory_guidance, generator=story_generator(seed, index),
                      segment_parts=None if parts is None else parts[index], output_type="np").frames[0]
        yield (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def evaluate(model: str, storyboards: list[dict], steps: int, guidance: float | None, seed: int,
             memory_guidance: float | None = None) -> dict:
    from pipeline.toyworld import score_video, summarize

    frames = rendered(model, storyboards, steps, guidance, seed, memory_guidance)
    return summarize([score_video(video, storyboard) for video, storyboard in zip(frames, storyboards)])


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The models to sample and how (shared by the benchmarks that sample held-out toy stories in joint mode)."""
    p.add_argument("models", nargs="+", help="exported pipeline directories")
    p.add_argument("--inference-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance; default: each model's own (its config's guidance_scale)")
    p.add_argument("--memory-guidance", type=scale, default=None, metavar="M",
                   help="memory guidance scale, on the segments the model's config names (0: off); default: each "
                   "model's own (its config's memory_guidance_scale)")
    p.add_argument("--seed", type=int, default=1000)


def check_models(p: argparse.ArgumentParser, models: list[str]) -> None:
    """A usage error naming the first of `models` that is not an exported pipeline, before anything is sampled."""
    for model in models:
        if not (Path(model) / "model_index.json").is_file():
            p.error(f"{model}: no exported pipeline (model_index.json) there")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--segments", type=int, default=1, help="first K segments of each story (default 1)")
    p.add_argument("--stories", type=int, default=50)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_long_range",
                   help="where the held-out stories are (or are made): the long-range benchmark's folder")
    p.add_argument("--min-identity", type=float, metavar="PCT",
                   help="exit with status 3 and say so when a model's identity is below PCT percent (a recipe's gate)")
    args = p.parse_args(argv)
    if args.segments < 1 or args.stories < 1:
        p.error("--segments and --stories must be at least 1")
    check_models(p, args.models)

    from bench_long_range import held_out_stories

    folder = held_out_stories(args.out, args.stories)
    storyboards = [first_segments(json.loads(path.read_text()), args.segments)
                   for path in sorted(folder.glob("*.storyboard.json"))]
    print(f"| model | {' | '.join(REPORTED)} | identity's standard error | characters |\n"
          f"|---|{'---|' * (len(REPORTED) + 2)}")
    below = []
    for model in args.models:
        summary = evaluate(model, storyboards, args.inference_steps, args.guidance, args.seed, args.memory_guidance)
        count = summary["counts"]["identity"]  # the characters introduced in the segments scored
        error = 100 * standard_error(summary["identity"], count)
        print(f"| {model} | " + " | ".join(f"{100 * summary[k]:.0f}" for k in REPORTED) + f" | {error:.1f} | {count} |",
              flush=True)
        if args.min_identity is not None and 100 * summary["identity"] < args.min_identity:
            below.append(f"{model}: identity {100 * summary['identity']:.1f}% (standard error {error:.1f} over "
                         f"{count} characters) < {args.min_identity:g}%")
    for line in below:
        print(f"bench_first_segments: below the gate: {line} (the model does not draw the characters its texts "
              "describe; see docs/default_model.md)", file=sys.stderr)
    return 3 if below else 0


if __name__ == "__main__":
    sys.exit(main())
