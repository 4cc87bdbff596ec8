"""Can a model draw a character that comes in while another is on stage? Held-out toy stories cut after such a segment.

    python benchmarks/bench_two_characters.py MODEL [MODEL ...] [--stories 200] [--within 6] [--register dense]
        [--folder DIR] [--memory-guidance M] [--memory-intro M] [--compose] [--after K] [--told-gain T,T,...]
        [--tell newcomer|story]

For each held-out 20-segment story (the long-range benchmark's seed, made on first use in OUT/heldout) the first
segment among its first --within that brings in a character beside one already on stage; the story up to that segment
is sampled in joint mode and that segment is scored: the newcomer and the others on stage, each on screen, colour,
shape, size and identity, and whether all of them are right; a second table says what became of the newcomers (`fate`:
drawn right, in the wrong shape or size, in another's colour, ..., not found). In the dense register (the default)
every text names the backdrop and describes everyone on stage, so nothing needs memory: this measures drawing two
characters at once, which the toy world's introductions inside a scene need (docs/results.md, "Recall mode scored the
segment it was given"); the story register is what users write. DPM-solver, 20 steps, each model's own guidance, seed
1000, as bench_first_segments.py. --folder DIR searches a dataset folder's stories instead, such as the training set's:
the gap between the two is what a model learnt by heart. --memory-intro M sets memory guidance on the segments that
introduce someone (the scored one) apart from the rest; --compose guides the scored segment by one part of its text
per character on stage (the pipeline's segment_parts, docs/sampling.md); --after K samples K more segments after the
scored one, as a longer video would.

--told-gain T,T,... samples nothing: it reads the training loss on the newcomer's pixels of its segment at noise levels
T (the story's true renders, earlier segments clean, the same noise from --seed for every model) with the dense text
telling its look and telling another look (`told_gains`). The difference, the told gain, is how much the drawing of the
newcomer follows its text, without the sampling noise that spreads this benchmark's readings by up to 18 points between
seeds; it is read beside another character and, for contrast, for a character brought in alone (after segment 1, as the
newcomers). --tell newcomer cuts the newcomer's segment text to what it says of the newcomer, --tell story puts its
story text there (`told_text`), in the told gain and in the dense texts sampled: beside another character, what is
left of the gap with the newcomer alone described is the other's pixels, not its description.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_first_segments import (  # noqa: E402
    add_model_arguments,
    check_models,
    first_segments,
    rendered,
    standard_error,
)
from bench_long_range import scale  # noqa: E402
from bench_memory import parse_timesteps  # noqa: E402

REGISTERS = ("dense", "story")
TELLS = ("all", "newcomer", "story")  # what the dense text of the newcomer's segment says (`told_text`)
CHECKS = ("present", "color_ok", "shape_ok", "size_ok", "identity_ok")
# what became of a newcomer (`fate`), in the order of the second table
FATES = ("right", "its colour, wrong shape or size", "another's colour", "a colour no one has",
         "found as another", "not found")


@dataclass
class Case:
    """One story with a newcomer beside another character in segment `segment` (the first such), cut after it or
    some segments later (`cases`' after)."""

    story_id: str
    segment: int
    storyboard: dict  # the story register, cut: what is scored
    texts: list[str]  # the texts sampled, one per segment of the cut storyboard


def newcomer_segment(storyboard: dict, within: int) -> int | None:
    """The index of the first segment among the first `within` that introduces a character while another is on
    stage (None if there is none)."""
    from pipeline.toyworld.text import parse_storyboard

    for seg in parse_storyboard(storyboard).segments[:within]:
        if seg.intros and len(seg.on_stage()) > len(seg.intros):
            return seg.index
    return None


def fate(newcomer, others) -> str:
    """What became of a newcomer (a scored `CharacterResult`) beside `others` (the rest on stage), one of FATES: drawn
    right; drawn in its colour with the wrong shape or size; drawn in the colour of one of the others (the texts'
    looks mixed up); in a colour no one on stage has; not found while one of the others was found in the
    newcomer's colour (the tracker follows a colour from where each character was, so a newcomer drawn where the
    other stood and the other gone reads so); or not found at all (not drawn, or drawn too small)."""
    if newcomer.identity_ok:
        return "right"
    if newcomer.present:
        if newcomer.color_ok:
            return "its colour, wrong shape or size"
        taken = {o.expected.color for o in others}
        return "another's colour" if newcomer.observed.color in taken else "a colour no one has"
    if any(o.observed is not None and o.observed.color == newcomer.expected.color for o in others):
        return "found as another"
    return "not found"


def cases(folder: Path, within: int, register: str, after: int = 0, tell: str = "all") -> list[Case]:
    """The stories of `folder` with a newcomer beside another within their first `within` segments, each cut `after`
    segments after that one (the segment scored stays the newcomer's). tell (dense register): what the scored
    segment's text says (`told_text` of its first newcomer)."""
    from pipeline.toyworld.dataset import load_truth
    from pipeline.toyworld.text import parse_storyboard

    found = []
    for path in sorted(folder.glob("*.storyboard.json")):
        story_id = path.name[: -len(".storyboard.json")]
        storyboard = json.loads(path.read_text())
        segment = newcomer_segment(storyboard, within)
        if segment is None:
            continue
        cut = first_segments(storyboard, segment + 1 + after)
        if register == "dense":
            truth = load_truth(folder / f"{story_id}.truth.json")
            truth = told_text(truth, segment, next(iter(parse_storyboard(storyboard).segments[segment].intros)), tell)
            texts = [seg.dense_text for seg in truth.segments[: segment + 1 + after]]
        else:
            texts = [s["text"] for scene in cut["scenes"] for s in scene["segments"]]
        found.append(Case(story_id, segment, cut, texts))
    return found


def with_texts(storyboard: dict, texts: list[str]) -> dict:
    """The storyboard with its segments' texts replaced, in order."""
    given = iter(texts)
    return {**storyboard, "scenes": [{**scene, "segments": [{**s, "text": next(given)} for s in scene["segments"]]}
                                     for scene in storyboard["scenes"]]}


def composed_parts(case: Case) -> list[list[str] | None]:
    """segment_parts for a case: the scored segment's text split into one part per character on stage (each drawn
    alone, the pipeline's composed guidance); every other segment as it is."""
    from pipeline.toyworld.text import character_parts, parse_storyboard

    names = parse_storyboard(case.storyboard).segments[case.segment].on_stage()
    parts: list[list[str] | None] = [None] * len(case.texts)
    parts[case.segment] = character_parts(case.texts[case.segment], names) or None
    return parts


def intro_scales(model: str, found: list[Case], memory_guidance: float | None, intro: float) -> list[list[float]]:
    """--memory-intro: per case, one memory guidance scale per segment: `memory_guidance` (None: the model's own) on
    the segments that continue a scene, `intro` on those among them that introduce a character, 0 elsewhere."""
    from bench_long_range import memory_scales

    from pipeline.pipeline_ttt_video import saved_memory_guidance

    scale = saved_memory_guidance(model)[0] if memory_guidance is None else memory_guidance
    return [memory_scales(case.storyboard, scale, "continuing", intro) for case in found]


def evaluate(model: str, found: list[Case], steps: int, guidance: float | None, seed: int,
             memory_guidance: float | None = None, compose: bool = False, memory_intro: float | None = None) -> dict:
    """Rates (0-1) over the cases: newcomer_<check>, other_<check> (every other character on stage), both (everyone
    on stage right), the counts, and fates: how many newcomers came to each of FATES. compose: the scored segment is
    guided by one part per character (`composed_parts`); memory_intro: see `intro_scales`."""
    import numpy as np

    from pipeline.toyworld import score_video

    newcomers, others, both = [], [], []
    fates = dict.fromkeys(FATES, 0)
    sampled = [with_texts(case.storyboard, case.texts) for case in found]
    parts = [composed_parts(case) for case in found] if compose else None
    if memory_intro is not None:
        memory_guidance = intro_scales(model, found, memory_guidance, memory_intro)
    for case, frames in zip(found, rendered(model, sampled, steps, guidance, seed, memory_guidance, parts)):
        characters = score_video(frames, case.storyboard).segments[case.segment].characters
        for c in characters:
            (newcomers if c.introduced_here else others).append([getattr(c, k) for k in CHECKS])
            if c.introduced_here:
                fates[fate(c, [o for o in characters if not o.introduced_here])] += 1
        both.append(all(c.identity_ok for c in characters))
    rates = {f"newcomer_{k}": float(np.mean([r[i] for r in newcomers])) for i, k in enumerate(CHECKS)}
    rates.update({f"other_{k}": float(np.mean([r[i] for r in others])) for i, k in enumerate(CHECKS)})
    return {**rates, "both": float(np.mean(both)), "segments": len(both), "newcomers": len(newcomers),
            "others": len(others), "fates": fates}


# --told-gain: how much the drawing of a newcomer heeds its text, read from the training loss instead of samples

GROUPS = ("beside another", "alone")


def alone_segment(storyboard: dict, within: int) -> int | None:
    """The index of the first segment after the first and among the first `within` that introduces one character
    with no one else on stage (None if there is none): like a newcomer beside another, never segment 1."""
    from pipeline.toyworld.text import parse_storyboard

    for seg in parse_storyboard(storyboard).segments[1:within]:
        if len(seg.intros) == 1 and seg.on_stage() == list(seg.intros):
            return seg.index
    return None


def text_probes(folder: Path, within: int) -> list[dict]:
    """--told-gain's probes: per story of `folder`, its first newcomer beside another (`newcomer_segment`) and its
    first character brought in alone (`alone_segment`), each {story, segment, character, beside}."""
    from pipeline.toyworld.text import parse_storyboard

    found = []
    for path in sorted(folder.glob("*.storyboard.json")):
        storyboard = json.loads(path.read_text())
        segments = parse_storyboard(storyboard).segments
        for beside, find in ((True, newcomer_segment), (False, alone_segment)):
            segment = find(storyboard, within)
            if segment is not None:
                found.append({"story": path.name[: -len(".storyboard.json")], "segment": segment,
                              "character": next(iter(segments[segment].intros)), "beside": beside})
    return found


def told_text(story, segment: int, character: str, tell: str):
    """The story with segment `segment`'s dense text as `tell` says (TELLS): "all" keeps it; "newcomer" cuts it to
    what it says of `character` and of no one (the backdrop, the camera, its entry of the "On stage:" list, its own
    sentences: its part in composed guidance), so that no other character on stage is described there (a text that
    names no one else stays as it is); "story" puts the segment's story text there (what users write: `character`
    described, the others only named when they act)."""
    from pipeline.toyworld.text import character_parts

    if tell not in TELLS:
        raise ValueError(f"tell: expected one of {', '.join(TELLS)}, got {tell!r}")
    if tell == "all":
        return story
    old = story.segments[segment]
    if tell == "story":
        text = old.text
    else:
        parts = character_parts(old.dense_text, [character, *(n for n in story.cast if n != character)])
        text = parts[1] if parts else old.dense_text
    segments = list(story.segments)
    segments[segment] = replace(old, dense_text=text)
    return replace(story, segments=segments)


def told_gains(pipe, folder: Path, probes: list[dict], timesteps: list[int], seed: int = 0,
               progress: bool = True, tell: str = "all") -> list[dict]:
    """Per probe, the training objective's loss on the newcomer's latent elements of its segment s (the story's true
    renders cut after s; segments 1..s-1 clean, s noised at each timestep with the same noise for every model; every
    text dense) with s's text telling the newcomer's true look ("true") and another look ("swapped":
    bench_memory.swapped_look, colour and shape; the frames untouched). swapped - true, the told gain, is how far the
    drawing of the newcomer follows what its text says, with no sampling noise; beside another character against
    alone is the drawer's gap. tell: what s's text says (`told_text`, both looks); "newcomer" describes it alone, so
    that beside another the gap splits into what the other's description costs and what its pixels cost."""
    from bench_memory import MemoryProbe, character_mask, swapped_story
    from tqdm.auto import tqdm

    from pipeline.toyworld.dataset import load_truth
    from pipeline.toyworld.render import render_story

    probe = MemoryProbe(pipe, timesteps, seed)
    rows = []
    for p in tqdm(probes, desc="probes", unit="probe", disable=not progress):
        story = load_truth(folder / f"{p['story']}.truth.json")
        story = replace(story, segments=story.segments[: p["segment"] + 1])  # what comes after is never read
        other = swapped_story(story, p["character"])
        frames = render_story(story, probe.size)
        mask = character_mask(frames, render_story(other, probe.size), p["segment"], pipe.vae_scale_factor_temporal,
                              pipe.vae_scale_factor_spatial)
        latents, starts = probe.encode_frames(story, frames)
        story, other = (told_text(s, p["segment"], p["character"], tell) for s in (story, other))
        told, mistold = ((latents, *probe.encode_dense_text(s), starts) for s in (story, other))
        rows.append({**p, "character_elements": int(mask.sum()),
                     **probe.gain(told, mistold, p["segment"], mask)})
    return rows


def told_gain_table(summaries: dict[str, list[dict]]) -> str:
    lines = ["| model | newcomer (probes) | t | loss, its look told | told gain (another look told - its own) | "
             "+- s.e. | gain > 0 |", "|---|---|---|---|---|---|---|"]
    for model, rows in summaries.items():
        for r in rows:
            if r["region"] == "character":
                lines.append(f"| {model} | {r['group']} ({r['probes']}) | {r['timestep']} | {r['loss_true']:.4f} | "
                             f"{r['gain']:+.5f} | {r['gain_se']:.5f} | {100 * r['positive']:.0f}% |")
    return "\n".join(lines)


def paired_told_gains(first: list[dict], rows: list[dict], timesteps: list[int]) -> list[dict]:
    """The told gain of `rows` minus that of `first` (the same probes, another model), per group and timestep: the
    mean paired difference and its standard error."""
    from bench_memory import mean_and_se

    out = []
    for group in ("all", *GROUPS):
        pairs = [(a, b) for a, b in zip(first, rows) if group == "all" or a["beside"] == (group == GROUPS[0])]
        for i, t in enumerate(timesteps):
            diffs = [(b["swapped"]["character"][i] - b["true"]["character"][i])
                     - (a["swapped"]["character"][i] - a["true"]["character"][i]) for a, b in pairs]
            if not diffs:
                continue
            mean, se = mean_and_se(diffs)
            out.append({"group": group, "timestep": t, "probes": len(diffs), "difference": mean, "se": se})
    return out


def told_gain_main(args, folder: Path, searched: int) -> int:
    """--told-gain: the table of `told_gains` per model over `text_probes`, each model's told gain against the
    first's (paired), and the rows in --json."""
    from bench_memory import summarize

    from pipeline import TTTVideoPipeline

    found = text_probes(folder, args.within)
    counts = {g: sum(p["beside"] == (g == GROUPS[0]) for p in found) for g in GROUPS}
    if not counts[GROUPS[0]]:
        print(f"bench_two_characters: none of {searched} stories brings in a character beside another within "
              f"its first {args.within} segments; ask for a larger --within", file=sys.stderr)
        return 1
    print(f"{searched} stories ({folder}), within their first {args.within} segments: {counts[GROUPS[0]]} newcomers "
          f"beside another character, {counts[GROUPS[1]]} brought in alone; the loss on the newcomer (dense texts, "
          "earlier segments clean):\n")
    results, summaries = {}, {}
    for model in args.models:
        pipe = TTTVideoPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        rows = told_gains(pipe, folder, found, args.told_gain, args.seed, tell=args.tell)
        summaries[model] = summarize(rows, args.told_gain, "beside", GROUPS)
        results[model] = {"summary": summaries[model], "rows": rows}
    print(told_gain_table(summaries))
    first = args.models[0]
    for model in args.models[1:]:
        results[model]["against_first"] = paired_told_gains(results[first]["rows"], results[model]["rows"],
                                                            args.told_gain)
    if len(args.models) > 1:
        print(f"\nThe told gain against {first}'s, paired per probe:\n\n| model | newcomer (probes) | t | difference | "
              "+- s.e. |\n|---|---|---|---|---|")
        for model in args.models[1:]:
            for r in results[model]["against_first"]:
                print(f"| {model} | {r['group']} ({r['probes']}) | {r['timestep']} | {r['difference']:+.5f} | "
                      f"{r['se']:.5f} |")
    if args.json:
        from pipeline.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                 "results": results}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--stories", type=int, default=200, help="held-out stories to search (default 200)")
    p.add_argument("--within", type=int, default=6, help="look for the segment among each story's first N (default 6)")
    p.add_argument("--register", choices=REGISTERS, default="dense",
                   help="texts to sample from: dense (everyone on stage described) or story (what users write)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_two_characters",
                   help="where the held-out stories are (or are made)")
    p.add_argument("--after", type=int, default=0, metavar="K",
                   help="cut each story K segments after the newcomer's (still the one scored): what the segments "
                        "that follow do to it (default 0)")
    p.add_argument("--compose", action="store_true",
                   help="guide the scored segment by one part of its text per character on stage, each drawn alone "
                        "(the pipeline's segment_parts), instead of by its whole text")
    p.add_argument("--memory-intro", type=scale, default=None, metavar="M",
                   help="memory guidance M on the segments that introduce a character within a scene (the scored one "
                        "among them), --memory-guidance (default the model's own) on the other segments that "
                        "continue a scene, none on a scene's first")
    p.add_argument("--json", type=Path, help="also write every model's rates to this JSON file")
    p.add_argument("--folder", type=Path,
                   help="search every story of this toy-world dataset folder instead of the held-out ones (the "
                        "training set's: how much of what the model draws there it learnt by heart); --stories is "
                        "then unused")
    p.add_argument("--told-gain", type=lambda text: parse_timesteps(text, "--told-gain"), metavar="T,T,...",
                   help="sample nothing: read at these noise levels how far the training loss on each newcomer "
                        "follows what its dense text says (its look told against another look), beside another "
                        "character and brought in alone (`told_gains`)")
    p.add_argument("--tell", choices=TELLS, default="all",
                   help="what the dense text of the newcomer's segment says: everyone on stage described (all, the "
                        "default), the newcomer alone (newcomer: what another's description costs) or its story text "
                        "(story: the newcomer described, the others named; `told_text`)")
    args = p.parse_args(argv)
    if args.tell != "all" and args.register != "dense":
        p.error("--tell: only with dense texts (a story text describes no one but a newcomer already)")
    if args.tell != "all" and args.compose:
        p.error("--tell: not with --compose (composed guidance splits the whole text of the newcomer's segment)")
    if args.told_gain is not None:
        given = [flag for flag, on in (("--compose", args.compose), ("--memory-intro", args.memory_intro is not None),
                                       ("--after", args.after), ("--register story", args.register == "story"),
                                       ("--memory-guidance", args.memory_guidance is not None),
                                       ("--guidance", args.guidance is not None),
                                       ("--inference-steps", args.inference_steps != p.get_default("inference_steps")))
                 if on]
        if given:
            p.error(f"--told-gain reads the loss from dense texts without sampling; it takes no {', '.join(given)}")
    if args.stories < 1 or args.within < 2:
        p.error("--stories must be at least 1 and --within at least 2 (segment 1 never has a newcomer beside another)")
    if args.after < 0:
        p.error(f"--after: expected a number of segments >= 0, got {args.after}")
    check_models(p, args.models)

    from bench_long_range import held_out_stories

    folder = args.folder if args.folder is not None else held_out_stories(args.out, args.stories)
    searched = len(list(folder.glob("*.storyboard.json")))
    if not searched:  # only a --folder can be empty: the held-out folder is made with --stories >= 1
        p.error(f"--folder: {folder} holds no <id>.storyboard.json; expected a folder written by "
                "`python -m pipeline.toyworld generate`")
    if args.told_gain is not None:
        return told_gain_main(args, folder, searched)
    found = cases(folder, args.within, args.register, args.after, args.tell)
    if not found:
        print(f"bench_two_characters: none of {searched} stories brings in a character beside another within "
              f"its first {args.within} segments; ask for a larger --within"
              + (" or more --stories" if args.folder is None else ""), file=sys.stderr)
        return 1
    print(f"{len(found)} of {searched} stories ({folder}) have a newcomer beside another character within their "
          f"first {args.within} segments ({args.register} texts); percent:\n")
    print("| model | newcomer on screen | colour | shape | size | identity | the others on screen | their identity "
          "| all right | its standard error | segments |\n|" + "---|" * 11)
    results = {}
    for model in args.models:
        r = results[model] = evaluate(model, found, args.inference_steps, args.guidance, args.seed,
                                      args.memory_guidance, args.compose, args.memory_intro)
        cells = [r[f"newcomer_{k}"] for k in CHECKS] + [r["other_present"], r["other_identity_ok"], r["both"]]
        print(f"| {model} | " + " | ".join(f"{100 * v:.1f}" for v in cells)
              + f" | {100 * standard_error(r['both'], r['segments']):.1f} | {r['segments']} |", flush=True)
    print("\nWhat became of the newcomers (percent of them):\n\n| model | " + " | ".join(FATES) + " |\n|"
          + "---|" * (len(FATES) + 1))
    for model, r in results.items():
        print(f"| {model} | " + " | ".join(f"{100 * r['fates'][k] / r['newcomers']:.1f}" for k in FATES) + " |")
    if args.json:
        from pipeline.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                 "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
