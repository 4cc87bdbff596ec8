"""What does the TTT output hold at later segments? A linear probe of every block's TTT contribution.

    python benchmarks/probe_ttt.py MODEL [--stories 30] [--timestep 500] [--out outputs/probe_ttt]

For each held-out 20-segment toy-world story (the long-range benchmark's: seed 1000, made on first use in OUT/heldout)
the ground-truth video is encoded with the pipeline's VAE, noised to one fixed timestep with the pipeline's scheduler
(`add_noise`, fixed seed) and passed once through the transformer with the storyboard's text embeddings (no sampling
loop). Hooks capture, per block and on video tokens:

    input     the block's input hidden states (what segment-local attention sees): the control
    ttt_fwd   tanh(gate_forward_video) * TTT(forward order), the forward pass's contribution
    ttt_rev   tanh(gate_reverse_video) * TTT(reverse order), the reverse pass's contribution
    ttt       ttt_fwd + ttt_rev, the block's whole TTT contribution

A probed segment is one after segment 1 with exactly one character on stage that was on stage in an earlier segment:
its text names the character without describing its look, so within the segment only memory can say it. Each feature
is averaged over the segment's video tokens (`--pool segment`), or weighted by how much of each token's 16 x 16 pixels
the character covers in the ground truth (`--pool character`: the character's own tokens, not the backdrop's), or
kept as the 3 x 3 tokens around the token the character covers most in each frame (`--pool grid`), or, on the
segment's text tokens instead of its video tokens, averaged over the text's real (unpadded) tokens (`--pool text`: what
the TTT layer adds to the text that names the character; the text gate instead of the video gate); a
multinomial logistic regression (standardised features, L2, LBFGS) is fit on the segments of the first 70% of stories
and tested on the rest, for the character's colour (8 classes) and shape (3). Chance = the majority class's frequency
on the test split. A model without TTT gets the input rows only.
Results: OUT/results.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline.atomic import atomic_write_text  # noqa: E402  (after the path insert; light: no torch)

FEATURES = ("input", "ttt_fwd", "ttt_rev", "ttt")
TARGETS = ("color", "shape")
TRAIN_FRACTION = 0.7


# which segments are probed, and their labels

def probe_segments(story) -> list[tuple[int, str]]:
    """(segment index, character) for every segment after the first with exactly one character on stage that was on
    stage in an earlier segment (so the segment's text does not describe its look). story: a toy-world `Story`."""
    from pipeline.toyworld.world import on_stage, plan

    seen, out = set(), []
    for i, (state, segment) in enumerate(zip(plan(story), story.segments)):
        names = on_stage(state, segment)
        if i > 0 and len(names) == 1 and names[0] in seen:
            out.append((i, names[0]))
        seen.update(names)
    return out


def labels(story, name: str) -> dict[str, int]:
    from pipeline.toyworld.world import COLORS, SHAPES

    look = story.cast[name]
    return {"color": list(COLORS).index(look.color), "shape": SHAPES.index(look.shape)}


def num_classes() -> dict[str, int]:
    from pipeline.toyworld.world import COLORS, SHAPES

    return {"color": len(COLORS), "shape": len(SHAPES)}


# feature capture

class FeatureCapture:
    """Hooks on every block of a CogVideoXTTTTransformer3DModel; after one forward, `features[(block, kind)]` holds the
    video-token features (B, T*hw, W) of the last forward (kinds: FEATURES; TTT kinds only for blocks with TTT).

    The TTT contribution is taken from the TTT module's own output (a forward hook on `block.ttt`), brought back to
    canonical order and gated exactly as `CogVideoXTTTBlock._gated_ttt` does, by wrapping that method on the block
    instance. keep_inputs: also keep `inputs[(block, pass)]`, the canonical (B, N, W) sequence each TTT pass got
    (to check the capture against a recomputation)."""

    def __init__(self, transformer, keep_inputs: bool = False):
        self.features: dict[tuple[int, str], object] = {}
        self.text_features: dict[tuple[int, str], object] = {}  # the same on the text tokens (B, n*Lt, W)
        self.inputs: dict[tuple[int, str], object] = {}
        self.keep_inputs = keep_inputs
        self._handles, self._wrapped = [], []
        for index, block in enumerate(transformer.transformer_blocks):
            self._handles.append(block.register_forward_pre_hook(self._input_hook(index)))
            if block.ttt is not None:
                slot: dict = {}
                self._handles.append(block.ttt.register_forward_hook(
                    lambda module, args, output, slot=slot: slot.__setitem__("y", output)))
                block._gated_ttt = self._wrap(index, block, block._gated_ttt, slot)
                self._wrapped.append(block)

    def _input_hook(self, index: int):
        def hook(module, args):
            self.features[(index, "input")] = args[0].detach()
            self.text_features[(index, "input")] = args[1].detach()
        return hook

    def _wrap(self, index: int, block, original, slot: dict):
        import torch

        def gated_ttt(x, order, token_mask, gate_text, gate_video):
            out = original(x, order, token_mask, gate_text, gate_video)
            y = slot.pop("y")
            y = y[0] if isinstance(y, tuple) else y
            kind = "ttt_fwd" if gate_video is block.gate_forward_video else "ttt_rev"
            y = order.scatter(y)
            self.features[(index, kind)] = (torch.tanh(gate_video) * y[:, order.num_text:]).detach()
            self.text_features[(index, kind)] = (torch.tanh(gate_text) * y[:, :order.num_text]).detach()
            if self.keep_inputs:
                self.inputs[(index, kind)] = x.detach()
            if kind == "ttt_rev":
                for features in (self.features, self.text_features):
                    features[(index, "ttt")] = features[(index, "ttt_fwd")] + features[(index, "ttt_rev")]
            return out
        return gated_ttt

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for block in self._wrapped:
            del block._gated_ttt  # back to the class's method
        self._handles, self._wrapped = [], []

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def segment_means(tokens, layout, token_weights=None):
    """(B, T*hw, W) canonical video tokens → (B, n, W), the mean over each segment's own latent frames; with
    token_weights (T*hw,) >= 0 the weighted mean (a segment whose weights are all 0 gives zeros)."""
    import torch

    segment_of_token = layout.frame_segment.repeat_interleave(layout.tokens_per_frame).to(tokens.device)
    onehot = torch.nn.functional.one_hot(segment_of_token, layout.num_segments).to(tokens.dtype)  # (T*hw, n)
    if token_weights is not None:
        onehot = onehot * token_weights.to(onehot)[:, None]
    return torch.einsum("btw,tn->bnw", tokens, onehot / onehot.sum(0).clamp_min(1e-12))


def text_means(tokens, text_mask):
    """(B, n*Lt, W) text tokens of n segments → (B, n, W), each segment's mean over its real tokens (text_mask (B, n,
    Lt) true; a segment without any gives zeros)."""
    batch, num_segments, length = text_mask.shape
    weights = text_mask.to(tokens.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
    return (tokens.reshape(batch, num_segments, length, -1) * weights[..., None]).sum(2)


def segment_grids(tokens, layout, token_weights, grid: tuple[int, int], radius: int = 1):
    """(B, T*hw, W) canonical video tokens on a grid of (rows, columns) tokens per frame → (B, n, (2r + 1)^2 * W):
    per segment, in each latent frame the
    (2r + 1) x (2r + 1) tokens around the token the character covers most (zeros beyond the frame's edge), averaged
    over the segment's frames in which the character covers any token, flattened in (row, column, channel) order.
    Keeps where the character's extent lies relative to its centre, which a mean over tokens loses."""
    import torch

    batch, _, width = tokens.shape
    rows, cols = grid
    frames = tokens.reshape(batch, layout.num_frames, rows, cols, width)
    padded = torch.nn.functional.pad(frames, (0, 0, radius, radius, radius, radius))
    weights = token_weights.reshape(layout.num_frames, rows * cols)
    size = 2 * radius + 1
    out = torch.zeros(batch, layout.num_segments, size * size * width, dtype=tokens.dtype, device=tokens.device)
    counts = torch.zeros(layout.num_segments)
    for frame in range(layout.num_frames):
        if weights[frame].max() <= 0:
            continue
        row, col = divmod(int(weights[frame].argmax()), cols)
        window = padded[:, frame, row:row + size, col:col + size]  # (B, size, size, W)
        segment = int(layout.frame_segment[frame])
        out[:, segment] += window.reshape(batch, -1)
        counts[segment] += 1
    return out / counts.clamp_min(1).to(out)[None, :, None]


def character_token_weights(story, layout, grid: tuple[int, int], size: int):
    """(T*hw,) float32: the share of each video token's pixels that a character covers in the story's ground truth
    (`render_story_mask` at `size` pixels, pooled onto the latent frames as the loss masks are, then onto the token
    grid), in canonical token order (frame, row, column)."""
    from pipeline.data.precompute import pool_mask
    from pipeline.toyworld.render import render_story_mask

    mask = render_story_mask(story, size)[..., None]  # (F, H, W, 1)
    return pool_mask(mask, layout.num_frames, *grid).reshape(-1)


def story_inputs(pipe, video_path: Path, storyboard_path: Path, timestep: int, seed: int, context: bool = False):
    """The transformer's inputs for one story: noised latents of its ground-truth video at `timestep`, the text
    embeddings and mask of its storyboard, scene starts. Returns a dict of keyword arguments for the transformer.

    context: segment 1 is given clean (timestep 0, its latents as they are; per-segment timesteps (1, n)), as in the
    long-range benchmark's recall mode; at a high `timestep` the later segments' inputs then hold little of the looks,
    and what the TTT output knows of them came from segment 1."""
    import torch

    from pipeline import load_storyboard
    from pipeline.video_io import read_video

    device, dtype = pipe._execution_device, pipe.transformer.dtype
    storyboard = load_storyboard(storyboard_path)
    frames, _ = read_video(video_path)
    config, scale = pipe.transformer.config, pipe.vae_scale_factor_spatial
    latents = pipe.encode_video(frames, config.sample_height * scale, config.sample_width * scale,
                                str(video_path)).to(device, dtype)  # (1, T, C, h, w), scaled
    t = torch.tensor([timestep], device=device, dtype=torch.long)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    noisy = pipe.scheduler.add_noise(latents, noise, t)
    noisy = pipe.scheduler.scale_model_input(noisy, t)
    if context:
        first = config.latent_frames_first
        noisy = torch.cat([latents[:, :first], noisy[:, first:]], dim=1)
        t = torch.tensor([[0] + [timestep] * (len(storyboard.segments) - 1)], device=device, dtype=torch.long)
    embeds, mask, _, _ = pipe.encode_prompt(storyboard.texts, do_classifier_free_guidance=False, device=device)
    scene_start = torch.tensor([[s.scene_start for s in storyboard.segments]], device=device)
    return {"hidden_states": noisy, "encoder_hidden_states": embeds, "timestep": t, "encoder_attention_mask": mask,
            "scene_start": scene_start}


def extract(pipe, folder: Path, story_ids: list[str], timestep: int, seed: int = 0, progress: bool = True,
            keep_inputs: bool = False, context: bool = False, pool: str = "segment", radius: int = 1):
    """Probe features of the given stories in `folder` (<id>.mp4, .storyboard.json, .truth.json).

    Returns (samples, raw): samples, one dict per probed segment (story, segment, character, color, shape and
    `features` {(block, kind): (W,) float32 tensor}); raw, for the last story, its transformer inputs, layout,
    per-token captured features and (keep_inputs) the TTT passes' inputs, for checks."""
    import torch
    from tqdm.auto import tqdm

    from pipeline.toyworld.dataset import load_truth

    transformer = pipe.transformer
    scale, patch = pipe.vae_scale_factor_spatial, transformer.config.patch_size
    samples, raw = [], {}
    with FeatureCapture(transformer, keep_inputs) as capture, torch.no_grad():
        for story_id in tqdm(story_ids, desc="stories", unit="story", disable=not progress):
            story = load_truth(folder / f"{story_id}.truth.json")
            probed = probe_segments(story)
            inputs = story_inputs(pipe, folder / f"{story_id}.mp4", folder / f"{story_id}.storyboard.json",
                                  timestep, seed, context)
            capture.features.clear()
            capture.text_features.clear()
            capture.inputs.clear()
            transformer(**inputs, return_dict=False)
            _, frames, _, height, width = inputs["hidden_states"].shape
            layout = transformer.segment_layout(inputs["encoder_hidden_states"].shape[1], height, width,
                                                inputs["hidden_states"].device)
            grid = (height // patch, width // patch)  # tokens per frame: rows, columns
            weights = None if pool in ("segment", "text") else character_token_weights(story, layout, grid,
                                                                                         width * scale)
            if pool == "text":
                means = {key: text_means(value, inputs["encoder_attention_mask"])[0].float().cpu()
                         for key, value in capture.text_features.items()}
            else:
                means = {key: (segment_grids(value, layout, weights, grid, radius) if pool == "grid"
                               else segment_means(value, layout, weights))[0].float().cpu()
                         for key, value in capture.features.items()}
            for segment, name in probed:
                samples.append({"story": story_id, "segment": segment, "character": name, **labels(story, name),
                                "features": {key: m[segment] for key, m in means.items()}})
            raw = {"story": story_id, "inputs": inputs, "layout": layout, "features": dict(capture.features),
                   "text_features": dict(capture.text_features),
                   "token_weights": weights,
                   "ttt_inputs": dict(capture.inputs), "means": means, "probed": probed}
    return samples, raw


# the linear probe

def fit_probe(x, y, classes: int, weight_decay: float = 1e-2, steps: int = 300):
    """Multinomial logistic regression on standardised features (train statistics), L2 on the weights, LBFGS.
    x (N, D) float, y (N,) long. Returns predict(x) -> (M,) long."""
    import torch

    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    weight = torch.zeros(z.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()

    def predict(x_new):
        return (((x_new.double() - mean) / std) @ weight + bias).argmax(1)
    return predict


def probe(samples: list[dict], train_stories: set[str], weight_decay: float = 1e-2, steps: int = 300
          ) -> tuple[list[dict], dict]:
    """Fits and tests one probe per (block, kind) and target. Returns (rows, info) with info holding the split sizes
    and chance levels."""
    import torch

    train = [s for s in samples if s["story"] in train_stories]
    test = [s for s in samples if s["story"] not in train_stories]
    info = {"train_segments": len(train), "test_segments": len(test),
            "train_stories": len({s["story"] for s in train}), "test_stories": len({s["story"] for s in test}),
            "chance": {}}
    if not train or not test:
        return [], info
    classes = num_classes()
    for target in TARGETS:
        counts = torch.bincount(torch.tensor([s[target] for s in test]), minlength=classes[target])
        info["chance"][target] = counts.max().item() / len(test)
    rows = []
    for key in sorted(samples[0]["features"], key=lambda k: (k[0], FEATURES.index(k[1]))):
        x_train = torch.stack([s["features"][key] for s in train])
        x_test = torch.stack([s["features"][key] for s in test])
        row = {"block": key[0], "feature": key[1]}
        for target in TARGETS:
            y_train = torch.tensor([s[target] for s in train])
            y_test = torch.tensor([s[target] for s in test])
            predict = fit_probe(x_train, y_train, classes[target], weight_decay, steps)
            row[f"{target}_acc"] = (predict(x_test) == y_test).double().mean().item()
            row[f"{target}_train_acc"] = (predict(x_train) == y_train).double().mean().item()
        rows.append(row)
    return rows, info


def markdown(rows: list[dict], info: dict) -> str:
    chance = info["chance"]
    lines = ["| block | feature | colour acc | shape acc | chance (colour / shape) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['feature']} | {100 * r['color_acc']:.1f} | {100 * r['shape_acc']:.1f} | "
                     f"{100 * chance['color']:.1f} / {100 * chance['shape']:.1f} |")
    lines.append(f"\ntrain: {info['train_segments']} segments of {info['train_stories']} stories; "
                 f"test: {info['test_segments']} segments of {info['test_stories']} stories")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an exported pipeline directory (e.g. models/default)")
    p.add_argument("--stories", type=int, default=30, help="held-out 20-segment stories (at least 2)")
    p.add_argument("--timestep", type=int, default=500, help="noise level of the one forward pass")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same for every story)")
    p.add_argument("--context", action="store_true", help="segment 1 given clean (recall mode's setting): with a "
                   "high --timestep the later segments' own inputs hold little of the looks")
    p.add_argument("--pool", choices=("segment", "character", "grid", "text"), default="segment",
                   help="average each feature over the segment's video tokens, over the character's own (weighted "
                   "by how much of each token the character covers), or keep the 3 x 3 tokens around the "
                   "character's centre (averaged over frames; 9 times the features), or average over the segment's "
                   "text tokens (what TTT adds to the text that names the character)")
    p.add_argument("--radius", type=int, default=1, help="--pool grid: the (2 r + 1) x (2 r + 1) tokens around the "
                   "character's centre (0: that token alone, whether one token's features hold the shape)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="L2 on the probe's weights")
    p.add_argument("--steps", type=int, default=300, help="LBFGS iterations per probe")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "probe_ttt",
                   help="results.json goes here; the held-out stories are made in OUT/heldout")
    args = p.parse_args(argv)
    if not (Path(args.model) / "model_index.json").is_file():
        print(f"error: {args.model}: no exported pipeline (model_index.json) there", file=sys.stderr)
        return 1
    if args.stories < 2:
        p.error("--stories must be at least 2 (a train and a test split)")
    if not 0 <= args.timestep < 1000:
        p.error("--timestep must be in [0, 1000)")
    if args.radius < 0:
        p.error("--radius must be at least 0")

    import torch
    from bench_long_range import held_out_stories

    from pipeline import TTTVideoPipeline

    args.out.mkdir(parents=True, exist_ok=True)
    folder = held_out_stories(args.out, args.stories)
    pipe = TTTVideoPipeline.from_pretrained(args.model)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    if args.timestep >= pipe.scheduler.config.num_train_timesteps:
        p.error(f"--timestep must be below {pipe.scheduler.config.num_train_timesteps}")
    story_ids = sorted(path.name[: -len(".storyboard.json")] for path in folder.glob("*.storyboard.json"))
    samples, _ = extract(pipe, folder, story_ids, args.timestep, args.seed, context=args.context, pool=args.pool,
                         radius=args.radius)
    n_train = min(len(story_ids) - 1, max(1, round(TRAIN_FRACTION * len(story_ids))))
    rows, info = probe(samples, set(story_ids[:n_train]), args.weight_decay, args.steps)
    if not rows:
        print(f"error: no probed segments in the train or the test split ({info['train_segments']} / "
              f"{info['test_segments']}); use more --stories", file=sys.stderr)
        return 1
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {"settings": settings, "ttt_type": pipe.transformer.config.ttt_type,
               "features": "input: block input on video tokens; ttt_fwd / ttt_rev: tanh(gate_*_video) * TTT output "
                           "of the forward / reverse pass on video tokens; ttt: their sum",
               **info, "rows": rows,
               "segments": [{k: v for k, v in s.items() if k != "features"} for s in samples]}
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    print(markdown(rows, info))
    print(f"\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
