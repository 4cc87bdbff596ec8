"""Two or more renders of the same toy-world stories, read against the first, character by character.

    python benchmarks/paired_readings.py outputs/e2e/j50-T10/linear/videos outputs/e2e/j50-mc4/linear/videos
    python benchmarks/paired_readings.py --given 1 A/linear/videos-recall B/linear/videos-recall   # recall mode

Each FOLDER holds mp4s and their storyboards (a `bench_long_range.py` run's `<variant>/videos`, or any folder
`python -m pipeline.toyworld score` reads). Every folder is scored with the toy world's checks (cached beside it in
scores.pkl, keyed by the videos' sizes and times), and each check is a set of items: a (story, segment, character)
or, for the backdrop, a (story, segment). A folder's rate counts its own items; the difference against the first
folder counts the items both have, with the standard error of the mean paired difference. Items of one story are not
independent, so that standard error reads somewhat small. Readings (percent):

    identity at intro      the whole look (colour, shape, size) in the segment that introduces the character
    identity at intro (alone / beside another)
                           the same, split by who else is on stage there: in the long-range benchmark's 50 held-out
                           stories a scene's first segment introduces its one character (78), a later segment brings a
                           newcomer in beside whoever is there (25); the bundled model draws 9 of 50 of those right over
                           two seeds, 2 of 50 without memory guidance (docs/results.md)
    colour at intro        its colour there
    colour after intro     the colour in later segments (memory)
    colour after intro (alone / beside another)
                           the same, split as the introductions by who else is on stage in that later segment: told
                           every look (dense texts), the bundled model draws a character alone 91% in the right colour,
                           one beside another 38% (docs/results.md, "Where the looks are lost")
    shape after intro      the shape there (of three: a third by chance)
    identity after intro   the whole look there
    identity after intro (alone / beside another)
                           the same split: told, 61.0% alone and 14.4% beside another
    drawn big after intro  of the characters found after their introduction, the share drawn big (of their looks,
                           47% are big in the long-range benchmark's 50 held-out stories)
    size after (big/small) the size right after the introduction, for characters whose look is big / small
    backdrop after start   the backdrop in a scene's later segments (memory of the scene)
    in place at boundary   still within 0.2 of the frame 4 frames after a boundary inside a scene (`continuity`)
    in place (drawn small / big)
                           in place at boundary, of the characters drawn small / big in the later segment: big
                           blobs stay in place more often (the bundled model: 51% against 39%), so a change
                           that draws characters big reads as keeping them in place; these two readings tell
    in place mid-segment   the same characters over 4 frames mid-segment (`continuity_inside`)
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.atomic import atomic_path  # noqa: E402  (after the path insert)

READINGS = ("identity at intro", "identity at intro (alone)", "identity at intro (beside another)", "colour at intro",
            "colour after intro", "colour after intro (alone)", "colour after intro (beside another)",
            "shape after intro", "identity after intro", "identity after intro (alone)",
            "identity after intro (beside another)",
            "drawn big after intro", "size after (big)", "size after (small)", "backdrop after start",
            "in place at boundary", "in place (drawn small)", "in place (drawn big)", "in place mid-segment")


def items(results: list, given: int = 0) -> dict[str, dict[tuple, bool]]:
    """Per reading, {item: right} over scored videos ((path, VideoResult) pairs of `score_folder`). given: how many
    leading segments of every video were given rather than generated (recall mode: 1); they hold no item, while the
    characters and scenes they introduce are read after them."""
    out: dict[str, dict[tuple, bool]] = {name: {} for name in READINGS}
    for path, video in results:
        story = path.stem
        seen = set()
        for seg in video.segments:
            if seg.index < given:
                seen.add(seg.scene)
                continue
            if seg.scene in seen:
                out["backdrop after start"][story, seg.index] = seg.background_ok
            seen.add(seg.scene)
            company = "alone" if len(seg.characters) == 1 else "beside another"
            for c in seg.characters:
                key = (story, seg.index, c.name)
                if c.introduced_here:
                    out["identity at intro"][key] = c.identity_ok
                    out[f"identity at intro ({company})"][key] = c.identity_ok
                    out["colour at intro"][key] = c.color_ok
                else:
                    out["colour after intro"][key] = c.color_ok
                    out[f"colour after intro ({company})"][key] = c.color_ok
                    out["shape after intro"][key] = c.shape_ok
                    out["identity after intro"][key] = c.identity_ok
                    out[f"identity after intro ({company})"][key] = c.identity_ok
                    out[f"size after ({c.expected.size})"][key] = c.size_ok
                    if c.observed is not None:
                        out["drawn big after intro"][key] = c.observed.size == "big"
                if c.continuous is not None:
                    out["in place at boundary"][key] = c.continuous
                    if c.observed is not None:
                        out[f"in place (drawn {c.observed.size})"][key] = c.continuous
                    out["in place mid-segment"][key] = c.continuous_inside
    return out


def scored(folder: Path) -> list:
    """score_folder(folder), cached in folder/scores.pkl while the videos stay as they were."""
    from pipeline.toyworld.dataset import score_folder, story_videos

    stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in story_videos(folder))
    cache = folder / "scores.pkl"
    if cache.is_file():
        saved = pickle.loads(cache.read_bytes())
        if saved.get("stamp") == stamp:
            return saved["results"]
    results = score_folder(folder, progress=False)
    with atomic_path(cache) as tmp:
        Path(tmp).write_bytes(pickle.dumps({"stamp": stamp, "results": results}))
    return results


def paired(base: dict[tuple, bool], other: dict[tuple, bool]) -> tuple[float, float, int]:
    """Mean of other - base over the items both have (percent), its standard error, and their count."""
    keys = sorted(set(base) & set(other))
    if not keys:
        return float("nan"), float("nan"), 0
    diffs = [float(other[k]) - float(base[k]) for k in keys]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else float("nan")
    return 100 * mean, 100 * (var / len(diffs)) ** 0.5, len(keys)


def rate(values: dict[tuple, bool]) -> float:
    return 100 * sum(values.values()) / len(values) if values else float("nan")


def table(names: list[str], readings: list[dict[str, dict[tuple, bool]]]) -> str:
    """A Markdown table: each folder's rate (items), and for the second on the difference against the first."""
    head = "| reading | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    for name in READINGS:
        cells = [f"{rate(readings[0][name]):.1f} ({len(readings[0][name])})"]
        for other in readings[1:]:
            diff, error, _ = paired(readings[0][name], other[name])
            cells.append(f"{rate(other[name]):.1f} ({len(other[name])}), {diff:+.1f} ± {error:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="folders of videos and storyboards; the first is the base")
    p.add_argument("--given", type=int, default=0, metavar="N",
                   help="leading segments of every video that were given, not generated, and so not read (a "
                   "`bench_long_range.py --modes recall` run's videos-recall: 1)")
    args = p.parse_args(argv)
    if args.given < 0:
        p.error(f"--given: expected a number of segments >= 0, got {args.given}")
    if len(args.folders) < 2:
        p.error("expected at least two folders: the base and one to read against it")
    for folder in args.folders:
        if not folder.is_dir():
            p.error(f"{folder}: no such folder")
    try:
        readings = [items(scored(folder), args.given) for folder in args.folders]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table([str(f) for f in args.folders], readings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
