"""What memory guidance costs: the same storyboard sampled without it and with each of its baselines, interleaved.

    python benchmarks/bench_memory_guidance.py [--model models/default] [--steps 20] [--repeats 3] [--scale 2]

Loads the pipeline once, then renders the storyboard to latents (no decode) --repeats times at scale 0 and at
--scale from each `memory_guidance_baseline` ("segments_apart": TTT on each segment alone; "no_ttt": TTT skipped),
in turn, with the same seed; prints each time, the medians and their ratios to scale 0. One extra transformer pass
per step (the conditional branch without memory) is the whole difference. Run it on a quiet machine, or read the
ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "default"))
    p.add_argument("--storyboard", default=str(ROOT / "examples" / "toy_story.json"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=float, default=2.0)
    args = p.parse_args(argv)

    import torch

    from pipeline import TTTVideoPipeline, load_storyboard

    pipe = TTTVideoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    storyboard = load_storyboard(args.storyboard)
    runs = [(0.0, "segments_apart"), (args.scale, "segments_apart"), (args.scale, "no_ttt")]
    seconds: dict[tuple[float, str], list[float]] = {run: [] for run in runs}
    for _ in range(args.repeats):
        for scale, baseline in runs:
            started = time.perf_counter()
            pipe(storyboard, num_inference_steps=args.steps, memory_guidance_scale=scale,
                 memory_guidance_segments="all", memory_guidance_baseline=baseline, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
            seconds[scale, baseline].append(time.perf_counter() - started)
    plain = statistics.median(seconds[runs[0]])
    for (scale, baseline), values in seconds.items():
        name = f"memory_guidance_scale {scale:g}" + (f", {baseline}" if scale else "")
        print(f"{name}: " + ", ".join(f"{v:.1f}" for v in values) + f" s (median {statistics.median(values):.1f} s, "
              f"{statistics.median(values) / plain:.2f} x)")
    print(f"{storyboard.num_segments} segments, {args.steps} steps, guidance {pipe.config.guidance_scale:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
