"""Long-range consistency on the toy world: TTT-MLP vs TTT-Linear vs local attention only vs full attention.

    python benchmarks/bench_long_range.py [--stories 50] [--steps 3s=200,15s=200,60s=100] [--inference-steps 50]

Every variant starts from the same pretrained toy CogVideoX (outputs/toy/base, made by scripts/train_default_model.sh
up to its step 5) and is trained with train.py through the same curriculum, data, seed and step budget
(configs/toy/ttt/{3s,15s,60s}.yaml with model.ttt overridden):

    local   ttt_type none,   segment-local attention       (no path between segments but the text)
    linear  ttt_type linear, segment-local attention + TTT-Linear (the default model's recipe)
    mlp     ttt_type mlp,    segment-local attention + TTT-MLP
    full    ttt_type none,   one attention window over the whole sequence (quadratic)

Each trained variant then renders held-out 20-segment (60-s) toy-world storyboards (generated with a seed the
training data never used) in two modes: joint (every segment generated from noise, as `python sample.py` does) and
recall (segment 1 given as clean ground truth, the VAE encoding of the held-out video's first segment, and the other
19 generated with it as context: whether a look shown once is carried to segment 20 isolates memory from drawing;
segment 1, given, is not scored).
Rendering runs in a child process, whose peak resident memory is read from the kernel (wait4), and the
videos are scored with the toy world's metrics (pipeline/toyworld/tracking.py and checks.py). Rows for the held-out
ground-truth videos and their VAE reconstructions (what a perfect transformer could reach through this VAE) and the
chance levels frame the numbers. Results: OUT/results.json and a Markdown table on stdout (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.atomic import atomic_write_text, build_dir_atomically  # noqa: E402  (after the path insert; no torch)

VARIANTS = {  # name -> model.ttt overrides
    "local": {"ttt_type": "none", "attention_window": "segment"},
    "linear": {"ttt_type": "linear", "attention_window": "segment"},
    "mlp": {"ttt_type": "mlp", "attention_window": "segment"},
    "full": {"ttt_type": "none", "attention_window": "full"},
}
STAGES = ("3s", "15s", "60s")
STAGE_CONFIG = "configs/toy/ttt/{stage}.yaml"
REPORTED_SEGMENTS = (1, 5, 10, 20)  # identity accuracy at these segments (1-based)
MODES = ("joint", "recall")
MEMORY_SEGMENTS = ("all", "named", "continuing")
MEMORY_BASELINES = ("segments_apart", "no_ttt")  # models/transformer_ttt.py's, named here without importing torch
REGISTERS = ("story", "dense", "unshaped")  # pipeline.toyworld.dataset's, named here without importing torch
HELD_OUT_SEED = 1000  # the training stories use seed 0: independent streams (pipeline.toyworld.dataset.story_seed)


def scale(text: str) -> float:
    """A guidance scale from the command line (argparse's `type`): a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--modes", default=",".join(MODES), help="joint: all segments generated; recall: segment 1 given "
                   "as clean ground truth (comma-separated)")
    p.add_argument("--stories", type=int, default=50, help="held-out 20-segment stories to render and score")
    p.add_argument("--steps", default="", help="train.steps per stage, e.g. 3s=200,15s=200,60s=100 (default: the "
                   "stage configs' own, i.e. the default model's budget)")
    p.add_argument("--base", default="outputs/toy/base", help="the shared pretrained pipeline (stock CogVideoX)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_long_range")
    p.add_argument("--trained", action="append", default=[], metavar="VARIANT=DIR",
                   help="use this exported pipeline for VARIANT instead of training it (e.g. "
                   "linear=outputs/toy/ttt/60s/final when --steps matches the default recipe)")
    p.add_argument("--inference-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance; default: each model's own (its model_index.json's guidance_scale)")
    p.add_argument("--guidance-named", type=float, default=None, metavar="G",
                   help="guidance for the segments whose text only names characters (no introduction, no scene "
                   "opening): what the model draws there comes from memory, which strong guidance overrides; "
                   "default: the same as the other segments")
    p.add_argument("--memory-guidance", type=scale, default=None, metavar="M",
                   help="the pipeline's memory_guidance_scale: M x (the prediction minus the same without memory) "
                   "added, "
                   "which pushes a segment toward what TTT carries (0: off; where: --memory-segments); default: each "
                   "model's own, as sample.py (its model_index.json's memory_guidance_scale and _segments)")
    p.add_argument("--memory-segments", choices=MEMORY_SEGMENTS, default=None,
                   help="where --memory-guidance applies (0 elsewhere): every segment; only those whose text only "
                   "names characters (no introduction, no scene opening); or every segment that continues a scene "
                   "(neither segment 1 nor a scene's first); default: the model's own")
    p.add_argument("--memory-baseline", choices=MEMORY_BASELINES, default=None,
                   help="the prediction without memory that memory guidance pushes away from: every segment's TTT "
                   "apart, or no TTT (the pipeline's memory_guidance_baseline); default: the model's own")
    p.add_argument("--memory-timesteps", default=None, metavar="LOW,HIGH",
                   help="memory guidance only on the steps whose timestep t has LOW <= t < HIGH (the pipeline's "
                   "memory_guidance_timesteps; default: every step)")
    p.add_argument("--memory-intro", type=float, default=None, metavar="M",
                   help="with --memory-segments continuing: the scale on the segments among them whose text "
                   "introduces a character (default: --memory-guidance's)")
    p.add_argument("--register", choices=REGISTERS, default="story", help="the texts the videos are rendered from: "
                   "story (what users write: a look only where a character comes in; the default) or dense (every "
                   "segment describes each character on stage: what the model draws when the text tells it "
                   "everything memory should carry); scored against the story storyboards either way")
    p.add_argument("--second-pass", action="store_true",
                   help="draw every video twice: jointly, then every segment whose text introduces no character "
                   "again, with the first pass's introductions kept clean as context (twice the time)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: story i draws its noise from a stream of its "
                   "own derived from it (story_generator), the same for every variant and mode")
    p.add_argument("--ceiling-stories", type=int, default=10, help="held-out stories to pass through the VAE alone "
                   "for the reconstruction ceiling (a 60-s video takes ~25 s to encode and decode on one CPU core; "
                   "0: none, the row kept only if an earlier run's videos are in OUT)")
    p.add_argument("--resample", action="store_true", help="render again even where an earlier run's videos with the "
                   "same settings are there")
    p.add_argument("--vae", default=None, help="VAE folder for the reconstruction ceiling (default: the base's)")
    p.add_argument("--sample", nargs=4, metavar=("MODEL", "STORYBOARDS", "VIDEOS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    if any(m not in MODES for m in args.modes):
        p.error(f"--modes: expected a comma-separated subset of {list(MODES)}, got {','.join(args.modes)}")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    args.variants = args.variants.split(",")
    args.stage_steps = {}
    for item in filter(None, args.steps.split(",")):
        stage, _, value = item.partition("=")
        if stage not in STAGES or not value.isdigit():
            p.error(f"--steps: expected STAGE=N with STAGE in {STAGES}, got {item!r}")
        args.stage_steps[stage] = int(value)
    args.trained = dict(item.split("=", 1) for item in args.trained)
    if args.stories < 1 or args.inference_steps < 1:
        p.error("--stories and --inference-steps must be at least 1")
    if args.memory_timesteps is not None:
        try:
            low, high = (int(v) for v in args.memory_timesteps.split(","))
        except ValueError:
            p.error(f"--memory-timesteps: expected LOW,HIGH (whole numbers), got {args.memory_timesteps!r}")
        if not 0 <= low < high:
            p.error(f"--memory-timesteps: expected 0 <= LOW < HIGH, got {args.memory_timesteps!r}")
        args.memory_timesteps = (low, high)
    if args.memory_intro is not None and not (args.memory_intro >= 0 and args.memory_segments == "continuing"):
        where = args.memory_segments or "the model's own segments"
        p.error(f"--memory-intro: expected a number >= 0 with --memory-segments continuing, got {args.memory_intro} "
                f"with {where}")
    return args


def run(command: list[str], log: Path) -> None:
    """Runs a command with its output in `log`; raises with the log's tail if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(command)} failed ({code}); {log}:\n" + "\n".join(tail))


def held_out_stories(out: Path, stories: int) -> Path:
    """OUT/heldout: `stories` 20-segment stories (mp4 + storyboard + truth), generated once, and again when the folder
    holds another number of stories or stories of an earlier version of the toy world."""
    from pipeline.toyworld.dataset import load_truth, story_seed
    from pipeline.toyworld.sampler import sample_story

    folder = out / "heldout"
    first = folder / "story_00000.truth.json"
    current = first.is_file() and (load_truth(first).to_dict()
                                   == sample_story(story_seed(HELD_OUT_SEED, 0), 20, 20).to_dict())
    if len(list(folder.glob("*.storyboard.json"))) != stories or not current:
        # made in a temporary sibling and swapped in whole: a killed run leaves no half folder, and two benchmarks
        # that make it at once each swap in the same stories instead of deleting each other's files
        build_dir_atomically(folder, lambda tmp: run(
            [sys.executable, "-m", "pipeline.toyworld", "generate", "--out", str(tmp), "--stories", str(stories),
             "--segments", "20", "--seed", str(HELD_OUT_SEED)], out / "logs" / "heldout.log"))
    return folder


def train_variant(args: argparse.Namespace, variant: str) -> Path:
    """The variant's final export after the 3 s -> 15 s -> 60 s stages (skipped when already there)."""
    previous = None
    for stage in STAGES:
        stage_dir = args.out / variant / stage
        if not (stage_dir / "final" / "model_index.json").is_file():
            overrides = [f"output_dir={stage_dir}", f"model.pretrained={args.base}", "log.tracker=none",
                         *(f"model.ttt.{k}={v}" for k, v in VARIANTS[variant].items())]
            if previous is not None:
                overrides.append(f"model.init_from={previous}")
            if stage in args.stage_steps:
                overrides.append(f"train.steps={args.stage_steps[stage]}")
            started = time.perf_counter()
            run([sys.executable, "train.py", "--config", STAGE_CONFIG.format(stage=stage), *overrides],
                args.out / "logs" / f"{variant}-{stage}.log")
            print(f"  trained {variant} {stage} in {time.perf_counter() - started:.0f} s", flush=True)
        previous = stage_dir / "final"
    return previous


def segment_guidance(storyboard: dict, guidance: float, guidance_named: float | None) -> float | list[float]:
    """The pipeline's guidance_scale for a toy-world storyboard: `guidance`, or with `guidance_named` one scale per
    segment: `guidance` where the text introduces a character (describes its look) or opens a scene (names the
    backdrop), `guidance_named` where it only names characters."""
    from pipeline.toyworld.text import parse_storyboard

    if guidance_named is None:
        return guidance
    return [guidance if segment.intros or segment.scene_start else guidance_named
            for segment in parse_storyboard(storyboard).segments]


def memory_scales(storyboard: dict, memory_guidance: float, where: str = "all",
                  intro: float | None = None) -> float | list[float]:
    """The pipeline's memory_guidance_scale for a toy-world storyboard: `memory_guidance` on every segment (where
    "all"), or one scale per segment, 0 except on those that only name characters ("named", as `segment_guidance`)
    or on those that continue a scene ("continuing": neither segment 1 nor a scene's first; `intro`, when given, on
    the ones among them whose text introduces a character)."""
    from pipeline.toyworld.text import parse_storyboard

    if where == "all":
        return memory_guidance
    if where == "named":
        return segment_guidance(storyboard, 0.0, memory_guidance)
    if where != "continuing":
        raise ValueError(f"where: expected one of {MEMORY_SEGMENTS}, got {where!r}")
    from pipeline.storyboard import load_storyboard

    at_intro = memory_guidance if intro is None else intro
    continues = load_storyboard(storyboard).continues_scene  # the pipeline's own "continuing"
    return [0.0 if not goes_on else at_intro if segment.intros else memory_guidance
            for goes_on, segment in zip(continues, parse_storyboard(storyboard).segments, strict=True)]


def second_pass_segments(storyboard: dict, given: int = 0) -> list[int]:
    """The segments that `--second-pass` draws again: those whose text introduces no character (after the `given`
    leading segments). The introductions stay as the first pass drew them, clean context for the rest: memory then
    reads a finished look, as the 15-s training stage shows it one (segment 1 clean, the rest noisy), not one that is
    still noise at the steps where later segments settle their looks."""
    from pipeline.toyworld.text import parse_storyboard

    return [seg.index for seg in parse_storyboard(storyboard).segments if not seg.intros and seg.index >= given]


def story_generator(seed: int, index: int):
    """The noise of held-out story `index` (its place in name order): a stream of its own, derived from `seed`.
    Drawn from one generator seeded alike, every story of a reading would share its noise, and the reading would not
    be the independent draws its binomial standard error assumes (docs/results.md, "Segment 1 is not lost in long
    videos"). The same (seed, index) for every model and mode keeps the comparisons between them on the same noise."""
    import torch

    from pipeline.toyworld.dataset import story_seed

    return torch.Generator().manual_seed(story_seed(seed, index))


def sample_child(model: str, storyboards: Path, videos: Path, steps: int, guidance: float, seed: int,
                 mode: str = "joint", guidance_named: float | None = None, memory_guidance: float = 0.0,
                 memory_segments: str = "all", memory_intro: float | None = None,
                 memory_timesteps: tuple[int, int] | None = None, memory_baseline: str | None = None,
                 register: str = "story", second_pass: bool = False) -> None:
    """In the child process: render every storyboard, write OUT/.../timing.json (seconds per video, memory).
    recall: the ground truth's first segment (<id>.mp4 beside the storyboard) is given as clean context.
    register: the texts rendered from, the story's own (<id>.truth.json beside the storyboard) in that register; the
    story storyboard is copied beside the video for scoring, and places the guidance scales, in every register.
    guidance_named: see `segment_guidance`; memory_guidance, memory_segments, memory_intro: see `memory_scales`;
    memory_timesteps, memory_baseline: the pipeline's memory_guidance_timesteps and _baseline (None: its own).
    second_pass: after that pass, the segments `second_pass_segments` names are drawn again from new noise (the story's
    stream, drawn on) with every other segment of the first pass kept clean (the pipeline's `regenerate`)."""
    from pipeline import TTTVideoPipeline
    from pipeline.toyworld.dataset import load_truth, storyboard_dict
    from pipeline.video_io import read_video, write_video

    pipe = TTTVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    videos.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for index, path in enumerate(sorted(storyboards.glob("*.storyboard.json"))):
        story_id = path.name[: -len(".storyboard.json")]
        given = None
        if mode == "recall":
            truth, _ = read_video(path.with_name(f"{story_id}.mp4"))
            given = truth[: pipe.num_frames(1)]  # (F_1, H, W, 3) uint8: segment 1
        started = time.perf_counter()
        storyboard = json.loads(path.read_text())
        scales = segment_guidance(storyboard, guidance, guidance_named)
        memory = memory_scales(storyboard, memory_guidance, memory_segments, memory_intro)
        rendered = path if register == "story" else storyboard_dict(
            load_truth(path.with_name(f"{story_id}.truth.json")), register)
        sampling = dict(num_inference_steps=steps, guidance_scale=scales, memory_guidance_scale=memory,
                        memory_guidance_segments="all",  # placed by memory_scales
                        memory_guidance_timesteps=memory_timesteps, memory_guidance_baseline=memory_baseline,
                        generator=story_generator(seed, index))
        redo = second_pass_segments(storyboard, given=0 if given is None else 1) if second_pass else []
        if redo:
            first = pipe(rendered, video=given, output_type="latent", **sampling)
            frames = pipe(rendered, video_latents=first.latents, regenerate=redo, output_type="np",
                          **sampling).frames[0]
        else:
            frames = pipe(rendered, video=given, output_type="np", **sampling).frames[0]
        seconds[story_id] = time.perf_counter() - started
        write_video(frames, videos / f"{story_id}.mp4", pipe.config.fps)
        shutil.copyfile(path, videos / path.name)
    timing = {"seconds": seconds, "loaded_rss_bytes": loaded_rss, "frames": int(frames.shape[0])}
    atomic_write_text(videos / "timing.json", json.dumps(timing, indent=1) + "\n")


def sample_variant(args: argparse.Namespace, model: Path, storyboards: Path, videos: Path, mode: str) -> dict:
    """Renders in a child process; returns its timing plus its peak resident memory (bytes)."""
    command = [sys.executable, __file__, "--sample", str(model), str(storyboards), str(videos), mode,
               "--inference-steps", str(args.inference_steps), "--guidance", str(guidance_for(args, model)),
               "--seed", str(args.seed), "--register", args.register]
    if args.guidance_named is not None:
        command += ["--guidance-named", str(args.guidance_named)]
    memory, where, baseline = memory_for(args, model)
    if memory:
        command += ["--memory-guidance", str(memory), "--memory-segments", where, "--memory-baseline", baseline]
    if args.memory_intro is not None:
        command += ["--memory-intro", str(args.memory_intro)]
    if args.memory_timesteps is not None:
        command += ["--memory-timesteps", ",".join(map(str, args.memory_timesteps))]
    if args.second_pass:
        command.append("--second-pass")
    log = args.out / "logs" / f"sample-{videos.parent.name}-{mode}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        child = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"sampling with {model} failed ({child.returncode}); see {log}")
    timing = json.loads((videos / "timing.json").read_text())
    timing["peak_rss_bytes"] = usage.ru_maxrss * 1024
    timing["settings"] = sampling_settings(args, model, mode)
    atomic_write_text(videos / "timing.json", json.dumps(timing, indent=1) + "\n")
    return timing


def guidance_for(args: argparse.Namespace, model: Path) -> float:
    """--guidance, or the model's own scale."""
    from pipeline.pipeline_ttt_video import saved_guidance_scale

    return args.guidance if args.guidance is not None else saved_guidance_scale(model)


def memory_for(args: argparse.Namespace, model: Path) -> tuple[float, str, str]:
    """--memory-guidance, --memory-segments and --memory-baseline, or the model's own where not given."""
    from pipeline.pipeline_ttt_video import saved_memory_guidance

    scale, where, baseline = saved_memory_guidance(model)
    return (scale if args.memory_guidance is None else args.memory_guidance,
            where if args.memory_segments is None else args.memory_segments,
            baseline if args.memory_baseline is None else args.memory_baseline)


def sampling_settings(args: argparse.Namespace, model: Path, mode: str) -> dict:
    settings = {"model": str(model), "stories": args.stories, "inference_steps": args.inference_steps,
                "guidance": guidance_for(args, model), "seed": args.seed, "noise": "per story"}
    if args.guidance_named is not None:  # absent otherwise: earlier runs' renders stay valid
        settings["guidance_named"] = args.guidance_named
    memory, where, baseline = memory_for(args, model)
    if memory:  # likewise
        settings["memory_guidance"] = memory
        settings["memory_segments"] = where
        settings["memory_baseline"] = baseline
    if args.memory_intro is not None:  # likewise
        settings["memory_intro"] = args.memory_intro
    if args.memory_timesteps is not None:  # likewise
        settings["memory_timesteps"] = list(args.memory_timesteps)
    if args.register != "story":  # likewise
        settings["register"] = args.register
    if args.second_pass:  # likewise
        settings["second_pass"] = True
    return settings if mode == "joint" else {**settings, "mode": mode}  # joint renders of earlier runs stay valid


def earlier_samples(args: argparse.Namespace, model: Path, videos: Path, mode: str) -> dict | None:
    """The timing of an earlier run's videos in `videos` when they were made with the same settings, else None."""
    try:
        timing = json.loads((videos / "timing.json").read_text())
    except (OSError, ValueError):
        return None
    if timing.get("settings") != sampling_settings(args, model, mode):
        return None
    if len(list(videos.glob("*.mp4"))) != args.stories:
        return None
    return timing


def reconstruct(vae_dir: str, storyboards: Path, videos: Path, count: int) -> None:
    """The first `count` held-out videos through the VAE (encode, decode the posterior mean): the transformer's
    ceiling. Done ones are kept."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from pipeline.toyworld.dataset import story_videos
    from pipeline.video_io import read_video, write_video

    vae = AutoencoderKLCogVideoX.from_pretrained(vae_dir).eval()
    videos.mkdir(parents=True, exist_ok=True)
    for path in story_videos(storyboards)[:count]:
        if (videos / path.name).is_file() and (videos / f"{path.stem}.storyboard.json").is_file():
            continue
        frames, fps = read_video(path)
        pixels = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1.0  # (1, 3, F, H, W)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample[0]  # (3, F, H, W)
        decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        write_video(np.ascontiguousarray(decoded), videos / path.name, fps)
        shutil.copyfile(path.with_name(path.stem + ".storyboard.json"), videos / f"{path.stem}.storyboard.json")


def score(videos: Path, given: int = 0) -> dict:
    """The toy world's summary of a folder of videos; given: leading segments that were given, not generated (recall
    mode's segment 1), which no check counts."""
    from pipeline.toyworld import summarize
    from pipeline.toyworld.dataset import score_folder

    return summarize([r for _, r in score_folder(videos, progress=False)], given=given)


def row(name: str, summary: dict, timing: dict | None) -> dict:
    by_segment, after_intro = summary["identity_by_segment"], summary["identity_recall_by_segment"]
    out = {"variant": name, "videos": summary["videos"],
           **{f"identity@{s}": by_segment[s - 1] if s <= len(by_segment) else float("nan")
              for s in REPORTED_SEGMENTS},
           **{f"after_intro@{s}": after_intro[s - 1] if s <= len(after_intro) else float("nan")
              for s in REPORTED_SEGMENTS},
           **{k: summary[k] for k in ("identity", "identity_intro", "identity_recall", "consistency", "background",
                                      "background_recall", "motion", "presence", "color", "color_intro",
                                      "color_recall", "shape", "size", "continuity", "continuity_inside")}}
    if timing is not None:
        seconds = list(timing["seconds"].values())
        out.update(seconds_per_video=sum(seconds) / len(seconds), peak_rss_gib=timing["peak_rss_bytes"] / 2**30,
                   loaded_rss_gib=timing["loaded_rss_bytes"] / 2**30, frames=timing["frames"])
    return out


def markdown(rows: list[dict], chance: dict) -> str:
    def pct(v: float) -> str:
        return "-" if v != v else f"{100 * v:.1f}"

    head = ("| variant (mode) | identity at intro | " + " | ".join(f"after intro @{s}" for s in REPORTED_SEGMENTS)
            + " | after intro (all) | identity (all) | colour at intro | colour after intro | background"
            " | backdrop after scene start | action | in place after a boundary (mid-segment) | s / 60-s video"
            " | peak RSS GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        timing = (f"{r['seconds_per_video']:.1f} | {r['peak_rss_gib']:.2f}" if "seconds_per_video" in r else "- | -")
        lines.append(f"| {r['variant']} | {pct(r['identity_intro'])} | "
                     + " | ".join(pct(r[f'after_intro@{s}']) for s in REPORTED_SEGMENTS)
                     + f" | {pct(r['identity_recall'])} | {pct(r['identity'])} | {pct(r['color_intro'])} | "
                     f"{pct(r['color_recall'])} | {pct(r['background'])} | "
                     f"{pct(r['background_recall'])} | {pct(r['motion'])} | {pct(r['continuity'])} "
                     f"({pct(r['continuity_inside'])}) | {timing} |")
    lines.append(f"| chance | {' | '.join([pct(chance['identity'])] * (len(REPORTED_SEGMENTS) + 3))} | "
                 f"{pct(chance['color_intro'])} | {pct(chance['color_recall'])} | {pct(chance['background'])} | "
                 f"{pct(chance['background_recall'])} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sample:
        model, storyboards, videos, mode = args.sample
        sample_child(model, Path(storyboards), Path(videos), args.inference_steps, args.guidance, args.seed, mode,
                     args.guidance_named, args.memory_guidance or 0.0, args.memory_segments or "all", args.memory_intro,
                     args.memory_timesteps, args.memory_baseline, args.register, args.second_pass)
        return 0
    if not (Path(args.base) / "model_index.json").is_file():
        print(f"error: --base {args.base}: no pipeline; run scripts/train_default_model.sh (steps 1-5) first",
              file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = held_out_stories(args.out, args.stories)
    rows, summaries = [], {}

    summary = score(heldout)
    rows.append(row("ground truth (rendered)", summary, None))
    recon = args.out / "reconstruction" / "videos"
    if args.ceiling_stories:
        reconstruct(args.vae or str(Path(args.base) / "vae"), heldout, recon, args.ceiling_stories)
    if any(recon.glob("*.mp4")):  # --ceiling-stories 0 and none from an earlier run: no ceiling row
        summaries["VAE reconstruction"] = score(recon)
        rows.append(row("VAE reconstruction (ceiling)", summaries["VAE reconstruction"], None))

    for variant in args.variants:
        print(f"{variant}:", flush=True)
        model = Path(args.trained[variant]) if variant in args.trained else train_variant(args, variant)
        for mode in args.modes:
            videos = args.out / variant / ("videos" if mode == "joint" else f"videos-{mode}")
            timing = None if args.resample else earlier_samples(args, model, videos, mode)
            if timing is None:
                shutil.rmtree(videos, ignore_errors=True)
                timing = sample_variant(args, model, heldout, videos, mode)
            else:
                print(f"  reusing the videos in {videos} (same model and settings; --resample to redo them)",
                      flush=True)
            name = f"{variant} ({mode})"
            summaries[name] = score(videos, given=1 if mode == "recall" else 0)
            rows.append(row(name, summaries[name], timing))
            print(f"  {mode}: identity at intro {100 * summaries[name]['identity_intro']:.1f}%, after intro "
                  f"{100 * summaries[name]['identity_recall']:.1f}%; colour at intro "
                  f"{100 * summaries[name]['color_intro']:.1f}%, after intro "
                  f"{100 * summaries[name]['color_recall']:.1f}%; {rows[-1]['seconds_per_video']:.1f} s per video, "
                  f"peak {rows[-1]['peak_rss_gib']:.2f} GiB", flush=True)

    from pipeline.toyworld.report import plot_identity

    plot = plot_identity(summaries, args.out / "identity_by_segment.png")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "sample"}
    results = {"settings": settings, "rows": rows, "chance": summary["chance"], "summaries": summaries}
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    print(markdown(rows, summary["chance"]))
    print(f"\nresults: {args.out / 'results.json'}; plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
