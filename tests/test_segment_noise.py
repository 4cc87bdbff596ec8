"""Training with a noise level per segment (train.noise, docs/training.md): the collate's modes and the masked loss.

Items are made in code in the dataset's format (latent mean/logvar per frame, text per segment, a seed); shapes as
tests/tiny.py: 3 segments = 3 + 2 + 2 latent frames of 4 x 4 x 4.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, LATENT_CHANNELS, TEXT_LEN, other_weights, tiny_transformer

from models import CogVideoXTTTTransformer3DModel
from pipeline.schedulers import make_scheduler
from pipeline.training import DiffusionCollate, diffusion_loss
from pipeline.training.config import ConfigError, NoiseConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
N = 3
FRAMES = FRAMES_FIRST + (N - 1) * FRAMES_PER_SEGMENT
SCALING = 0.7
CONTEXT_FIRST = NoiseConfig(uniform=0.0, context=1.0, context_first=1.0, context_rate=0.0)  # segment 1 always clean


def item(seed: int) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    return {"seed": seed, "latent_mean": torch.randn(FRAMES, LATENT_CHANNELS, 4, 4, generator=g),
            "latent_logvar": torch.randn(FRAMES, LATENT_CHANNELS, 4, 4, generator=g) - 2,
            "text": torch.randn(N, TEXT_LEN, 16, generator=g), "text_mask": torch.ones(N, TEXT_LEN, dtype=torch.bool),
            "scene_start": torch.tensor([False, True, False])}


def collate(noise: NoiseConfig | None = None, size: int = 2) -> dict:
    return DiffusionCollate(1000, SCALING, noise, FRAMES_PER_SEGMENT)([item(i) for i in range(size)])


class Recorder(torch.nn.Module):
    """Stands in for the transformer: returns a prediction that is a leaf (to read its gradient) and records inputs."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction, self.seen = prediction.requires_grad_(), {}

    def forward(self, **kwargs):
        self.seen = kwargs
        return (self.prediction,)


@pytest.fixture(scope="module")
def model():
    return CogVideoXTTTTransformer3DModel.from_base(
        tiny_transformer(seed=0), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        ttt_mini_batch_size=16, ttt_backend="torch", gate_init=0.5)


def test_default_is_the_uniform_training_bit_for_bit():
    batch = collate()
    assert NoiseConfig().is_uniform
    assert set(batch) == {"text", "text_mask", "scene_start", "latents", "noise", "timesteps", "names"}
    for i in range(2):  # the draws of the original collate, in its order
        source, g = item(i), torch.Generator().manual_seed(i)
        mean, logvar = source["latent_mean"], source["latent_logvar"]
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)) * SCALING
        assert torch.equal(batch["latents"][i], latents)
        assert torch.equal(batch["noise"][i], torch.randn(mean.shape, generator=g))
        assert torch.equal(batch["timesteps"][i], torch.randint(0, 1000, (), generator=g))
    scheduler = make_scheduler("ddim")
    prediction = torch.randn(batch["latents"].shape)
    loss = diffusion_loss(Recorder(prediction.clone()), scheduler, batch)
    t = batch["timesteps"]  # the original loss, written out
    x0 = scheduler.get_velocity(prediction, scheduler.add_noise(batch["latents"], batch["noise"], t), t)
    expected = 1.0 / (1.0 - scheduler.alphas_cumprod.float()[t]) * (x0 - batch["latents"]).pow(2).flatten(1).mean(1)
    assert torch.equal(loss, expected)


