"""Render a storyboard to an mp4 with a TTT-Video pipeline.

    python sample.py                                    # the bundled example with the default model (models/default/)
    python sample.py --storyboard my_story.yaml --model path/to/pipeline --output my_story.mp4
    python sample.py --model THUDM/CogVideoX-5b --ttt-adapter ttt.safetensors --storyboard story.json --offload
    python sample.py --storyboard longer.json --video short.mp4 --output longer.mp4     # extend short.mp4
    python sample.py --storyboard story.json --video story.mp4 --regenerate 3,5          # redo segments 3 and 5
    python sample.py --storyboard story.json --reference look.mp4                        # a clip as clean context
    torchrun --nproc_per_node 8 sample.py --context-parallel 8 --model path/to/pipeline --storyboard long.json

--model is a pipeline saved with TTTVideoPipeline.save_pretrained (a directory or hub id), or, with --ttt-adapter, a
stock CogVideoX pipeline that the adapter's TTT layers are added to. Storyboard formats: docs/storyboard.md.
--video keeps the segments IN.mp4 covers (all but those in --regenerate) and generates the rest of the storyboard;
with --save-latents the final latents are written beside the mp4 (OUT.latents.safetensors) and a later --video OUT.mp4
keeps them exactly instead of re-encoding its frames. docs/sampling.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

from models.transformer_ttt import MEMORY_BASELINES
from pipeline.cache import CACHES, cache_problems, set_cache
from pipeline.loading import (
    DEFAULT_MODEL,
    DTYPES,
    ArgumentParser,
    InputError,
    UsageError,
    check_model_path,
    default_model,
    first_line,
    fit_cpu_threads,
    load_pipeline,
    resolve_device,
)
from pipeline.schedulers import SCHEDULERS, make_scheduler
from pipeline.storyboard import MEMORY_GUIDANCE_SEGMENTS, StoryboardError, load_storyboard

ROOT = Path(__file__).resolve().parent
DEFAULT_STORYBOARD = ROOT / "examples" / "toy_story.json"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (a negative seed would alias a positive one)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Render a storyboard to an mp4 with a TTT-Video pipeline.")
    p.add_argument("--storyboard", type=Path, default=DEFAULT_STORYBOARD,
                   help="storyboard file (.json, .yaml, .yml or .txt); default: the bundled example")
    p.add_argument("--model", default=None, help="pipeline directory or hub id; default: models/default/")
    p.add_argument("--ttt-adapter", type=Path, default=None,
                   help="TTT weights (safetensors from save_adapter) to add to --model")
    p.add_argument("--output", type=Path, default=None,
                   help="the .mp4 to write (checked before generating); default: outputs/<storyboard name>.mp4")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; <= 1 turns it off; "
                   "default: the model's own (its model_index.json's guidance_scale: 2 for the bundled model, 6 for "
                   "CogVideoX)")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic guidance schedule")
    p.add_argument("--memory-guidance", type=memory_scales, default=None, metavar="M[,M...]",
                   help="memory guidance (docs/sampling.md): push segments toward what the TTT layers carry from the "
                   "rest of the video; one number, or one per storyboard segment (e.g. 0,2,2); 0: off; default: the "
                   "model's own (its model_index.json's memory_guidance_scale; 24 for the bundled model)")
    p.add_argument("--memory-segments", choices=MEMORY_GUIDANCE_SEGMENTS, default=None,
                   help="where one --memory-guidance number applies: every segment, or those that continue a scene "
                   "(not the first segment, not a scene's first); default: the model's own (continuing for the bundled "
                   "model)")
    p.add_argument("--memory-baseline", choices=MEMORY_BASELINES, default=None,
                   help="what memory guidance pushes away from: the prediction with every segment's TTT apart (only "
                   "what TTT carries between segments is pushed) or with no TTT at all (which also draws characters "
                   "big); default: the model's own")
    p.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED} (default 0)")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU, each moved to the GPU in turn")
    p.add_argument("--cfg-mode", choices=("batched", "sequential"), default="batched",
                   help="sequential: run the two guidance branches in turn (less memory)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the pipeline's own")
    p.add_argument("--max-segments", type=int, default=21, help="most segments accepted (default 21 = 63 s)")
    p.add_argument("--video", type=Path, default=None, help="mp4 of the storyboard's first segments: they are kept, "
                   "the storyboard's further segments generated (its latents beside it are used when present)")
    p.add_argument("--regenerate", default=None, help="with --video: segments to generate anew, 1-based, e.g. 3,5")
    p.add_argument("--reference", type=Path, default=None,
                   help="mp4 of whole segments put before segment 1 as clean context (not in the output)")
    p.add_argument("--save-latents", action="store_true",
                   help="also write the final latents beside the mp4 (OUT.latents.safetensors), for --video later")
    p.add_argument("--context-parallel", type=int, default=1, metavar="P",
                   help="split the segments over P processes started by torchrun (docs/sampling.md)")
    p.add_argument("--strict-text", action="store_true",
                   help="refuse texts over the text encoder's token budget (default: truncate them with a warning)")
    p.add_argument("--cache", choices=CACHES, default="none",
                   help="reuse computation across steps with a diffusers cache hook (docs/sampling.md); default none")
    args = p.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--max-segments", args.max_segments),
                        ("--context-parallel", args.context_parallel)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 0):
        raise UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}")
    if args.regenerate is not None and args.video is None:
        raise UsageError("--regenerate needs --video (the video whose other segments are kept)")
    if isinstance(args.memory_guidance, list) and args.memory_segments is not None:
        raise UsageError("--memory-segments places one --memory-guidance number; a list gives each segment its own "
                         "already")
    if args.reference is not None and args.video is not None:
        raise UsageError("--reference cannot be combined with --video; give one of them")
    if args.reference is not None and args.save_latents:
        raise UsageError("--save-latents cannot be combined with --reference (the latents would include the "
                         "reference, which the mp4 does not)")
    for flag, path in (("--video", args.video), ("--reference", args.reference)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag}: file not found: {path}")
    check_cache(args)  # without --guidance or --memory-guidance, again once the model (and its own) is loaded
    return args


def memory_scales(text: str) -> float | list[float]:
    """--memory-guidance: "M" (every segment) or "M1,M2,..." (one per segment), each a finite number >= 0."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"every scale must be a finite number >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values


