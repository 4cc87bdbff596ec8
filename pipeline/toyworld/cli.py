"""Command line of the toy world: `python -m pipeline.toyworld {generate,masks,captions,score,corrupt,show} ...`."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm


def _generate(args: argparse.Namespace) -> None:
    from .dataset import generate

    low, high = (args.segments, args.segments) if args.segments else (args.min_segments, args.max_segments)
    metadata = generate(args.out, args.stories, low, high, seed=args.seed, size=args.size)
    print(f"wrote {args.stories} stories to {metadata.parent} ({metadata.name}, <id>.mp4, <id>.mask.mp4, "
          "<id>.storyboard.json, <id>.truth.json)")


def _masks(args: argparse.Namespace) -> None:
    from .dataset import add_masks

    metadata = add_masks(args.data)
    print(f"wrote <id>.mask.mp4 for every story in {metadata.parent} and their \"mask\" fields into {metadata.name}")


def _captions(args: argparse.Namespace) -> None:
    from .dataset import relabel

    metadata = relabel(args.data)
    print(f"rewrote {metadata} with every caption register, from the stories' <id>.truth.json")


def _score(args: argparse.Namespace) -> None:
    from .checks import summarize
    from .dataset import score_folder
    from .report import format_table, plot_identity

    results = score_folder(args.videos, args.storyboards)
    summary = summarize([r for _, r in results], given=args.given)
    print(format_table(summary))
    _report_detection(results)
    if args.plot:
        print(f"plot: {plot_identity({args.label: summary}, args.plot)}")
    if args.json:
        from ..atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(_finite(summary), indent=1) + "\n")
        print(f"summary: {args.json}")


def _report_detection(results: list) -> None:
    """For videos made by 'corrupt' (an <id>.corruption.json beside them): how many deliberate errors were caught."""
    from .corrupt import detected

    flags: dict[str, list[bool]] = {}
    for path, result in results:
        record = path.with_name(path.stem + ".corruption.json")
        if record.is_file():
            info = json.loads(record.read_text(encoding="utf-8"))
            targets = [(int(i), name) for i, name in info["targets"]]
            flags.setdefault(info["kind"], []).extend(detected(result, info["check"], targets))
    for kind, caught in flags.items():
        if caught:
            print(f"corruption '{kind}': {sum(caught)} of {len(caught)} deliberate errors detected "
                  f"({100 * sum(caught) / len(caught):.1f}%)")


def _finite(value):
    """NaN (a segment index with nothing to count) as null, so that the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _corrupt(args: argparse.Namespace) -> None:
    from ..atomic import atomic_write_text
    from ..video_io import write_video
    from .corrupt import corrupt
    from .dataset import load_truth
    from .world import FPS

    data, out = Path(args.data), Path(args.out)
    truths = sorted(data.glob("*.truth.json"))
    if not truths:
        raise FileNotFoundError(f"{data}: no <id>.truth.json files; expected a folder made by 'generate'")
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, truth in enumerate(tqdm(truths, desc=args.kind, unit="story")):
        story_id = truth.name[: -len(".truth.json")]
        story = load_truth(truth)
        corruption = corrupt(story, args.kind, np.random.default_rng([args.seed, i]))
        if corruption is None:
            continue
        write_video(corruption.render(args.size), out / f"{story_id}.mp4", fps=FPS)
        shutil.copyfile(data / f"{story_id}.storyboard.json", out / f"{story_id}.storyboard.json")
        atomic_write_text(out / f"{story_id}.corruption.json", json.dumps(
            {"kind": corruption.kind, "check": corruption.check, "targets": corruption.targets}) + "\n")
        written += 1
    print(f"wrote {written} '{args.kind}' videos (of {len(truths)} stories) to {out}")


def _show(args: argparse.Namespace) -> None:
    from .dataset import load_truth, storyboard_dict
    from .render import render_story
    from .report import plot_story
    from .sampler import sample_story

    if args.video:
        _show_video(args)
        return
    if args.truth:
        story = load_truth(args.truth)
    else:
        story = sample_story(args.seed, args.segments or 1, args.segments or 21)
    frames = render_story(story, args.size)
    print(json.dumps(storyboard_dict(story), indent=1))
    print(f"frame strip: {plot_story(frames, [s.text for s in story.segments], args.out)}", file=sys.stderr)