def test_context_mode_masks_the_loss_of_clean_segments():
    batch = collate(CONTEXT_FIRST)
    assert batch["timesteps"].shape == (2, N) and (batch["timesteps"][:, 0] == 0).all()
    assert (batch["timesteps"][:, 1:] == batch["timesteps"][:, 1:2]).all()  # the rest at one level
    assert batch["frame_noisy"].tolist() == [[False] * FRAMES_FIRST + [True] * (FRAMES - FRAMES_FIRST)] * 2
    recorder = Recorder(torch.randn(batch["latents"].shape))
    loss = diffusion_loss(recorder, make_scheduler("ddim"), batch)
    loss.sum().backward()
    grad = recorder.prediction.grad
    assert (grad[:, :FRAMES_FIRST] == 0).all() and (grad[:, FRAMES_FIRST:] != 0).all()
    # the clean segment enters as its latents exactly, the others noised
    noisy = recorder.seen["hidden_states"]
    assert torch.equal(noisy[:, :FRAMES_FIRST], batch["latents"][:, :FRAMES_FIRST])
    assert not torch.equal(noisy[:, FRAMES_FIRST:], batch["latents"][:, FRAMES_FIRST:])
    assert torch.equal(recorder.seen["timestep"], batch["timesteps"])
    # whatever the prediction on clean frames, the loss is the same
    changed = recorder.prediction.detach().clone()
    changed[:, :FRAMES_FIRST] += 100.0
    assert torch.equal(diffusion_loss(Recorder(changed), make_scheduler("ddim"), batch), loss.detach())