def memory_on(scale: float | list[float] | None) -> bool:
    """Whether memory guidance is on (None, the model's own before it is loaded: off until then)."""
    return scale is not None and max(scale if isinstance(scale, list) else [scale]) > 0


def check_cache(args: argparse.Namespace, note: str = "") -> None:
    for problem in cache_problems(args.cache, args.guidance, args.cfg_mode, memory_on(args.memory_guidance)):
        raise UsageError(f"--cache {args.cache}: {problem}{note}")


def main(argv: list[str] | None = None) -> int:
    # 1. flags and storyboard (cheap checks before any model is loaded)
    args = parse_args(argv)
    storyboard = load_storyboard(args.storyboard, max_segments=args.max_segments)
    if isinstance(args.memory_guidance, list) and len(args.memory_guidance) != storyboard.num_segments:
        raise UsageError(f"--memory-guidance: expected one number or one per storyboard segment "
                         f"({storyboard.num_segments}), got {len(args.memory_guidance)} numbers")
    args.model = args.model or default_model(DEFAULT_MODEL)
    check_model_path(args.model)
    if args.ttt_adapter is not None and not args.ttt_adapter.is_file():
        raise UsageError(f"--ttt-adapter: file not found: {args.ttt_adapter}")
    device, dtype = resolve_device(args.device, args.dtype, args.offload)
    from pipeline.video_io import check_output_path, write_video

    output = args.output or ROOT / "outputs" / f"{args.storyboard.stem}.mp4"
    try:
        check_output_path(output)
    except ValueError as e:
        raise UsageError(f"--output: {e}") from None
    if args.context_parallel > storyboard.num_segments:
        raise UsageError(f"--context-parallel {args.context_parallel} needs at least as many segments, the storyboard "
                         f"has {storyboard.num_segments}")
    mesh, rank = None, 0
    if args.context_parallel > 1:
        from pipeline.context_parallel import start_context_parallel

        mesh, rank, device = start_context_parallel(args.context_parallel, device)

    # 2. build the pipeline
    import torch

    from pipeline.segment_context import latents_path, save_latents

    try:
        pipe = load_pipeline(args.model, args.ttt_adapter, dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load --model {args.model}: {first_line(e)}") from None
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    if mesh is not None:
        try:
            pipe.transformer.enable_context_parallel(mesh)
        except ValueError as e:
            raise InputError(f"--context-parallel {args.context_parallel}: {first_line(e)}") from None
    if args.guidance is None:
        args.guidance = pipe.config.guidance_scale
        check_cache(args, f" (the model's guidance is {args.guidance:g})")
    if args.memory_guidance is None:
        args.memory_guidance = pipe.config.memory_guidance_scale
        check_cache(args, f" (the model's memory guidance is {args.memory_guidance:g}; --memory-guidance 0 turns it "
                          "off)")
    if args.memory_segments is None:
        args.memory_segments = pipe.config.memory_guidance_segments
    if args.memory_baseline is None:
        args.memory_baseline = pipe.config.memory_guidance_baseline
    if memory_on(args.memory_guidance) and not pipe.transformer.has_ttt:
        raise InputError(f"--memory-guidance: --model {args.model} has no TTT layers to guide by")
    if args.steps > pipe.scheduler.config.num_train_timesteps:
        raise UsageError(f"--steps must be at most {pipe.scheduler.config.num_train_timesteps} (the scheduler's "
                         f"training timesteps), got {args.steps}")
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if device.type == "cpu" and (threads := fit_cpu_threads()):
        print(f"sample.py: other jobs keep cores busy; sampling on {threads} thread(s) (OMP_NUM_THREADS chooses)",
              file=sys.stderr)
    set_cache(pipe, args.cache)

    # 3. clean context: the segments of --video to keep, or a --reference clip
    try:
        context, kept = context_arguments(args, pipe, storyboard.num_segments)
    except ValueError as e:
        raise InputError(str(e)) from None

    # 4. generate
    start = time.perf_counter()
    result = pipe(storyboard, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  use_dynamic_cfg=args.dynamic_cfg, generator=torch.Generator("cpu").manual_seed(args.seed),
                  cfg_mode=args.cfg_mode, max_segments=args.max_segments, strict_text=args.strict_text,
                  memory_guidance_scale=args.memory_guidance, memory_guidance_segments=args.memory_segments,
                  memory_guidance_baseline=args.memory_baseline, output_type="np", **context)
    elapsed = time.perf_counter() - start
    if mesh is not None:
        torch.distributed.destroy_process_group()

    # 5. save (with context parallelism every rank holds the same frames: the first writes them)
    frames = result.frames[0]  # (F, H, W, 3)
    if rank > 0:
        return 0
    write_video(frames, output, result.fps)
    if args.save_latents:
        save_latents(result.latents, latents_path(output), video=output)
    print(f"wrote {output}: {len(frames) / result.fps:.2f} s, {len(frames)} frames at {result.fps:g} fps "
          f"({storyboard.num_segments} segments{kept}), {args.steps} steps at guidance {args.guidance:g}"
          f"{memory_note(args.memory_guidance, args.memory_segments, args.memory_baseline)}, generated in "
          f"{elapsed:.1f} s")
    return 0


def memory_note(scale: float | list[float], where: str = "all", baseline: str = "segments_apart") -> str:
    if not memory_on(scale):
        return ""
    away = "" if baseline == "segments_apart" else " (away from no TTT)"
    if isinstance(scale, list):
        return f", memory guidance {','.join(f'{m:g}' for m in scale)}{away}"
    return (f", memory guidance {scale:g}" + (" on the segments that continue a scene" if where == "continuing" else "")
            + away)


def context_arguments(args: argparse.Namespace, pipe, num_segments: int) -> tuple[dict, str]:
    """The pipeline's keyword arguments for --video / --regenerate / --reference, and a note for the summary line."""
    from pipeline.segment_context import parse_segment_list, read_context_video

    if args.reference is not None:
        given, r, source = read_context_video(args.reference, pipe, "--reference")
        key = "reference_latents" if source == "latents" else "reference"
        return {key: given}, f"; after {r} reference segment{'s' * (r > 1)} from {args.reference} ({source})"
    if args.video is None:
        return {}, ""
    given, k, source = read_context_video(args.video, pipe, "--video")
    if k > num_segments:
        raise ValueError(f"--video {args.video} covers {k} segments, the storyboard has only {num_segments}")
    regenerate = parse_segment_list(args.regenerate, k) if args.regenerate is not None else []
    kept = [i + 1 for i in range(k) if i not in regenerate]
    if len(kept) == num_segments:
        raise ValueError(f"nothing left to generate: --video {args.video} covers all {num_segments} segments of the "
                         "storyboard; add segments to the storyboard or pass --regenerate")
    key = "video_latents" if source == "latents" else "video"
    note = f"; kept {', '.join(map(str, kept))} from {args.video} ({source})" if kept else ""
    return {key: given, "regenerate": regenerate}, note


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. a text truncated to the token budget) as one line each, like the errors."""
    print(f"sample.py: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    warnings.showwarning = show_warning
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
