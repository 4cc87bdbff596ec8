"""Training: the loss, parameter groups and schedule, learning on tiny random components, checkpoints, and train.py
end to end (resume, two processes, FSDP on a CPU mesh, non-finite stop, export → sample.py)."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import other as accelerate_other
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tiny_training import CONFIG, cpu_launch, debug_overrides, prepared

from pipeline.data import DatasetError, SequenceDataset
from pipeline.pipeline_ttt_video import TTTVideoPipeline
from pipeline.training import (
    Checkpointer,
    CheckpointError,
    DiffusionCollate,
    MetricLogger,
    build_components,
    build_optimizer,
    build_scheduler,
    diffusion_loss,
    ema_weights,
    export_pipeline,
    param_groups,
    training_scheduler,
)
from pipeline.training.config import ConfigError, load_config
from pipeline.training.optim import no_weight_decay_names
from pipeline.training.setup import build_loader, build_replay_loader, check_cache_vae
from pipeline.video_io import read_video
from train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
RUN = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=2", "log.every=1", "validation.every=0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("tiny"))


def config(base, *overrides):
    return load_config(CONFIG, [*debug_overrides(base), *overrides])


def build(base, *overrides):
    cfg = config(base, *overrides)
    parts = build_components(cfg.model, cfg.train, ("scheduler", "transformer"))
    return cfg, parts["transformer"], training_scheduler(parts["scheduler"])


def fixed_batch(base, size=2):
    dataset = SequenceDataset(base / "dataset", base / "cache", segments=2)
    return DiffusionCollate(1000, dataset.scaling_factor)([dataset[(i, 100 + i)] for i in range(size)])


def test_a_builder_named_by_module_makes_components_from_scratch(base):
    """model.builder=tiny_training:tiny imports the module that registers it and builds the same tiny components in
    code that the "pretrained" builder reads from the saved directory."""
    _, from_dir, _ = build(base)
    cfg = config(base, "model.builder=tiny_training:tiny")
    parts = build_components(cfg.model, cfg.train, ("scheduler", "transformer"))
    made = dict(parts["transformer"].named_parameters())
    for name, p in from_dir.named_parameters():
        if name not in from_dir.added_parameter_names():  # the TTT layers are initialised at random by both
            assert torch.equal(p, made[name]), name
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        build_components(config(base, "model.builder=no_such_module:x").model, cfg.train)
    with pytest.raises(ConfigError, match="expected one of .*'pretrained'.* got 'nothing'"):
        build_components(config(base, "model.builder=nothing").model, cfg.train)


# the objective


def test_noise_schedule_is_cogvideox(base):
    _, _, scheduler = build(base)
    c = scheduler.config
    assert (c.beta_start, c.beta_end, c.beta_schedule, c.num_train_timesteps) == (0.00085, 0.012, "scaled_linear", 1000)
    assert c.prediction_type == "v_prediction" and c.rescale_betas_zero_snr
    assert scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR


def test_loss_is_weighted_x0_error_and_equals_v_error(base):
    """diffusion_loss = mean(1 / (1 - ᾱ_t) (x0_pred - x0)^2), which is the v-prediction error written out by hand."""
    _, model, scheduler = build(base)
    model.eval()
    batch = fixed_batch(base)
    with torch.no_grad():
        loss = diffusion_loss(model, scheduler, batch)
        x0, eps, t = batch["latents"], batch["noise"], batch["timesteps"]
        a = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = model(x_t, batch["text"], t, encoder_attention_mask=batch["text_mask"],
                  scene_start=batch["scene_start"]).sample
        v_target = a.sqrt() * eps - (1 - a).sqrt() * x0
        x0_pred = a.sqrt() * x_t - (1 - a).sqrt() * v
    assert loss.shape == (2,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ((x0_pred - x0) ** 2 / (1 - a)).flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ((v - v_target) ** 2).flatten(1).mean(1), rtol=1e-3, atol=1e-5)


# optimizer and schedule


def test_param_groups(base):
    cfg, model, _ = build(base, "train.trainable=ttt+attn", "optim.lr=1e-5", "optim.ttt_lr=1e-4",
                          "optim.weight_decay=0.01")
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    assert set(groups) == {"base", "base_no_decay", "ttt", "ttt_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*members.values()) == trainable and sum(map(len, members.values())) == len(trainable)
    assert "transformer_blocks.0.attn1.to_q.weight" in members["base"]
    assert "transformer_blocks.0.attn1.to_q.bias" in members["base_no_decay"]
    assert "transformer_blocks.0.attn1.norm_q.weight" in members["base_no_decay"]
    assert "scene_embedding" in members["ttt_no_decay"]
    assert any(".gate_" in n for n in members["ttt_no_decay"]) and not any(".gate_" in n for n in members["ttt"])
    assert (groups["base"]["lr"], groups["ttt"]["lr"]) == (1e-5, 1e-4)
    assert (groups["base"]["weight_decay"], groups["ttt_no_decay"]["weight_decay"]) == (0.01, 0.0)
    assert not any("ff." in n for n in trainable)  # the feed-forward stays frozen in "ttt+attn"


def test_weight_decay_is_chosen_by_module_type(base):
    """adaLN projections decay although "norm" is in their names; norms, biases, gates, TTT LN affine and inner
    biases and the scene embedding do not."""
    cfg, model, _ = build(base, "train.trainable=full", "optim.weight_decay=0.01")
    groups = param_groups(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    block = "transformer_blocks.0."
    for name in (f"{block}norm1.linear.weight", f"{block}norm2.linear.weight", "norm_out.linear.weight",
                 f"{block}attn1.to_q.weight", f"{block}ttt.w1", f"{block}ttt.wq.weight", f"{block}ttt.lr_weight"):
        assert name in decay, name
    for name in (f"{block}norm1.norm.weight", f"{block}norm1.norm.bias", f"{block}norm1.linear.bias",
                 f"{block}attn1.norm_q.weight", "norm_out.norm.weight", "norm_final.weight", f"{block}ttt.ln_weight",
                 f"{block}ttt.ln_bias", f"{block}ttt.b1", f"{block}ttt.b2", f"{block}ttt.lr_bias",
                 f"{block}ttt.post_norm.weight", f"{block}gate_forward_text", f"{block}gate_reverse_video",
                 "scene_embedding"):
        assert name in no_decay, name
    assert all(n in no_decay for n in names.values() if n.endswith(".bias"))

    # FSDP2's fully_shard swaps each wrapped module's class for a subclass of it: the choice must not change
    for module in model.modules():
        if module is model or type(module).__name__ in ("CogVideoXTTTBlock", "TTTLayer"):
            module.__class__ = type(f"FSDP{type(module).__name__}", (type(module),), {})
    assert no_weight_decay_names(model) == no_decay


def test_8bit_adamw_needs_bitsandbytes(base):
    cfg, model, _ = build(base, "optim.use_8bit=true")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="optim.use_8bit needs bitsandbytes: pip install bitsandbytes"):
            build_optimizer(model, cfg.optim)
    else:
        assert type(build_optimizer(model, cfg.optim)).__name__ == "AdamW8bit"


def test_ema_follows_its_decay_schedule_swaps_in_and_out_and_is_checkpointed(base, tmp_path):
    """The EMA as train.py builds it (EMAModel(trainable, decay=train.ema_decay), one step per optimizer step) against
    an EMA computed by hand: diffusers' schedule copies the weights at step 1, then decays by min(decay, s / (s + 9))
    at step s, so several steps with a small decay exercise both the warm-up and the cap."""
    cfg, model, _ = build(base, "train.trainable=ttt", "train.ema=true", "train.ema_decay=0.3",
                          f"output_dir={tmp_path}")
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=cfg.train.ema_decay)
    generator = torch.Generator().manual_seed(0)
    expected = None
    for s in range(1, 6):
        with torch.no_grad():  # a stand-in optimizer step
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator))
        ema.step(params)
        decay = 0.0 if s == 1 else min(0.3, s / (s + 9))  # 0, 2/11, 3/12, then the cap 0.3 (4/13 > 0.3)
        current = [p.detach().clone() for p in params]
        expected = current if expected is None else [decay * e + (1 - decay) * c for e, c in zip(expected, current)]
    for shadow, e, p in zip(ema.shadow_params, expected, params):
        torch.testing.assert_close(shadow, e, rtol=1e-6, atol=1e-6)
        assert (shadow - p).abs().max() > 0.1  # so the swap below can tell the EMA from the weights

    raw = [p.detach().clone() for p in params]
    with ema_weights(ema, params):
        for p, e in zip(params, expected):
            torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-6)
    for p, r in zip(params, raw):
        assert torch.equal(p, r)  # restored
    checkpointer = Checkpointer(accelerator, cfg, model, ema=ema)
    checkpointer.save(1)
    for shadow in ema.shadow_params:
        shadow.zero_()
    checkpointer.load("1")
    for shadow, e in zip(ema.shadow_params, expected):
        torch.testing.assert_close(shadow, e, rtol=1e-6, atol=1e-6)


def train_steps(model, optimizer, lr_scheduler, ema, scheduler, batch, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        diffusion_loss(model, scheduler, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        lr_scheduler.step()
        ema.step(params)


def test_resumed_ema_equals_the_uninterrupted_runs_and_stays_on_the_models_device(base, tmp_path):
    """Resume restores the EMA into the live shadow tensors (which follow the model's device: on CUDA the old order,
    ema.to(device) before loading, left them on the CPU) and continues it exactly."""
    batch = fixed_batch(base)
    runs = {}
    for name in ("whole", "resumed"):
        torch.manual_seed(0)  # the same TTT initialisation in both
        cfg, model, scheduler = build(base, "train.trainable=ttt", f"output_dir={tmp_path / 'out'}",
                                      "optim.warmup_steps=0", "optim.lr=1e-2", "optim.ttt_lr=1e-2")
        accelerator = Accelerator(cpu=True)
        optimizer = build_optimizer(model, cfg.optim)
        lr_scheduler = build_scheduler(optimizer, cfg.optim, 4)
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        ema = EMAModel([p for p in model.parameters() if p.requires_grad], decay=0.9)
        checkpointer = Checkpointer(accelerator, cfg, model, optimizer, lr_scheduler, ema)
        if name == "whole":
            train_steps(model, optimizer, lr_scheduler, ema, scheduler, batch, 2)
            checkpointer.save(2)
        else:
            live = [s.data_ptr() for s in ema.shadow_params]
            assert checkpointer.start("latest") == 2
            assert [s.data_ptr() for s in ema.shadow_params] == live  # loaded in place, not replaced
        train_steps(model, optimizer, lr_scheduler, ema, scheduler, batch, 2)
        runs[name] = ema
    whole, resumed = runs["whole"], runs["resumed"]
    assert whole.optimization_step == resumed.optimization_step == 4
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b, p in zip(whole.shadow_params, resumed.shadow_params, params):
        assert b.device == p.device
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_warmup_then_cosine_to_min_lr(base):
    """The 3 s recipe: base 1e-5 constant, TTT 1e-4 cosine down to 1e-5, after a linear warmup."""
    cfg, model, _ = build(base, "train.trainable=full", "optim.lr=1e-5", "optim.ttt_lr=1e-4", "optim.schedule=cosine",
                          "optim.min_lr=1e-5", "optim.warmup_steps=10")
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
    assert lrs[0]["ttt"] == pytest.approx(1e-5) and lrs[4]["base"] == pytest.approx(5e-6)  # warmup (step + 1) / 10
    assert lrs[10]["ttt"] == pytest.approx(1e-4) and lrs[10]["base"] == pytest.approx(1e-5)
    assert lrs[60]["ttt"] == pytest.approx(5.5e-5)  # half way down the cosine
    assert lrs[110]["ttt"] == pytest.approx(1e-5) and lrs[110]["base"] == pytest.approx(1e-5)
    assert all(a["ttt"] >= b["ttt"] for a, b in zip(lrs[10:], lrs[11:]))


# learning


@pytest.mark.parametrize("trainable", ["ttt", "lora"])
def test_steps_lower_the_loss_and_train_only_the_chosen_parameters(base, trainable):
    cfg, model, scheduler = build(base, f"train.trainable={trainable}", "train.lora_rank=4", "train.lora_alpha=4",
                                  "optim.lr=1e-2", "optim.ttt_lr=1e-2", "optim.warmup_steps=0",
                                  "train.gradient_checkpointing=false")
    batch = fixed_batch(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim)
    losses = []
    for _ in range(8):
        loss = diffusion_loss(model, scheduler, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        final = diffusion_loss(model, scheduler, batch).mean().item()
    trajectory = losses + [final]
    assert all(b < a for a, b in zip(trajectory, trajectory[1:])) and final < 0.95 * losses[0], trajectory
    ttt = set(model.added_parameter_names())
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        chosen = name in ttt or (trainable == "lora" and "lora_" in name)
        if chosen and "lora_A" not in name:  # LoRA's A starts random, B at zero: A moves only once B has
            assert p.requires_grad
        if not chosen:
            assert not p.requires_grad and not moved, name
    assert any("lora_B" in n for n in before) == (trainable == "lora")
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if ".ttt.w" in n)


# checkpoints


def test_checkpoints_rotate_store_trainable_only_and_restore(base, tmp_path):
    cfg, model, _ = build(base, "train.trainable=ttt", f"output_dir={tmp_path}", "checkpoint.keep=2")
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(accelerator, cfg, model)
    for step in (1, 2, 3):
        checkpointer.save(step)
    assert checkpointer.steps() == [2, 3]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    saved = checkpointer.path(3)
    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert stored == {n for n, p in model.named_parameters() if p.requires_grad} == set(model.added_parameter_names())
    assert load_config(saved / "config.yaml") == cfg
    assert json.loads((saved / "trainer_state.json").read_text()) == {"step": 3}

    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert checkpointer.load("latest") == 3
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), trained[n]), n
    assert checkpointer.load("2") == 2
    with pytest.raises(FileNotFoundError, match=r"available steps: \[2, 3\]"):
        checkpointer.resolve("7")

    # a checkpoint whose weights are not exactly the trainable parameters (another trainable mode) must not load
    weights = load_file(saved / "model.safetensors")
    save_file(dict(list(weights.items())[1:]), saved / "model.safetensors")
    with pytest.raises(ValueError, match="do not match the trainable parameters"):
        checkpointer.load("3")


def checkpointer_for(base, tmp_path, *overrides):
    cfg, model, _ = build(base, "train.trainable=ttt", f"output_dir={tmp_path}", *overrides)
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, cfg.optim)
    lr_scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    return Checkpointer(accelerator, cfg, model, optimizer, lr_scheduler)


def test_a_new_run_refuses_a_folder_holding_another_run(base, tmp_path):
    """Rotation would delete the new run's checkpoints (the old ones have later steps) and --resume latest would pick
    the old run: a new run refuses the folder unless told to overwrite it."""
    checkpointer_for(base, tmp_path).save(5)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=rf"output_dir={tmp_path} holds another run \(checkpoints of steps \[5\]\); "
                       "continue it with --resume latest, choose a new output_dir, or pass --overwrite"):
        checkpointer_for(base, tmp_path).start(None)
    assert checkpointer_for(base, tmp_path).start(None, overwrite=True) == 0
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert checkpointer_for(base, tmp_path).start(None) == 0  # an empty folder is fine


def test_resume_refuses_changed_training_keys_unless_allowed_and_then_applies_them(base, tmp_path, caplog):
    first = checkpointer_for(base, tmp_path, "optim.lr=1e-3", "optim.ttt_lr=1e-3", "optim.warmup_steps=0",
                             "optim.schedule=constant", "log.every=1")
    first.optimizer.step()
    first.lr_scheduler.step()
    first.save(1)
    with pytest.raises(ConfigError) as e:
        checkpointer_for(base, tmp_path, "optim.lr=2e-3", "optim.ttt_lr=1e-3", "optim.warmup_steps=0",
                         "optim.schedule=constant", "log.every=5", "data.segments=3").start("latest")
    message = str(e.value)
    assert "training-defining keys: data.segments: 2 in the checkpoint, 3 now; optim.lr: 0.001 in the checkpoint, " \
           "0.002 now;" in message and "--allow-config-change data.segments,optim.lr" in message
    assert "log.every" not in message  # runtime-only: may change

    resumed = checkpointer_for(base, tmp_path, "optim.lr=2e-3", "optim.ttt_lr=1e-3", "optim.warmup_steps=0",
                               "optim.schedule=constant", "log.every=5", "optim.weight_decay=0.5")
    with caplog.at_level("WARNING"):
        assert resumed.start("latest", allow_changes=("optim",)) == 1
    assert "log.every: 1 in the checkpoint, 5 now (runtime-only)" in caplog.text
    groups = {g["name"]: g for g in resumed.optimizer.param_groups}
    assert groups["ttt"]["lr"] == 1e-3
    assert groups["ttt"]["weight_decay"] == 0.5  # the new values, not the checkpoint's
    resumed.lr_scheduler.step()
    assert groups["ttt"]["lr"] == 1e-3 and resumed.lr_scheduler.scheduler.base_lrs[0] == 1e-3


def test_base_lr_change_is_applied_on_resume(base, tmp_path):
    first = checkpointer_for(base, tmp_path, "train.trainable=ttt+attn", "optim.lr=1e-3", "optim.warmup_steps=0",
                             "optim.schedule=constant")
    first.save(1)
    resumed = checkpointer_for(base, tmp_path, "train.trainable=ttt+attn", "optim.lr=2e-3", "optim.warmup_steps=0",
                               "optim.schedule=constant")
    resumed.start("1", allow_changes=("optim.lr",))
    assert {g["name"]: g["lr"] for g in resumed.optimizer.param_groups}["base"] == 2e-3


def test_leftover_temporaries_of_a_killed_run_are_removed_at_start(base, tmp_path):
    checkpointer = checkpointer_for(base, tmp_path)
    killed = [tmp_path / "checkpoints" / ".tmp-step-00000004", tmp_path / ".final.k3j2x9", tmp_path / ".final.old.a1"]
    for folder in killed:
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "half.safetensors").write_bytes(b"\0" * 10)
    assert checkpointer.start(None) == 0
    assert not any(folder.exists() for folder in killed)


@pytest.mark.parametrize("module, write, error", [
    (torch, "save", OSError(errno.ENOSPC, "No space left on device")),  # the optimizer state, RNG states
    (accelerate_other, "safe_save_file", SafetensorError(  # the model weights: safetensors' Rust error has no errno
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')),
], ids=["torch.save", "safetensors"])
def test_a_full_disk_while_saving_is_one_line(base, tmp_path, monkeypatch, module, write, error):
    checkpointer = checkpointer_for(base, tmp_path)
    checkpointer.save(1)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, write, full)
    with pytest.raises(CheckpointError, match=r"no space left on device while saving checkpoint step 2 under "
                       rf"{tmp_path / 'checkpoints'}; free space .* \(last complete checkpoint: "
                       rf"{checkpointer.path(1)}\)"):
        checkpointer.save(2)
    assert checkpointer.steps() == [1] and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


def test_metrics_resume_without_duplicates_and_nan_stop_names_the_batch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    accelerator = Accelerator(cpu=True)
    metrics = MetricLogger(accelerator, tmp_path, every=1, total=6, start=2, stop_at=6)  # resumed at step 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    for step, loss in ((3, 1.0), (4, float("nan"))):
        metrics.record(step, torch.tensor(loss), torch.tensor(0.5), [f"clips/v{step}.mp4 segments 0-1 (cache x)"], 1)
        metrics.step_done(step)
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient norm at step 4 \(batch items: "
                       r"clips/v4.mp4 segments 0-1 \(cache x\)\); stopping without saving \(this run's last "
                       r"checkpoint: out/checkpoints/step-00000002\)"):
        metrics.stop_if_not_finite(Path("out/checkpoints/step-00000002"))


def test_export_fuses_lora_into_a_loadable_pipeline(base, tmp_path):
    cfg, model, scheduler = build(base, "train.trainable=lora", "train.lora_rank=4", "train.lora_alpha=4")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: give the adapter an effect to keep
                p.normal_(0.0, 0.1)
    model.eval()
    batch = fixed_batch(base, size=1)
    inputs = dict(hidden_states=batch["latents"], encoder_hidden_states=batch["text"], timestep=batch["timesteps"],
                  encoder_attention_mask=batch["text_mask"], scene_start=batch["scene_start"])
    with torch.no_grad():
        expected = model(**inputs).sample
        model.disable_lora()
        without = model(**inputs).sample
        model.enable_lora()
    assert not torch.allclose(expected, without)
    parts = build_components(cfg.model, cfg.train, ("tokenizer", "text_encoder", "vae", "scheduler"))
    export_pipeline(TTTVideoPipeline(transformer=model, fps=cfg.data.fps, **parts), tmp_path / "final")
    assert not (tmp_path / ".final.tmp").exists()
    loaded = TTTVideoPipeline.from_pretrained(tmp_path / "final")
    assert not any("lora" in n for n, _ in loaded.transformer.named_parameters())
    assert loaded.config.fps == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.transformer(**inputs).sample, expected, rtol=1e-4, atol=1e-5)


# train.py end to end


def run(args, processes=1, check=True):
    if processes == 1:
        command = [sys.executable, "train.py", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    else:
        launch, env = cpu_launch(processes)
        command = [*launch, "train.py", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return result


def metrics(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {entry["step"]: entry for entry in map(json.loads, lines)}


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """train.py on the debug config, 4 steps of global batch 2: uninterrupted (1 process, accumulation 2, with
    validation and export), interrupted after step 2 and resumed, and with 2 processes (no accumulation)."""
    tmp = tmp_path_factory.mktemp("runs")
    common = ["--config", str(CONFIG), *debug_overrides(base), *RUN]
    out = {name: tmp / name for name in ("whole", "resumed", "two")}
    run([*common, f"output_dir={out['whole']}", "validation.every=4", "validation.memory_guidance_scale=1.5",
         "validation.memory_guidance_segments=continuing", "validation.memory_guidance_baseline=no_ttt"])
    run([*common, f"output_dir={out['resumed']}", "--stop-after", "2"])
    assert sorted(metrics(out["resumed"])) == [1, 2]
    run([*common, f"output_dir={out['resumed']}", "--resume", "latest"])
    two = run([*common, f"output_dir={out['two']}"], processes=2)
    assert "global batch 2 = 1 per process x 1 accumulation x 2 processes" in two.stderr
    return out


def test_resume_continues_exactly(runs):
    whole, resumed = metrics(runs["whole"]), metrics(runs["resumed"])
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-6, abs=1e-9), step
        assert resumed[step]["grad_norm"] == pytest.approx(whole[step]["grad_norm"], rel=1e-6), step
        assert resumed[step]["lr/ttt"] == pytest.approx(whole[step]["lr/ttt"], rel=1e-12)
    a = load_file(runs["whole"] / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(runs["resumed"] / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name in a:
        # CPU BLAS results may differ in the last bit between processes (memory alignment); Adam divides a gradient
        # by its own size, so where a gradient is ~0 that bit can move a weight by far less than a step (lr 1e-3+)
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_two_processes_match_one(runs):
    """Per-sample seeds make a global batch the same whether one process accumulates it or two share it."""
    whole, two = metrics(runs["whole"]), metrics(runs["two"])
    for step in (1, 2, 3, 4):
        assert two[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-4), step
    a = load_file(runs["whole"] / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(runs["two"] / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def replay_runs(base, tmp_path_factory):
    """train.py on the debug config with data.replay.every=2 (steps 2 and 4 replay single segments), 4 steps:
    uninterrupted, and stopped after step 2 (one sequence step and one replay done) then resumed."""
    tmp = tmp_path_factory.mktemp("replay")
    common = ["--config", str(CONFIG), *debug_overrides(base), *RUN, "data.replay.every=2",
              "data.replay.micro_batch_size=2"]
    out = {name: tmp / name for name in ("whole", "resumed")}
    run([*common, f"output_dir={out['whole']}"])
    run([*common, f"output_dir={out['resumed']}", "--stop-after", "2"])
    run([*common, f"output_dir={out['resumed']}", "--resume", "latest"])
    return out


def test_replay_steps_log_apart_and_resume_exactly(replay_runs):
    whole, resumed = metrics(replay_runs["whole"]), metrics(replay_runs["resumed"])
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 3):  # the stage's 2-segment sequences
        assert "loss" in whole[step] and "loss/later_segments" in whole[step] and "loss/replay" not in whole[step]
    for step in (2, 4):  # single segments: no later segments to measure
        assert "loss/replay" in whole[step] and "loss" not in whole[step] and "loss/later_segments" not in whole[step]
    for step in (1, 2, 3, 4):  # the resumed run drew the same batches from both streams
        key = "loss/replay" if step % 2 == 0 else "loss"
        assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6, abs=1e-9), step
        assert resumed[step]["grad_norm"] == pytest.approx(whole[step]["grad_norm"], rel=1e-6), step
    a = load_file(replay_runs["whole"] / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(replay_runs["resumed"] / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_replay_loader_gives_single_segments_at_every_level_with_the_replay_caches_texts(base, tmp_path):
    """Latents from data.cache, texts from data.replay.cache (here a copy whose texts are marked by their video
    and segment), one noise level per segment even when the stage's own noise is per segment."""
    dense = tmp_path / "dense"
    shutil.copytree(base / "cache", dense)
    items = sorted(p for p in dense.rglob("*.safetensors") if p.name != "null.safetensors")
    for v, path in enumerate(items):
        tensors = load_file(path)
        n = tensors["text"].shape[0]
        tensors["text"] = (1000.0 * (v + 1) + torch.arange(n, dtype=torch.float32))[:, None, None].expand_as(
            tensors["text"]).contiguous()
        save_file(tensors, path)
    cfg, model, scheduler = build(base, "data.replay.every=2", f"data.replay.cache={dense}",
                                  "data.replay.micro_batch_size=3", "data.text_dropout=0",
                                  "train.noise.uniform=0", "train.noise.context=1")
    loader = build_replay_loader(cfg, model, scheduler.config.num_train_timesteps)
    main = next(iter(build_loader(cfg, model, scheduler.config.num_train_timesteps)))
    assert main["timesteps"].shape == (1, 2)  # the stage's own loader: a level per segment
    seen = set()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            assert batch["text"].shape[:2] == (3, 1) and batch["timesteps"].shape == (3,)
            assert batch["latents"].shape[1] == model.config.latent_frames_first
            for text, name in zip(batch["text"], batch["names"]):
                marker = float(text[0, 0, 0])
                assert marker >= 1000 and text.eq(marker).all(), name  # the replay cache's text, whole
                segment = int(re.search(r"segments (\d+)-\1 ", name).group(1))
                assert marker % 1000 == segment, name
                seen.add(name)
    assert len(seen) > 3  # segments of several videos and positions
    assert build_replay_loader(config(base), model, 1000) is None
    default = build_replay_loader(config(base, "data.replay.every=2"), model, 1000)
    assert default.batch_size == 2 * 1  # data.segments x train.micro_batch_size: the tokens of one of the stage's