def _show_video(args: argparse.Namespace) -> None:
    """The frame strip of a generated video, with the texts of its storyboard (the mp4's <id>.storyboard.json or
    --storyboard)."""
    from pipeline.storyboard import load_storyboard
    from pipeline.video_io import read_video

    from .report import plot_story

    video = Path(args.video)
    board = Path(args.storyboard) if args.storyboard else video.with_name(f"{video.stem}.storyboard.json")
    texts = [segment.text for segment in load_storyboard(board, max_segments=None).segments]
    if args.segments:  # the first N segments only
        texts = texts[:args.segments]
    frames, _ = read_video(video)
    frames = frames[:24 * len(texts) + 1]
    if len(frames) < 24 * len(texts) + 1:
        raise SystemExit(f"error: {video}: {len(frames)} frames, fewer than the {24 * len(texts) + 1} of the "
                         f"{len(texts)} segments in {board}")
    print(f"frame strip: {plot_story(frames, texts, args.out)}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.toyworld",
        description="Synthetic storyboard world: generate, masks, captions, score, corrupt, show.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample and render stories into a dataset folder")
    g.add_argument("--out", required=True, help="dataset folder to write")
    g.add_argument("--stories", type=int, required=True, help="number of stories")
    g.add_argument("--segments", type=int, help="segments per story (3 s each); or use --min/--max-segments")
    g.add_argument("--min-segments", type=int, default=1)
    g.add_argument("--max-segments", type=int, default=21)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int, default=64, help="frame height and width in pixels (even)")
    g.set_defaults(run=_generate)

    m = sub.add_parser("masks", help="add character-mask videos to a folder that 'generate' made without them")
    m.add_argument("--data", required=True, help="folder made by 'generate'")
    m.set_defaults(run=_masks)

    r = sub.add_parser("captions", help="rewrite a folder's metadata.jsonl with every caption register of today "
                       "(a folder generated before a register existed)")
    r.add_argument("--data", required=True, help="folder made by 'generate'")
    r.set_defaults(run=_captions)

    s = sub.add_parser("score", help="score videos against their storyboards")
    s.add_argument("--videos", required=True, help="folder of .mp4 files")
    s.add_argument("--storyboards", help="folder of <id>.storyboard.json or <id>.json (default: --videos)")
    s.add_argument("--plot", help="write identity accuracy by segment to this PNG")
    s.add_argument("--label", default="videos", help="legend label in the plot")
    s.add_argument("--json", help="write the summary (all numbers) to this JSON file")
    s.add_argument("--given", type=int, default=0, help="leading segments of every video that were given, not "
                   "generated (1 for videos sampled with a clean first segment): no check counts them")
    s.set_defaults(run=_score)

    c = sub.add_parser("corrupt", help="re-render a generated folder with a deliberate error or as a baseline")
    c.add_argument("--data", required=True, help="folder made by 'generate'")
    c.add_argument("--out", required=True, help="folder to write the corrupted videos and their storyboards")
    c.add_argument("--kind", required=True, choices=["color", "swap", "background", "reverse", "memoryless"])
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--size", type=int, default=64)
    c.set_defaults(run=_corrupt)

    v = sub.add_parser("show", help="print a story's storyboard and draw its frame strip")
    v.add_argument("--out", required=True, help="PNG to write")
    v.add_argument("--seed", type=int, default=0, help="story seed (sample_story's)")
    v.add_argument("--segments", type=int, help="segments (default: 1 to 21 at random); with --video: draw only the "
                   "first N")
    v.add_argument("--truth", help="draw this <id>.truth.json instead of sampling")
    v.add_argument("--video", help="draw this mp4 (e.g. a generated one) instead, with its storyboard's texts")
    v.add_argument("--storyboard", help="with --video: its storyboard (default: <video stem>.storyboard.json)")
    v.add_argument("--size", type=int, default=64)
    v.set_defaults(run=_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "given", 0) < 0:  # before any video is read
        print(f"error: --given: expected a number of segments >= 0, got {args.given}", file=sys.stderr)
        return 2
    if getattr(args, "segments", None) is not None and args.segments < 1:
        print("error: --segments: expected at least 1", file=sys.stderr)
        return 2
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
