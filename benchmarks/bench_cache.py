"""diffusers' cache hooks on the default model: seconds per 60-s video and the toy metrics, against no cache.

    python benchmarks/bench_cache.py [--stories 3] [--inference-steps 20] [--caches none,first-block,...]

Renders held-out 20-segment toy-world storyboards (the long-range benchmark's, seed 1000) with the bundled
models/default and each preset of pipeline/cache.py (same noise, DPM-solver, guidance 6, CFG batched, memory guidance
off), one process, the same stories in the same order for every preset; scores the videos with the toy world's
metrics and reports the mean absolute pixel change against the uncached videos. Results: OUT/results.json and a
Markdown table on stdout (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_long_range import held_out_stories, score  # noqa: E402

from pipeline.atomic import atomic_write_text  # noqa: E402
from pipeline.cache import CACHES  # noqa: E402

METRICS = ("identity", "identity_recall", "background", "background_recall", "motion", "presence")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "default"))
    p.add_argument("--stories", type=int, default=3, help="held-out 20-segment stories per preset")
    p.add_argument("--inference-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated subset of {list(CACHES)}")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_cache")
    args = p.parse_args(argv)
    args.caches = args.caches.split(",")
    unknown = [c for c in args.caches if c not in CACHES]
    if unknown:
        p.error(f"--caches: unknown {unknown}; known: {list(CACHES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pipeline import TTTVideoPipeline
    from pipeline.cache import set_cache
    from pipeline.video_io import write_video

    args.out.mkdir(parents=True, exist_ok=True)
    heldout = held_out_stories(args.out, args.stories)
    pipe = TTTVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    stories = sorted(heldout.glob("*.storyboard.json"))
    rows, reference = [], {}
    for name in args.caches:
        set_cache(pipe, name)
        videos = args.out / name
        shutil.rmtree(videos, ignore_errors=True)
        videos.mkdir(parents=True)
        seconds, changes = [], []
        for path in stories:
            started = time.perf_counter()
            frames = pipe(path, num_inference_steps=args.inference_steps, guidance_scale=args.guidance,
                          memory_guidance_scale=0.0,  # pab and faster cannot take it; every cache measured alike
                          generator=torch.Generator().manual_seed(args.seed), output_type="np").frames[0]
            seconds.append(time.perf_counter() - started)
            if name == "none":
                reference[path.name] = frames
            elif path.name in reference:  # mean absolute pixel change against the uncached video, 0-255 scale
                changes.append(float(abs(frames - reference[path.name]).mean() * 255))
            write_video(frames, videos / path.name.replace(".storyboard.json", ".mp4"), pipe.config.fps)
            shutil.copyfile(path, videos / path.name)
        summary = score(videos)
        rows.append({"cache": name, "seconds_per_video": sum(seconds) / len(seconds), "seconds": seconds,
                     "pixel_change": sum(changes) / len(changes) if changes else None,
                     **{k: summary[k] for k in METRICS}})
        print(f"{name}: {rows[-1]['seconds_per_video']:.1f} s per video, identity {100 * summary['identity']:.1f}%",
              flush=True)
    atomic_write_text(args.out / "results.json", json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                              "rows": rows}, indent=1) + "\n")
    base = rows[0]["seconds_per_video"] if rows and rows[0]["cache"] == "none" else None
    print("| cache | s / 60-s video | speed-up | mean pixel change | " + " | ".join(METRICS) + " |")
    print("|---" * (4 + len(METRICS)) + "|")
    for r in rows:
        speed = f"{base / r['seconds_per_video']:.2f}x" if base else "-"
        change = "-" if r["pixel_change"] is None else f"{r['pixel_change']:.1f}"
        print(f"| {r['cache']} | {r['seconds_per_video']:.1f} | {speed} | {change} | "
              + " | ".join(f"{100 * r[k]:.1f}%" for k in METRICS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