def test_checkpoints_validation_and_export(runs, tmp_path):
    whole = runs["whole"]
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert load_config(whole / "config.yaml") == load_config(whole / "checkpoints" / "step-00000004" / "config.yaml")
    frames, fps = read_video(whole / "validation" / "step-00000004" / "debug.mp4")
    assert frames.shape == (25, 32, 32, 3) and fps == 4  # 2 segments: (4 + 3 - 1) latent frames x 4 + 1
    assert list((whole / "logs").rglob("events.out.tfevents.*"))

    # the export holds the trained weights: those of the last checkpoint
    exported = load_file(whole / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = load_file(whole / "checkpoints" / "step-00000004" / "model.safetensors")
    assert trained and set(trained) <= set(exported)
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name

    # ... and sample.py renders with it, at the config's validation guidance (debug.yaml: 2, not the default 6) and
    # memory guidance (the run's: 1.5 on the segments that continue a scene, away from the prediction without TTT)
    index = json.loads((whole / "final" / "model_index.json").read_text())
    assert index["guidance_scale"] == 2.0
    assert index["memory_guidance_scale"] == 1.5 and index["memory_guidance_segments"] == "continuing"
    assert index["memory_guidance_baseline"] == "no_ttt"
    out = tmp_path / "story.mp4"
    result = subprocess.run([sys.executable, "sample.py", "--model", str(whole / "final"), "--storyboard",
                             "configs/storyboards/debug.json", "--output", str(out), "--steps", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("2 steps at guidance 2, memory guidance 1.5 on the segments that continue a scene (away from no TTT),"
            in result.stdout)
    frames, fps = read_video(out)
    assert frames.shape == (25, 32, 32, 3) and fps == 4


def test_next_stage_starts_from_the_export(runs, base):
    """model.init_from (the next curriculum stage) loads the exported transformer; runtime TTT settings may change,
    structural ones must match."""
    final = runs["whole"] / "final"
    cfg = config(base, f"model.init_from={final}", "model.ttt.checkpoint_ttt=true", "train.trainable=ttt+attn")
    transformer = build_components(cfg.model, cfg.train, ("transformer",))["transformer"]
    assert transformer.config.checkpoint_ttt
    exported = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    for name, p in transformer.named_parameters():
        assert torch.equal(p.detach(), exported[name]), name
    cfg = config(base, f"model.init_from={final}", "model.ttt.ttt_type=linear")
    with pytest.raises(ConfigError, match="ttt_type='linear' \\(init_from has 'mlp'\\)"):
        build_components(cfg.model, cfg.train, ("transformer",))


def test_non_finite_loss_stops_naming_the_step(base, tmp_path):
    shutil.copytree(base / "cache", tmp_path / "cache")
    for item in (tmp_path / "cache" / "items").iterdir():
        tensors = load_file(item)
        tensors["latent_mean"] = torch.full_like(tensors["latent_mean"], float("nan"))
        save_file(tensors, item)
    result = run(["--config", str(CONFIG), *debug_overrides(base), *RUN, f"data.cache={tmp_path / 'cache'}",
                  f"output_dir={tmp_path / 'out'}", "checkpoint.every=1"], check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: non-finite loss or gradient norm at step 1 (batch items: clips/video")
    assert " segments 0-1 (cache video" in line and line.endswith(
        "; stopping without saving (this run's last checkpoint: none)")
    assert not (tmp_path / "out" / "checkpoints").exists() or not list((tmp_path / "out" / "checkpoints").iterdir())
    assert not (tmp_path / "out" / "final").exists()


def corrupt_cache(tmp_path, base, what):
    cache = tmp_path / "cache"
    shutil.copytree(base / "cache", cache)
    if what == "manifest":
        (cache / "manifest.json").write_text('{"version": 1, "height": ')
    elif what == "other vae":  # as though another VAE had encoded it
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["scaling_factor"] *= 2
        (cache / "manifest.json").write_text(json.dumps(manifest))
    elif what == "null missing":
        (cache / "null.safetensors").unlink()
    else:
        (cache / "null.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return [f"data.cache={cache}"]


BAD_INPUTS = [  # (case, overrides (tmp_path, base), error, message with {tmp} for tmp_path)
    ("pretrained", lambda tmp, base: [f"model.pretrained={tmp / 'nowhere'}"], ConfigError,
     "model.pretrained={tmp}/nowhere: no such directory; expected a diffusers CogVideoX pipeline directory"),
    ("init_from", lambda tmp, base: [f"model.init_from={tmp / 'stage1' / 'final'}"], ConfigError,
     "model.init_from={tmp}/stage1/final: no transformer/config.json there; expected a previous stage's exported"),
    ("log.every", lambda tmp, base: ["log.every=0"], ConfigError, "log.every: expected a number >= 1, got 0"),
    ("micro batch", lambda tmp, base: ["train.micro_batch_size=0"], ConfigError,
     "train.micro_batch_size: expected a number >= 1, got 0"),
    ("steps", lambda tmp, base: ["train.steps=-5"], ConfigError, "train.steps: expected a number >= 1, got -5"),
    ("lr", lambda tmp, base: ["optim.lr=-1e-4"], ConfigError, "optim.lr: expected a number >= 0.0, got -0.0001"),
    ("storyboard", lambda tmp, base: ["validation.every=100", f"validation.storyboards=[{tmp / 'story.json'}]"],
     ConfigError, "validation.storyboards[0]={tmp}/story.json: file not found; expected a storyboard file"),
    ("manifest", lambda tmp, base: corrupt_cache(tmp, base, "manifest"), DatasetError,
     "{tmp}/cache/manifest.json: not valid JSON"),
    ("other vae", lambda tmp, base: corrupt_cache(tmp, base, "other vae"), ConfigError,
     "data.cache={tmp}/cache: its latents were encoded by a VAE with scaling_factor"),
    ("null missing", lambda tmp, base: corrupt_cache(tmp, base, "null missing"), DatasetError,
     "{tmp}/cache/null.safetensors: not found; the precompute did not finish"),
    ("null corrupt", lambda tmp, base: corrupt_cache(tmp, base, "null corrupt"), DatasetError,
     "{tmp}/cache/null.safetensors: unreadable"),
    ("mix cache", lambda tmp, base: [f"data.mix_cache={tmp / 'dense'}", "data.mix_rate=0.25"], DatasetError,
     "{tmp}/dense/manifest.json: not found; run `python -m pipeline.data.precompute"),
    ("replay every 1", lambda tmp, base: ["data.replay.every=1"], ConfigError,
     "data.replay.every: expected 0 (off) or a step interval >= 2, got 1"),
    ("replay single", lambda tmp, base: ["data.replay.every=2", "data.segments=1"], ConfigError,
     "data.replay.every: the stage trains on single segments already (data.segments 1); expected 0"),
    ("replay context", lambda tmp, base: ["data.replay.every=2", "parallel.context=2"], ConfigError,
     "data.replay.every=2: a single segment cannot be split between parallel.context=2 ranks"),
    ("replay cache", lambda tmp, base: ["data.replay.every=2", f"data.replay.cache={tmp / 'dense'}"], DatasetError,
     "{tmp}/dense/manifest.json: not found; run `python -m pipeline.data.precompute"),
]


@pytest.mark.parametrize("case, overrides, error, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_stop_before_the_first_step(base, tmp_path, monkeypatch, case, overrides, error, message):
    """Each is one line naming the key or file and what was expected, raised before any model is loaded."""
    import train

    args = ["--config", str(CONFIG), *debug_overrides(base), *RUN, f"output_dir={tmp_path / 'out'}",
            *overrides(tmp_path, base)]
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))
    with pytest.raises(error) as e:
        train_main(args)
    assert message.format(tmp=tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_fsdp_per_block_wrapping_on_a_cpu_mesh():
    """The GPU configs' FSDP wrapping (one unit per CogVideoXTTTBlock and TTT layer) trains a step on 2 gloo ranks
    exactly as one process does (tests/fsdp_step.py checks loss, gradients and updated weights)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "tests/fsdp_step.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "fsdp ok: 4 units + root" in result.stdout


def test_bad_config_is_one_line_not_a_traceback():
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/debug.yaml", "optim.lrr=1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "train.py: error: unknown config key 'optim.lrr'; known keys under 'optim': lr, ttt_lr")


def test_a_broken_vae_config_in_model_pretrained_is_one_line(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{broken")
    prefix = re.escape(f"model.pretrained={tmp_path}: {tmp_path / 'vae' / 'config.json'} is not a JSON object (")
    with pytest.raises(ConfigError, match=rf"^{prefix}.*\); expected the VAE's config") as e:
        check_cache_vae("data.cache", "cache", {"scaling_factor": 1.0}, str(tmp_path))
    assert "\n" not in str(e.value)