def test_context_mode_trains_the_transformer_through_the_noisy_segments_only(model):
    batch = collate(CONTEXT_FIRST)
    outputs = []
    hook = model.register_forward_hook(lambda m, args, out: outputs.append(out[0]))
    try:
        loss = diffusion_loss(model, make_scheduler("ddim"), batch)
    finally:
        hook.remove()
    outputs[0].retain_grad()
    loss.sum().backward()
    assert (outputs[0].grad[:, :FRAMES_FIRST] == 0).all() and outputs[0].grad[:, FRAMES_FIRST:].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_equal_levels_per_segment_give_the_uniform_loss(model):
    batch = collate()
    per_segment = dict(batch, timesteps=batch["timesteps"][:, None].expand(-1, N),
                       frame_timesteps=batch["timesteps"][:, None].expand(-1, FRAMES),
                       frame_noisy=torch.ones(2, FRAMES, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(diffusion_loss(model, make_scheduler("ddim"), per_segment),
                                   diffusion_loss(model, make_scheduler("ddim"), batch), rtol=1e-5, atol=1e-6)


def test_modes_draw_per_sample_and_independently_of_the_batch():
    mixed = NoiseConfig(uniform=0.2, independent=0.4, context=0.4, context_first=0.5, context_rate=0.5)
    batches = [collate(mixed, size=1)] + [DiffusionCollate(1000, SCALING, mixed, FRAMES_PER_SEGMENT)([item(0), item(i)])
                                          for i in range(1, 40)]
    assert all(torch.equal(b["timesteps"][0], batches[0]["timesteps"][0]) for b in batches)
    levels = torch.cat([b["timesteps"] for b in batches])
    noisy = torch.cat([b["frame_noisy"] for b in batches])
    frame_segment = torch.tensor([0] * FRAMES_FIRST + [1, 1, 2, 2])
    assert torch.equal(torch.cat([b["frame_timesteps"] for b in batches]), levels[:, frame_segment])
    assert noisy.any(dim=1).all()  # every sample keeps a segment to learn from
    independent = (levels > 0).all(1) & (levels != levels[:, :1]).any(1)
    context = ~noisy.all(dim=1)
    assert independent.any() and context.any() and (levels[~noisy[:, [0, 3, 5]]] == 0).all()


def test_levels_are_drawn_from_t_min_to_t_max_in_every_mode():
    """train.noise.t_min / t_max narrow the noisy levels (uniform, independent and context modes); clean context
    segments stay at 0; the one-level batch of uniform mode draws them too, in the same generator position."""
    span = {"t_min": 600, "t_max": 700}
    kinds = {"uniform": NoiseConfig(**span), "independent": NoiseConfig(uniform=0.0, independent=1.0, **span),
             "context": NoiseConfig(uniform=0.0, context=1.0, context_first=1.0, context_rate=0.3, **span)}
    for name, noise in kinds.items():
        levels = DiffusionCollate(1000, SCALING, noise, FRAMES_PER_SEGMENT)([item(i) for i in range(60)])["timesteps"]
        noisy = levels[levels > 0]
        assert ((noisy >= 600) & (noisy < 700)).all(), name
        assert noisy.unique().numel() > 20, name  # spread over the range, not one value
        if name == "context":
            assert (levels == 0).any() and (levels[:, 0] == 0).float().mean() > 0.8
    narrowed = DiffusionCollate(1000, SCALING, NoiseConfig(t_min=600))([item(i) for i in range(2)])
    for i in range(2):  # the original collate's draws, with only the level's range changed
        g = torch.Generator().manual_seed(i)
        torch.randn(item(i)["latent_mean"].shape, generator=g), torch.randn(item(i)["latent_mean"].shape, generator=g)
        assert torch.equal(narrowed["timesteps"][i], torch.randint(600, 1000, (), generator=g))
    assert torch.equal(narrowed["noise"], collate(size=2)["noise"])
    with pytest.raises(ConfigError, match=r"train.noise.t_max: expected a timestep above t_min \(600\), got 500"):
        load_config(None, ["train.noise.t_min=600", "train.noise.t_max=500"])
    with pytest.raises(ConfigError, match=r"train.noise.t_min: expected a timestep >= 0, got -1"):
        load_config(None, ["train.noise.t_min=-1"])
    with pytest.raises(ValueError, match=r"train.noise: expected 0 <= t_min < t_max <= the scheduler's 1000"):
        DiffusionCollate(1000, SCALING, NoiseConfig(t_max=1200))
    with pytest.raises(ValueError, match=r"t_min 1000, t_max None"):
        DiffusionCollate(1000, SCALING, NoiseConfig(t_min=1000))


def test_context_sequences_can_draw_their_level_from_their_own_range():
    """train.noise.context_t_min: context-mode sequences draw their noisy level from [context_t_min, t_max) while
    one-level sequences keep every level; which segments are clean, the latents and the noise do not change."""
    mixed = {"uniform": 0.5, "context": 0.5, "context_first": 1.0, "context_rate": 0.25}
    items = [item(i) for i in range(80)]
    plain = DiffusionCollate(1000, SCALING, NoiseConfig(**mixed), FRAMES_PER_SEGMENT)(items)
    split = DiffusionCollate(1000, SCALING, NoiseConfig(**mixed, context_t_min=800), FRAMES_PER_SEGMENT)(items)
    levels, context = split["timesteps"], ~split["frame_noisy"].all(dim=1)  # (a one-level sequence may draw 0)
    assert context.any() and (~context).any()
    assert ((levels[context] == 0) | (levels[context] >= 800)).all()
    assert (levels[context].amax(dim=1) >= 800).all()
    assert (levels[~context] < 800).any()  # one-level sequences still reach below context_t_min
    assert torch.equal(levels[~context], plain["timesteps"][~context])
    assert torch.equal(split["frame_noisy"], plain["frame_noisy"])
    assert torch.equal(split["noise"], plain["noise"]) and torch.equal(split["latents"], plain["latents"])
    with pytest.raises(ConfigError, match=r"context_t_min: expected a timestep below t_max \(700\), got 700"):
        load_config(None, ["train.noise.t_max=700", "train.noise.context_t_min=700"])
    with pytest.raises(ConfigError, match=r"train.noise.context_t_min: expected a timestep >= 0, got -1"):
        load_config(None, ["train.noise.context_t_min=-1"])
    with pytest.raises(ValueError, match=r"train.noise.context_t_min: expected 0 <= context_t_min < t_max \(1000\)"):
        DiffusionCollate(1000, SCALING, NoiseConfig(**mixed, context_t_min=1000), FRAMES_PER_SEGMENT)


def test_noise_config_is_checked(tmp_path):
    cfg = load_config(None, ["train.noise.uniform=0.5", "train.noise.context=0.5", "train.noise.context_first=0.9"])
    assert (cfg.train.noise.context, cfg.train.noise.context_first) == (0.5, 0.9)
    with pytest.raises(ConfigError, match=r"train.noise: uniform \+ independent \+ context must sum to 1"):
        load_config(None, ["train.noise.context=0.5"])
    with pytest.raises(ConfigError, match=r"train.noise.context_rate: expected a probability in \[0, 1\], got 2"):
        load_config(None, ["train.noise.context_rate=2"])
    with pytest.raises(ValueError, match="need latent_frames_per_segment"):
        DiffusionCollate(1000, SCALING, CONTEXT_FIRST)


@pytest.mark.parametrize("teacher", ["self", "initial"])
def test_train_py_runs_the_noise_modes(tmp_path, teacher):
    """train.py wires train.noise into its collate (mixed modes, 2 steps of the debug config) and saves it resolved;
    likewise the boundary and told terms (the told cache here is the cache itself: the model's own told prediction is
    its prediction, distance 0; a frozen teacher's is only until the first optimizer step moves the model). A run
    stopped after step 1 and resumed keeps the teacher at the run's start, not at the checkpoint (where step 2 would
    read 0 again)."""
    import json
    import subprocess
    import sys

    import yaml
    from tiny_training import CONFIG, debug_overrides, prepared

    base, run = prepared(tmp_path), tmp_path / "run"  # prepared() may hand back another test's base: own output_dir

    def train(output_dir, *args):
        result = subprocess.run([sys.executable, "train.py", "--config", str(CONFIG), *debug_overrides(base),
                                 f"output_dir={output_dir}", "train.steps=2", "log.every=1", "checkpoint.every=0",
                                 "validation.every=0", "train.noise.uniform=0.0", "train.noise.independent=0.5",
                                 "train.noise.context=0.5", "train.noise.t_min=500", "train.boundary_weight=1.5",
                                 f"data.told_cache={base / 'cache'}", "train.told_weight=0.5",
                                 f"train.told_teacher={teacher}", *args],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]

    logs = train(run)
    assert [log["step"] for log in logs] == [1, 2] and all(math.isfinite(log["loss"]) for log in logs)
    # logged on steps whose batch has a noisy segment that continues a scene (step 1 with these seeds)
    assert [math.isfinite(log["loss/boundary"]) for log in logs if "loss/boundary" in log] == [True]
    told = [log["loss/told"] for log in logs]  # told what its own texts tell
    assert told[0] == 0.0 and (told[1] == 0.0 if teacher == "self" else told[1] > 0.0)
    if teacher == "initial":
        train(tmp_path / "resumed", "--stop-after", "1")
        resumed = train(tmp_path / "resumed", "--resume", "latest")
        assert [log["step"] for log in resumed] == [1, 2]
        assert resumed[1]["loss/told"] == pytest.approx(told[1], rel=1e-4)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["noise"] == {"uniform": 0.0, "independent": 0.5, "context": 0.5, "context_first": 0.5,
                                       "context_rate": 0.5, "t_min": 500, "t_max": None,
                                       "context_t_min": None}
    assert saved["train"]["boundary_weight"] == 1.5 and saved["train"]["told_weight"] == 0.5
    assert saved["train"]["told_teacher"] == teacher


def test_hard_term_adds_the_mean_of_each_samples_largest_errors_on_noisy_frames():
    """train.hard_fraction / hard_weight: loss = plain loss + weight x mean of the top fraction of the weighted squared
    errors, over the noisy frames only (clean context frames can hold no large error); written out by hand."""
    batch = collate(CONTEXT_FIRST)
    scheduler = make_scheduler("ddim")
    prediction = torch.randn(batch["latents"].shape)
    prediction[:, :FRAMES_FIRST] += 50.0  # huge errors on the clean frames: they must not be picked
    plain = diffusion_loss(Recorder(prediction.clone()), scheduler, batch)
    hard = diffusion_loss(Recorder(prediction.clone()), scheduler, batch, hard_fraction=0.1, hard_weight=2.0)
    a = scheduler.alphas_cumprod.float()[batch["frame_timesteps"]][:, :, None, None, None]
    noisy_input = torch.where(batch["frame_noisy"][:, :, None, None, None],
                              a.sqrt() * batch["latents"] + (1 - a).sqrt() * batch["noise"], batch["latents"])
    x0 = a.sqrt() * noisy_input - (1 - a).sqrt() * prediction
    errors = ((x0 - batch["latents"]).pow(2) / (1 - a))[:, FRAMES_FIRST:].flatten(1)  # the noisy frames
    k = round(0.1 * errors.shape[1])
    expected = plain + 2.0 * errors.topk(k, dim=1).values.mean(dim=1)
    torch.testing.assert_close(hard, expected, rtol=1e-6, atol=0)
    assert (hard > plain).all()


@pytest.mark.parametrize("noise", [None, CONTEXT_FIRST], ids=["one level", "clean segment 1"])
def test_boundary_term_adds_the_error_of_the_first_frame_of_each_segment_that_continues_a_scene(noise):
    """train.boundary_weight: loss = plain loss + weight x the mean weighted error over the first latent frame of each
    noisy segment 2..n whose scene_start is False: here segment 3 only (segment 2 opens a scene), written out in
    float64 from the scheduler's formulas. A sequence of one segment gains nothing."""
    from pipeline.training import diffusion_terms

    batch = collate(noise)
    scheduler = make_scheduler("ddim")
    prediction = torch.randn(batch["latents"].shape)
    plain = diffusion_terms(Recorder(prediction.clone()), scheduler, batch).per_sample
    terms = diffusion_terms(Recorder(prediction.clone()), scheduler, batch, boundary_weight=2.5,
                            frames_per_segment=FRAMES_PER_SEGMENT)
    frame_t = batch["frame_timesteps"] if noise else batch["timesteps"][:, None].expand(batch["latents"].shape[:2])
    a = scheduler.alphas_cumprod.double()[frame_t][:, :, None, None, None]
    latents = batch["latents"].double()
    inputs = a.sqrt() * latents + (1 - a).sqrt() * batch["noise"].double()  # segment 3 is noisy in both modes
    errors = (a.sqrt() * inputs - (1 - a).sqrt() * prediction.double() - latents).pow(2) / (1 - a)
    boundary = FRAMES_FIRST + FRAMES_PER_SEGMENT  # segment 3's first latent frame
    expected = plain.double() + 2.5 * errors[:, boundary].flatten(1).mean(dim=1)
    torch.testing.assert_close(terms.per_sample.double(), expected, rtol=1e-5, atol=0)
    total, count = terms.boundary()  # logged as loss/boundary
    assert count == 2
    torch.testing.assert_close(total.double(), errors[:, boundary].flatten(1).mean(dim=1).sum(), rtol=1e-5, atol=0)
    # a sequence of segment 1 alone (as replayed steps give): the plain loss, nothing marked
    single = {key: value[:, :FRAMES_FIRST] if key in ("latents", "noise", "frame_timesteps", "frame_noisy") else
              value[:, :1] if key in ("text", "text_mask", "scene_start", "timesteps") and value.dim() > 1 else value
              for key, value in batch.items()}
    first = prediction[:, :FRAMES_FIRST].clone()
    alone = diffusion_terms(Recorder(first.clone()), scheduler, single, boundary_weight=2.5,
                            frames_per_segment=FRAMES_PER_SEGMENT)
    torch.testing.assert_close(alone.per_sample, diffusion_terms(Recorder(first.clone()), scheduler, single).per_sample)
    assert alone.boundary()[1] == 0
    with pytest.raises(ValueError, match="train.boundary_weight > 0 needs the model's latent_frames_per_segment"):
        diffusion_terms(Recorder(prediction.clone()), scheduler, batch, boundary_weight=2.5)
    with pytest.raises(ConfigError, match=r"train.boundary_weight: expected a weight >= 0, got -1"):
        load_config(None, ["train.boundary_weight=-1"])


@pytest.mark.parametrize("teacher", ["self", "initial"])
@pytest.mark.parametrize("noise", [None, CONTEXT_FIRST], ids=["one level", "clean segment 1"])
def test_told_term_adds_the_distance_from_the_prediction_given_the_told_texts(model, noise, teacher):
    """train.told_weight: loss = plain loss + weight x the mean weighted squared distance, over the noisy frames of
    segments 2..n, between the x_0 estimate and the estimate from the told texts (plus mask_weight x its
    mask-weighted mean), only for samples whose texts are their own; written out in float64 from two forward
    passes. The told estimate is the same model's, or (train.told_teacher "initial") a frozen teacher's: here a
    copy of the model with other weights, built as train.py builds it. Its gradient is the distance's with the
    told estimate held fixed; the teacher gets none and stays as it was; a single segment gains nothing."""
    from accelerate import Accelerator

    from pipeline.training import diffusion_terms
    from pipeline.training.setup import FrozenTeacher

    torch.manual_seed(0)
    frozen = None
    if teacher == "initial":
        other = other_weights(model)
        frozen = FrozenTeacher(other, Accelerator(cpu=True))
        before = [p.clone() for p in other.parameters()]
        assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    batch = collate(noise)
    batch["told_text"] = torch.randn(batch["text"].shape)
    batch["told_text_mask"] = batch["text_mask"].clone()
    batch["told"] = torch.tensor([True, False])
    batch["loss_mask"] = (torch.rand(batch["latents"].shape[0], FRAMES, 4, 4) < 0.3).float()
    scheduler = make_scheduler("ddim")
    frame_t = batch["frame_timesteps"] if noise else batch["timesteps"][:, None].expand(batch["latents"].shape[:2])
    a = scheduler.alphas_cumprod.double()[frame_t][:, :, None, None, None]
    latents = batch["latents"].double()
    inputs = a.sqrt() * latents + (1 - a).sqrt() * batch["noise"].double()
    if noise is not None:  # clean segment 1 enters as it is
        inputs = torch.where(batch["frame_noisy"][:, :, None, None, None], inputs, latents)

    def x0(text, net=model):
        prediction = net(hidden_states=inputs.float(), encoder_hidden_states=text, timestep=batch["timesteps"],
                           encoder_attention_mask=batch["text_mask"], scene_start=batch["scene_start"],
                           return_dict=False)[0]
        return a.sqrt() * inputs - (1 - a).sqrt() * prediction.double()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    for mask_weight in (0.0, 2.0):
        plain = diffusion_terms(model, scheduler, batch, mask_weight=mask_weight).per_sample
        plain_grads = grads(plain.sum())
        terms = diffusion_terms(model, scheduler, batch, mask_weight=mask_weight,
                                frames_per_segment=FRAMES_PER_SEGMENT, told_weight=3.0, teacher=frozen)
        told_grads = grads(terms.per_sample.sum())
        with torch.no_grad():
            target = x0(batch["told_text"], model if frozen is None else frozen.model)
        model.zero_grad()
        distance = (x0(batch["text"]) - target).pow(2) / (1 - a)  # (B, T, C, h, w)
        later = distance[:, FRAMES_FIRST:]
        term = later.flatten(1).mean(dim=1)
        on = batch["loss_mask"][:, FRAMES_FIRST:, None].double()
        term = term + mask_weight * (later * on).sum(dim=(1, 2, 3, 4)) / (on.sum(dim=(1, 2, 3, 4)) * LATENT_CHANNELS)
        term = term * batch["told"]  # the second sample's texts are not its own: nothing
        expected = plain.detach().double() + 3.0 * term
        torch.testing.assert_close(terms.per_sample.detach().double(), expected, rtol=1e-4, atol=1e-6)
        assert terms.per_sample[0] > plain[0] and terms.per_sample[1] == plain[1]
        # the told estimate passes no gradient back: the gradient is the plain loss's plus the distance's with the
        # told estimate held fixed
        for told_grad, plain_grad, term_grad in zip(told_grads, plain_grads, grads(3.0 * term.sum()), strict=True):
            torch.testing.assert_close(told_grad.double(), plain_grad.double() + term_grad, rtol=1e-3, atol=1e-6)
        total, count = terms.told()  # logged as loss/told
        assert count == 2 * FRAMES_PER_SEGMENT
        torch.testing.assert_close(total.double(), later[0].flatten(1).mean(dim=1).sum(), rtol=1e-4, atol=0)
    if frozen is not None:
        assert all(p.grad is None for p in frozen.parameters())
        assert all(torch.equal(p, b) for p, b in zip(frozen.parameters(), before, strict=True))
        return
    same = {**batch, "told_text": batch["text"], "told": torch.tensor([True, True])}  # told what it was told
    torch.testing.assert_close(diffusion_terms(model, scheduler, same, frames_per_segment=FRAMES_PER_SEGMENT,
                                               told_weight=3.0).per_sample,
                               diffusion_terms(model, scheduler, same).per_sample)
    single = {key: value[:, :FRAMES_FIRST] if key in ("latents", "noise", "frame_timesteps", "frame_noisy",
                                                      "loss_mask") else
              value[:, :1] if key in ("text", "text_mask", "scene_start", "timesteps", "told_text",
                                      "told_text_mask") and value.dim() > 1 else value
              for key, value in batch.items()}
    alone = diffusion_terms(model, scheduler, single, frames_per_segment=FRAMES_PER_SEGMENT, told_weight=3.0)
    torch.testing.assert_close(alone.per_sample, diffusion_terms(model, scheduler, single).per_sample)
    with pytest.raises(ValueError, match="train.told_weight > 0 needs the model's latent_frames_per_segment"):
        diffusion_terms(model, scheduler, batch, told_weight=3.0)
    without = {k: v for k, v in batch.items() if not k.startswith("told")}
    with pytest.raises(ValueError, match=r"train.told_weight > 0 needs the batch's told_text \(data.told_cache\)"):
        diffusion_terms(model, scheduler, without, frames_per_segment=FRAMES_PER_SEGMENT, told_weight=3.0)


def test_later_segment_loss_is_the_mean_over_noisy_frames_after_segment_one():
    """LossTerms.later_segments: the (sum, count) that training logs as loss/later_segments."""
    from pipeline.training import diffusion_terms

    batch = collate(NoiseConfig(uniform=0.0, context=1.0, context_first=0.0, context_rate=0.5))
    terms = diffusion_terms(Recorder(torch.randn(batch["latents"].shape)), make_scheduler("ddim"), batch)
    total, count = terms.later_segments(N, FRAMES_PER_SEGMENT)
    later = batch["frame_noisy"][:, FRAMES_FIRST:]
    assert count == later.sum() and 0 < count < later.numel()  # some later segments were drawn clean
    torch.testing.assert_close(total, terms.per_frame[:, FRAMES_FIRST:][later].sum())
    torch.testing.assert_close(terms.per_sample, terms.per_frame.sum(1) / batch["frame_noisy"].sum(1))


def test_video_gate_magnitude_reads_the_video_gates_only(model):
    from pipeline.training.logging import video_gate_magnitude

    assert video_gate_magnitude(tiny_transformer(seed=0)) is None  # no TTT
    model = copy.deepcopy(model)  # the module's fixture stays as it is
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.gate_forward_video.fill_(0.2)
            block.gate_reverse_video.fill_(-0.2)
            block.gate_forward_text.fill_(3.0)
    assert video_gate_magnitude(model) == pytest.approx(math.tanh(0.2), rel=1e-6)
