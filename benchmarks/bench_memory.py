"""Does a model use what earlier segments showed? The memory gain: the loss on a later segment with its true clean
context against the same segment with a counterfactual context in which one character looks different.

    python benchmarks/bench_memory.py NAME=MODEL [NAME=MODEL ...] [--stories 20] [--timesteps 500,800,950]
        [--swap look|shape|colour] [--caption text|unshaped]

For each held-out 20-segment toy-world story (the long-range benchmark's: seed 1000, made on first use in
OUT/heldout) and each probed segment s (probe_ttt.probe_segments: a segment after the first with exactly one character
on stage, one seen before, so its text names the character without describing it), two sequences of s + 1 segments
are built from the toy world's own renders (numpy frames, no video codec), encoded with the model's VAE:

    true      segments 1..s of the story
    swapped   segments 1..s-1 of the story rendered with that character in another look (another colour and shape,
              same size; its introduction's text describes the new look), then segment s of the true story;
              --swap shape / colour changes only that part, to see which part of the look memory carries and at
              which noise levels knowing it lowers the loss

Segments 1..s-1 enter clean (timestep 0), segment s noised at each timestep with the same noise in both sequences,
and the training objective's weighted squared error (pipeline.training.loss) is read on segment s: over all its latent
elements ("segment") and over the elements the character covers ("character": where the true and swapped renders of
segment s differ, 4x4 pixels x 4 frames per latent element). gain = loss(swapped) - loss(true): positive when the
model draws segment s better with the context that really showed the character, i.e. when it carries the look.
A third sequence gives the gain its scale: `described`, the true one with segment s's text in the dense register
(pretraining's captions: it describes every character on stage, so the look is also told). text gain =
loss(swapped) - loss(described) is the whole way from a wrong memory to knowing the look both ways; the memory
gain's share of it (gain / text gain, over the probes' means) is how much of that way memory alone goes.
--caption unshaped gives every segment its text in that register (the story text with the size and colour of
everyone on stage: what a model trained on it expects), so that only the shape is left for memory to carry.
A model with no path between segments gains exactly 0. Segment-local attention with overlap_frames 1 has a short one:
each block reaches one segment further back through the shared frame, so probes are also split by whether the
character was on stage in segment s-1 ("adjacent") or not ("apart"). Results: OUT/results.json, a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline.atomic import atomic_write_text  # noqa: E402  (after the path insert; light: no torch)

REGIONS = ("segment", "character")


# the counterfactual story

SWAPS = ("look", "shape", "colour")  # what the counterfactual changes: both parts, or one
CAPTIONS = ("text", "unshaped")  # the register of every segment's text (the described sequence's segment s: dense)


def swapped_look(story, name: str, swap: str = "look"):
    """Another look for `name`: the next shape and the first colour after its own that no one in the cast wears
    (swap "look"), or only one of the two ("shape", "colour"); the size stays."""
    from pipeline.toyworld.world import COLORS, SHAPES

    if swap not in SWAPS:
        raise ValueError(f"swap: expected one of {', '.join(SWAPS)}, got {swap!r}")
    look = story.cast[name]
    taken = {a.color for a in story.cast.values()}
    colors = list(COLORS)
    start = colors.index(look.color)
    color = next(c for c in colors[start + 1:] + colors[:start] if c not in taken)
    shape = SHAPES[(SHAPES.index(look.shape) + 1) % len(SHAPES)]
    return replace(look, shape=look.shape if swap == "colour" else shape,
                   color=look.color if swap == "shape" else color)


def swapped_story(story, name: str, swap: str = "look"):
    """The story with `name` in `swapped_look`: cast and texts (both registers) describe the new look."""
    old, new = story.cast[name], swapped_look(story, name, swap)
    cast = {n: (new if n == name else a) for n, a in story.cast.items()}

    def retell(text: str) -> str:
        return text.replace(f"{name}, {old.describe()}", f"{name}, {new.describe()}")
    segments = [replace(s, text=retell(s.text), dense_text=retell(s.dense_text)) for s in story.segments]
    return replace(story, cast=cast, segments=segments)


def probes(story) -> list[dict]:
    """The probed segments of a story: segment index, character, and whether it was on stage in the segment before."""
    from probe_ttt import probe_segments

    from pipeline.toyworld.world import plan

    states = plan(story)
    # on stage in segment s-1: there at its start, or acting in it (an entrance)
    return [{"segment": s, "character": name,
             "adjacent": name in states[s - 1].positions or name in story.segments[s - 1].actions}
            for s, name in probe_segments(story)]


# the measurement

def character_mask(true_frames, swapped_frames, segment: int, frames_per_latent: int, spatial: int):
    """(T_s, h, w) bool on segment `segment`'s latent grid: latent elements whose pixels differ between the renders."""
    import numpy as np
    import torch

    from pipeline.toyworld.world import segment_frames

    start, end = segment_frames(segment)
    diff = np.abs(true_frames[start:end].astype(np.int16) - swapped_frames[start:end].astype(np.int16)).max(-1) > 0
    f, h, w = diff.shape
    blocks = diff.reshape(f // frames_per_latent, frames_per_latent, h // spatial, spatial, w // spatial, spatial)
    return torch.from_numpy(blocks.any(axis=(1, 3, 5)))


class MemoryProbe:
    """Encodes stories with a pipeline's VAE and text encoder and measures the gain of one probed segment."""

    def __init__(self, pipe, timesteps: list[int], seed: int = 0, caption: str = "text"):
        if caption not in CAPTIONS:
            raise ValueError(f"caption: expected one of {', '.join(CAPTIONS)}, got {caption!r}")
        self.pipe, self.timesteps, self.seed, self.caption = pipe, list(timesteps), seed, caption
        config = pipe.transformer.config
        self.first, self.per = config.latent_frames_first, config.latent_frames_per_segment
        self.size = config.sample_height * pipe.vae_scale_factor_spatial

    def encode(self, story, frames):
        """(latents (1, T, C, h, w), text embeds (1, n, L, D), text mask (1, n, L), scene starts (1, n))."""
        from pipeline.toyworld.dataset import story_captions, story_storyboard

        board = story_storyboard(story)
        texts = board.texts if self.caption == "text" else [c[self.caption] for c in story_captions(story)]
        embeds, mask, _, _ = self.pipe.encode_prompt(texts, do_classifier_free_guidance=False,
                                                     device=self.pipe._execution_device)
        latents, starts = self.encode_frames(story, frames)
        return latents, embeds, mask, starts

    def encode_frames(self, story, frames):
        """(latents (1, T, C, h, w), scene starts (1, n)): `encode` without the texts."""
        import torch

        from pipeline.toyworld.dataset import story_storyboard

        pipe, device = self.pipe, self.pipe._execution_device
        latents = pipe.encode_video(frames, self.size, self.size, story.title).to(device, pipe.transformer.dtype)
        starts = torch.tensor([[seg.scene_start for seg in story_storyboard(story).segments]], device=device)
        return latents, starts

    def encode_dense_text(self, story):
        """(text embeds (1, n, L, D), text mask (1, n, L)) of the story's dense-register captions."""
        pipe = self.pipe
        texts = [segment.dense_text for segment in story.segments]
        embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=pipe._execution_device)
        return embeds, mask

    def gain(self, true, swapped, segment: int, mask, dense=None) -> dict:
        """Loss on `segment` after the true and the swapped context, per timestep and region. true / swapped:
        `encode` results; mask: `character_mask`; dense: `encode_dense_text` of the true story, to add the
        `described` sequence. Returns {"true": {region: [per timestep]}, "swapped": ..., ["described": ...]}."""
        import torch

        from pipeline.training.loss import _weighted_errors

        pipe, k = self.pipe, len(self.timesteps)
        context = self.first + self.per * (segment - 1)  # latent frames of segments 1..s-1 (s is 0-based here)
        end = context + self.per
        names = ["true", "swapped"]
        if dense is not None:  # the true sequence with segment s's text (and mask) from the dense register
            text, text_mask = true[1].clone(), true[2].clone()
            text[:, segment], text_mask[:, segment] = dense[0][:, segment], dense[1][:, segment]
            names.append("described")
        encodings = [true, swapped] + ([(true[0], text, text_mask, true[3])] if dense is not None else [])
        seqs = [torch.cat([enc[0][:, :context], true[0][:, context:end]], dim=1) for enc in encodings]
        latents = torch.cat([seq.expand(k, -1, -1, -1, -1) for seq in seqs])  # (2k, T, C, h, w)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + segment)
        noise = torch.randn(latents[:1, context:].shape, generator=generator).to(latents)
        noise = torch.cat([torch.zeros_like(latents[:1, :context]), noise], dim=1).expand_as(latents)
        levels = torch.tensor(self.timesteps * len(names), device=latents.device)
        n = segment + 1
        timesteps = torch.zeros(len(names) * k, n, dtype=torch.long, device=latents.device)
        timesteps[:, -1] = levels
        frame_noisy = torch.zeros(latents.shape[:2], dtype=torch.bool, device=latents.device)
        frame_noisy[:, context:] = True
        def each(part: int):  # the first n segments' text part of each encoding, k times each: (len(names) k, n, ...)
            return torch.cat([enc[part][:, :n].expand(k, *enc[part][:, :n].shape[1:]) for enc in encodings])
        batch = {"latents": latents, "noise": noise, "timesteps": timesteps, "frame_noisy": frame_noisy,
                 "frame_timesteps": torch.where(frame_noisy, levels[:, None], torch.zeros_like(levels)[:, None]),
                 "text": each(1), "text_mask": each(2), "scene_start": each(3)}
        with torch.no_grad():
            errors = _weighted_errors(pipe.transformer, pipe.scheduler, batch, elements=True)[0][:, context:]
        region = mask.to(errors.device)[None, :, None].expand_as(errors)  # (len(names) k, T_s, C, h, w)
        losses = {"segment": errors.flatten(1).mean(1),
                  "character": (errors * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp(min=1)}
        return {which: {r: losses[r][i * k:(i + 1) * k].tolist() for r in REGIONS} for i, which in enumerate(names)}


def measure(pipe, folder: Path, story_ids: list[str], timesteps: list[int], seed: int = 0,
            progress: bool = True, swap: str = "look", caption: str = "text") -> list[dict]:
    """One row per probed segment of the given stories in `folder` (<id>.truth.json): story, segment, character,
    adjacent, and the losses of `MemoryProbe.gain`; the counterfactual changes what `swap` names; the texts are in
    register `caption`."""
    from tqdm.auto import tqdm

    from pipeline.toyworld.dataset import load_truth
    from pipeline.toyworld.render import render_story

    spatial = pipe.vae_scale_factor_spatial
    frames_per_latent = pipe.vae_scale_factor_temporal
    probe = MemoryProbe(pipe, timesteps, seed, caption)
    rows = []
    for story_id in tqdm(story_ids, desc="stories", unit="story", disable=not progress):
        story = load_truth(folder / f"{story_id}.truth.json")
        chosen = probes(story)
        if not chosen:
            continue
        true_frames = render_story(story, probe.size)
        true, dense = probe.encode(story, true_frames), probe.encode_dense_text(story)
        for name in dict.fromkeys(p["character"] for p in chosen):
            other = swapped_story(story, name, swap)
            other_frames = render_story(other, probe.size)
            swapped = probe.encode(other, other_frames)
            for p in (p for p in chosen if p["character"] == name):
                mask = character_mask(true_frames, other_frames, p["segment"], frames_per_latent, spatial)
                rows.append({"story": story_id, **p, "character_elements": int(mask.sum()),
                             **probe.gain(true, swapped, p["segment"], mask, dense)})
    return rows


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error (sample variance; 0 for a single value)."""
    import math

    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var / len(values))


def summarize(rows: list[dict], timesteps: list[int], split: str = "adjacent",
              labels: tuple[str, str] = ("adjacent", "apart")) -> list[dict]:
    """Mean loss (true), mean gain, its standard error and the share of probes with a positive gain, per group
    (all, then the rows whose `split` is true and false, named by `labels`), timestep and region; with the described
    sequence also its mean loss, the mean text gain (swapped - described) and the memory gain's share of it."""
    out = []
    groups = {"all": rows, labels[0]: [r for r in rows if r[split]], labels[1]: [r for r in rows if not r[split]]}
    for group, members in groups.items():
        for i, t in enumerate(timesteps):
            for region in REGIONS:
                gains = [r["swapped"][region][i] - r["true"][region][i] for r in members]
                if not gains:
                    continue
                mean, se = mean_and_se(gains)
                out.append({"group": group, "timestep": t, "region": region, "probes": len(gains),
                            "loss_true": sum(r["true"][region][i] for r in members) / len(members),
                            "gain": mean, "gain_se": se,
                            "positive": sum(g > 0 for g in gains) / len(gains)})
                if all("described" in r for r in members):
                    described = sum(r["described"][region][i] for r in members) / len(members)
                    text_gain = sum(r["swapped"][region][i] for r in members) / len(members) - described
                    out[-1].update(loss_described=described, text_gain=text_gain,
                                   share=mean / text_gain if text_gain > 0 else float("nan"))
    return out


def markdown(summaries: dict[str, list[dict]]) -> str:
    lines = ["| model | probes | t | region | loss (true context) | gain (swapped - true) | +- s.e. | gain > 0 | "
             "text gain (swapped - described) | gain / text gain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, rows in summaries.items():
        for r in rows:
            described = (f"{r['text_gain']:+.5f} | {100 * r['share']:.0f}%" if "text_gain" in r else " | ")
            lines.append(f"| {model} | {r['group']} ({r['probes']}) | {r['timestep']} | {r['region']} | "
                         f"{r['loss_true']:.4f} | {r['gain']:+.5f} | {r['gain_se']:.5f} | "
                         f"{100 * r['positive']:.0f}% | {described} |")
    return "\n".join(lines)


def parse_timesteps(text: str, flag: str = "--timesteps") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v < 1000 for v in values):
        raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated integers in (0, 1000), got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=MODEL", help="exported pipeline directories, each with a name")
    p.add_argument("--stories", type=int, default=20, help="held-out 20-segment stories")
    p.add_argument("--timesteps", type=parse_timesteps, default=[500, 800, 950], help="noise levels of segment s")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--swap", choices=SWAPS, default="look",
                   help="what the counterfactual look changes: colour and shape (look), or only one of them")
    p.add_argument("--caption", choices=CAPTIONS, default="text",
                   help="the register of the segments' texts: story (text), or unshaped (size and colour told)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_memory",
                   help="results.json goes here; the held-out stories are made in OUT/heldout")
    args = p.parse_args(argv)
    models = {}
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not name or not (Path(path) / "model_index.json").is_file():
            print(f"error: {item}: expected NAME=DIR with an exported pipeline (model_index.json) in DIR",
                  file=sys.stderr)
            return 1
        models[name] = path
    if args.stories < 1:
        p.error("--stories must be at least 1")

    import torch
    from bench_long_range import held_out_stories

    from pipeline import TTTVideoPipeline

    args.out.mkdir(parents=True, exist_ok=True)
    folder = held_out_stories(args.out, args.stories)
    story_ids = sorted(path.name[: -len(".storyboard.json")] for path in folder.glob("*.storyboard.json"))
    results, summaries = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                          "models": {}}, {}
    for name, path in models.items():
        pipe = TTTVideoPipeline.from_pretrained(path)
        pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        pipe.set_progress_bar_config(disable=True)
        rows = measure(pipe, folder, story_ids, args.timesteps, args.seed, swap=args.swap, caption=args.caption)
        summaries[name] = summarize(rows, args.timesteps)
        results["models"][name] = {"path": path, "ttt_type": pipe.transformer.config.ttt_type,
                                   "summary": summaries[name], "rows": rows}
        atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    print(markdown(summaries))
    print(f"\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
