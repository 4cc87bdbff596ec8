"""Render a storyboard to an mp4 with a TTT-Video pipeline.

    python sample.py                                    # the bundled example with the default model (models/default/)
    python sample.py --storyboard my_story.yaml --model path/to/pipeline --output my_story.mp4
    python sample.py --model THUDM/CogVideoX-5b --ttt-adapter ttt.safetensors --storyboard story.json --offload

--model is a pipeline saved with TTTVideoPipeline.save_pretrained (a directory or hub id), or, with --ttt-adapter, a
stock CogVideoX pipeline that the adapter's TTT layers are added to. Storyboard formats: docs/storyboard.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.cache import CACHES, cache_problems, set_cache
from pipeline.loading import (
    DTYPES,
    ArgumentParser,
    InputError,
    UsageError,
    check_model_path,
    default_model,
    first_line,
    load_pipeline,
    resolve_device,
)
from pipeline.storyboard import StoryboardError, load_storyboard

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "models" / "default"
DEFAULT_STORYBOARD = ROOT / "examples" / "toy_story.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Render a storyboard to an mp4 with a TTT-Video pipeline.")
    p.add_argument("--storyboard", type=Path, default=DEFAULT_STORYBOARD,
                   help="storyboard file (.json, .yaml, .yml or .txt); default: the bundled example")
    p.add_argument("--model", default=None, help="pipeline directory or hub id; default: models/default/")
    p.add_argument("--ttt-adapter", type=Path, default=None,
                   help="TTT weights (safetensors from save_adapter) to add to --model")
    p.add_argument("--output", type=Path, default=None, help="mp4 to write; default: outputs/<storyboard name>.mp4")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic guidance schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU, each moved to the GPU in turn")
    p.add_argument("--cfg-mode", choices=("batched", "sequential"), default="batched",
                   help="sequential: run the two guidance branches in turn (less memory)")
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default=None, help="default: the pipeline's own")
    p.add_argument("--max-segments", type=int, default=21, help="most segments accepted (default 21 = 63 s)")
    p.add_argument("--cache", choices=CACHES, default="none",
                   help="reuse computation across steps with a diffusers cache hook (docs/sampling.md); default none")
    args = p.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--max-segments", args.max_segments)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.guidance < 0:
        raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
    for problem in cache_problems(args.cache, args.guidance, args.cfg_mode):
        raise UsageError(f"--cache {args.cache}: {problem}")
    return args


def main(argv: list[str] | None = None) -> int:
    # 1. flags and storyboard (cheap checks before any model is loaded)
    args = parse_args(argv)
    storyboard = load_storyboard(args.storyboard, max_segments=args.max_segments)
    args.model = args.model or default_model(DEFAULT_MODEL)
    check_model_path(args.model)
    if args.ttt_adapter is not None and not args.ttt_adapter.is_file():
        raise UsageError(f"--ttt-adapter: file not found: {args.ttt_adapter}")
    device, dtype = resolve_device(args.device, args.dtype, args.offload)
    output = args.output or ROOT / "outputs" / f"{args.storyboard.stem}.mp4"

    # 2. build the pipeline
    import torch
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    from pipeline.video_io import write_video

    try:
        pipe = load_pipeline(args.model, args.ttt_adapter, dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load --model {args.model}: {first_line(e)}") from None
    if args.scheduler is not None:
        scheduler_class = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[args.scheduler]
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    set_cache(pipe, args.cache)

    # 3. generate
    start = time.perf_counter()
    result = pipe(storyboard, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  use_dynamic_cfg=args.dynamic_cfg, generator=torch.Generator("cpu").manual_seed(args.seed),
                  cfg_mode=args.cfg_mode, max_segments=args.max_segments, output_type="np")
    elapsed = time.perf_counter() - start

    # 4. save
    frames = result.frames[0]  # (F, H, W, 3)
    write_video(frames, output, result.fps)
    print(f"wrote {output}: {len(frames) / result.fps:.2f} s, {len(frames)} frames at {result.fps:g} fps "
          f"({storyboard.num_segments} segments), generated in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except StoryboardError as e:  # one line per problem
        for problem in e.problems:
            print(f"sample.py: error: {problem}", file=sys.stderr)
        sys.exit(1)
    except InputError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(1)
