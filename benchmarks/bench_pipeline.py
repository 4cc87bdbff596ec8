"""TTTVideoPipeline on the tiny random pipeline of tests/tiny.py, on the CPU.

Measures:
- time per denoising step at 1 and 20 segments, with guidance batched and sequential, and the ratio
  step(20) / (20 x step(1)) (target: <= 1.15). A point's time is the fastest of its timed steps (the first step
  is dropped as warm-up) over --rounds fresh processes, run interleaved: on a shared machine the minimum is the
  estimate least disturbed by other work;
- peak memory growth of the denoising loop: max RSS of a fresh process above its state after building the pipeline;
- the VAE decode of 60 s (20 segments) with the causal cache carried window by window (each window converted to
  uint8 on the CPU and dropped, as a streaming writer would), against diffusers' whole-sequence `vae.decode`.
Each point runs in a fresh subprocess so that its peak memory is its own.

    python benchmarks/bench_pipeline.py                 # prints a markdown table
    python benchmarks/bench_pipeline.py --size 256      # 32 x 32 latents: the work per token dominates
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def build_pipeline():
    import torch
    from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, tiny_components

    from models import CogVideoXTTTTransformer3DModel
    from pipeline import TTTVideoPipeline

    components = tiny_components(0)
    transformer = CogVideoXTTTTransformer3DModel.from_base(
        components.pop("transformer"), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        gate_init=0.1)
    pipe = TTTVideoPipeline(transformer=transformer, **components)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    return pipe


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_denoise(segments: int, steps: int, cfg_mode: str, size: int) -> dict:
    import torch

    from pipeline import Segment, Storyboard

    pipe = build_pipeline()
    storyboard = Storyboard([Segment(f"segment {i}", scene_start=i % 4 == 0 and i > 0) for i in range(segments)])
    stamps = []

    def stamp(p, step, timestep, tensors):
        stamps.append(time.perf_counter())
        return {}

    before = peak_rss()
    start = time.perf_counter()
    pipe(storyboard, num_inference_steps=steps + 1, output_type="latent", cfg_mode=cfg_mode, height=size, width=size,
         generator=torch.Generator().manual_seed(0), callback_on_step_end=stamp)
    step_times = [b - a for a, b in zip([start, *stamps], stamps)][1:]  # drop the warm-up step
    return {"step_s": min(step_times), "peak_growth": peak_rss() - before}


def measure_decode(segments: int, window: int | None, whole: bool) -> dict:
    import torch

    pipe = build_pipeline()
    latents = torch.randn(1, pipe.transformer.num_latent_frames(segments), pipe.transformer.config.in_channels,
                          4, 4, generator=torch.Generator().manual_seed(0))
    before = peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        if whole:
            video = pipe.vae.decode(latents.permute(0, 2, 1, 3, 4) / pipe.vae.config.scaling_factor).sample
            frames = video.shape[2]
        else:
            frames = 0
            for window_pixels in pipe.decode_windows(latents, window):
                chunk = pipe.video_processor.postprocess_video(window_pixels, output_type="pt")
                frames += (chunk * 255).round().to(torch.uint8).shape[1]
    return {"decode_s": time.perf_counter() - start, "peak_growth": peak_rss() - before, "frames": frames}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "denoise":
        result = measure_denoise(args.segments[0], args.steps, args.cfg_mode, args.size)
    else:
        result = measure_decode(args.segments[0], args.window, args.child == "decode-whole")
    print(json.dumps(result))


def run_child(args, kind: str, segments: int, cfg_mode: str, window: int | None = None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--segments", str(segments),
               "--steps", str(args.steps), "--threads", str(args.threads), "--cfg-mode", cfg_mode, "--size",
               str(args.size)]
    if window is not None:
        command += ["--window", str(window)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed denoising steps (one more runs first as warm-up)")
    p.add_argument("--segments", type=int, nargs="+", default=[1, 20])
    p.add_argument("--size", type=int, default=32,
                   help="height = width in pixels of the denoised video (32: the tiny model's own; larger sizes make "
                        "the per-token work, not the per-step overhead, dominate)")
    p.add_argument("--decode-segments", type=int, default=20, help="segments decoded (at 32 x 32 pixels)")
    p.add_argument("--window", type=int, default=None, help="decode window in latent frames (default: one segment)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per point; the fastest is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed on a shared machine)")
    p.add_argument("--cfg-mode", default="batched", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=("denoise", "decode-window", "decode-whole"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    print(f"tiny random pipeline (tests/tiny.py), CPU, {args.threads} thread(s), {args.steps} timed steps, "
          f"{args.rounds} rounds, denoising at {args.size} x {args.size} pixels; a shared, noisy machine\n")
    points = [("denoise", n, cfg_mode) for cfg_mode in ("batched", "sequential") for n in args.segments]
    points += [("decode-window", args.decode_segments, "batched"), ("decode-whole", args.decode_segments, "batched")]
    results: dict[tuple, dict] = {}
    for _ in range(args.rounds):  # interleaved, so that a busy spell of the machine does not hit one point only
        for point in points:
            r = run_child(args, *point, window=args.window)
            key = "step_s" if point[0] == "denoise" else "decode_s"
            if point not in results or r[key] < results[point][key]:
                results[point] = r

    print("| measurement | segments | time | peak RSS growth |")
    print("|---|---|---|---|")
    for kind, n, cfg_mode in points:
        r = results[kind, n, cfg_mode]
        if kind == "denoise":
            print(f"| denoising step, CFG {cfg_mode} | {n} | {r['step_s'] * 1000:.0f} ms | {mib(r['peak_growth'])} |")
        else:
            label = {"decode-window": "VAE decode, cache carried window by window",
                     "decode-whole": "VAE decode, diffusers' vae.decode of the whole sequence"}[kind]
            print(f"| {label} ({r['frames']} frames) | {n} | {r['decode_s']:.1f} s | {mib(r['peak_growth'])} |")
    lo, hi = min(args.segments), max(args.segments)
    print()
    for cfg_mode in ("batched", "sequential"):
        ratio = results["denoise", hi, cfg_mode]["step_s"] / (hi / lo * results["denoise", lo, cfg_mode]["step_s"])
        print(f"step({hi}) / ({hi}/{lo} x step({lo})), CFG {cfg_mode}: {ratio:.2f} (target <= 1.15)")


if __name__ == "__main__":
    main()
