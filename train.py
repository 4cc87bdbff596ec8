"""Fine-tune CogVideoX with TTT layers on n-segment sequences (one stage of the 3 s → 63 s curriculum).

    accelerate launch [--config_file configs/accelerate/fsdp_8gpu.yaml] train.py \
        --config configs/cogvideox-5b-ttt-mlp/9s.yaml [key=value ...] [--resume latest|STEP|DIR]

Config → build → loop → save. Run `python -m pipeline.data.precompute --config <same config>` first; docs/training.md
has the recipe, the Accelerate configs and the memory table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.data import DatasetError, EpochSampler, SequenceDataset, batch_stream, shape_fields
from pipeline.pipeline_ttt_video import TTTVideoPipeline
from pipeline.training import (
    Checkpointer,
    DiffusionCollate,
    build_components,
    build_optimizer,
    build_scheduler,
    diffusion_loss,
    ema_weights,
    export_pipeline,
    full_transformer,
    training_scheduler,
    validate,
)
from pipeline.training.components import torch_dtype
from pipeline.training.config import Config, ConfigError, load_config, save_config, to_dict
from pipeline.training.parallel import context_parallel_mesh, data_parallel_size, prepare_loader

logger = logging.getLogger("train")


def main(argv: list[str] | None = None) -> None:
    # 1. config
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML under configs/")
    parser.add_argument("--resume", help='"latest", a step number or a checkpoint folder')
    parser.add_argument("--stop-after", type=int, help="save a checkpoint and stop after this many steps in this run "
                        "(for jobs with a time limit; continue with --resume latest)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=2e-5 train.steps=100")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 2. build
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)  # the same TTT initialisation on every process
    parts = build_components(cfg.model, cfg.train, ("scheduler", "transformer"))
    model, sampler_scheduler = parts["transformer"], parts["scheduler"]
    mesh = context_parallel_mesh(cfg.parallel, accelerator)  # None without context parallelism
    if mesh is not None:
        model.enable_context_parallel(mesh["cp"])
    fsdp = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if fsdp is not None and fsdp.activation_checkpointing and model.is_gradient_checkpointing:
        model.disable_gradient_checkpointing()  # FSDP checkpoints every wrapped block already
        logger.info("FSDP activation checkpointing is on: diffusers' gradient checkpointing is left off")
    noise_scheduler = training_scheduler(sampler_scheduler)
    dataset = SequenceDataset(cfg.data.root, cfg.data.cache, cfg.data.segments, cfg.data.stride,
                              cfg.data.text_dropout, expected=expected_manifest(cfg, model))
    loader = DataLoader(dataset, batch_size=cfg.train.micro_batch_size, sampler=EpochSampler(len(dataset), cfg.seed),
                        collate_fn=DiffusionCollate(noise_scheduler.config.num_train_timesteps, dataset.scaling_factor),
                        num_workers=cfg.data.num_workers, drop_last=True, pin_memory=torch.cuda.is_available())
    optimizer = build_optimizer(model, cfg.optim)
    lr_scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    loader = prepare_loader(accelerator, loader, mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = None
    if cfg.train.ema:
        ema = EMAModel(trainable, decay=cfg.train.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    checkpointer = Checkpointer(accelerator, cfg, model)
    step = checkpointer.load(args.resume) if args.resume else 0
    accumulation = accelerator.gradient_accumulation_steps
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    accelerator.init_trackers(cfg.log.project, config=flat_config(cfg))
    logger.info("training %d parameters (%s) for %d steps: global batch %d = %d per process x %d accumulation x %d "
                "processes%s", sum(p.numel() for p in trainable), cfg.train.trainable, cfg.train.steps,
                cfg.train.global_batch_size, cfg.train.micro_batch_size, accumulation,
                data_parallel_size(cfg.parallel, accelerator.num_processes),
                f" (x {cfg.parallel.context} context-parallel ranks each)" if mesh is not None else "")

    # 3. loop
    batches = batch_stream(loader, start=step * accumulation)
    pipe = None  # built at the first validation
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    loss_sum = torch.zeros((), device=accelerator.device)
    first_bad_step = torch.full((), -1, device=accelerator.device)  # checked on log/save steps: no per-step sync
    grad_norm = None
    steps_since_log, last_log = 0, time.perf_counter()
    stop_at = cfg.train.steps if args.stop_after is None else min(cfg.train.steps, step + args.stop_after)
    while step < stop_at:
        for _ in range(accumulation):
            batch = next(batches)
            with accelerator.accumulate(model):
                loss = diffusion_loss(model, noise_scheduler, batch).mean()
                accelerator.backward(loss * cfg.parallel.context)  # pipeline/training/parallel.py: why x cp
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() / accumulation
        lr_scheduler.step()
        if ema is not None:
            ema.step(trainable)
        step += 1
        steps_since_log += 1
        bad = ~torch.isfinite(loss_sum if grad_norm is None else loss_sum + grad_norm)
        first_bad_step = torch.where(bad & (first_bad_step < 0), step, first_bad_step)
        bar.update()

        last = step == cfg.train.steps
        should_log = step % cfg.log.every == 0 or step == stop_at
        should_save = (step == stop_at and not last) or (
            cfg.checkpoint.every > 0 and (step % cfg.checkpoint.every == 0 or last))
        should_validate = cfg.validation.every > 0 and bool(cfg.validation.storyboards) and (
            step % cfg.validation.every == 0 or last)
        if should_log or should_save or should_validate:
            stop_if_not_finite(accelerator, first_bad_step, checkpointer)
        if should_log:
            mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / steps_since_log
            seconds = (time.perf_counter() - last_log) / steps_since_log
            logs = {"loss": mean_loss, "step_time": seconds,
                    **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups}}
            if grad_norm is not None:  # DeepSpeed clips inside its engine and reports no norm here
                logs["grad_norm"] = accelerator.reduce(grad_norm, reduction="mean").item()
            accelerator.log(logs, step=step)
            if accelerator.is_main_process:  # the same numbers as plain text, for scripts and grep
                with open(Path(cfg.output_dir) / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **logs}) + "\n")
            bar.set_postfix(loss=f"{mean_loss:.4g}", s_per_step=f"{seconds:.2f}")
            loss_sum.zero_()
            steps_since_log, last_log = 0, time.perf_counter()
        if should_save:
            checkpointer.save(step)
        if should_validate:
            if pipe is None:
                pipe = build_pipeline(cfg, accelerator, model, sampler_scheduler)
            with ema_weights(ema, trainable):
                validate(pipe, accelerator, cfg.validation, Path(cfg.output_dir) / "validation", step)
    bar.close()
    if step < cfg.train.steps:
        logger.info("stopped after step %d of %d (--stop-after); continue with --resume latest", step, cfg.train.steps)
        accelerator.end_training()
        return

    # 4. save
    with ema_weights(ema, trainable):
        final = full_transformer(accelerator, model)
        if accelerator.is_main_process:
            export_pipeline(build_pipeline(cfg, accelerator, final, sampler_scheduler), Path(cfg.output_dir) / "final")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def build_accelerator(cfg: Config) -> Accelerator:
    """Accelerator with gradient accumulation derived from the global batch size and the process count."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, stepped by the loop
        log_with=None if cfg.log.tracker == "none" else cfg.log.tracker,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
    data_parallel = data_parallel_size(cfg.parallel, accelerator.num_processes)
    per_step = cfg.train.micro_batch_size * data_parallel
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size x processes / parallel.context = {cfg.train.micro_batch_size} x "
                          f"{data_parallel}")
    accelerator.gradient_accumulation_steps = cfg.train.global_batch_size // per_step
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # its engine accumulates by its own config
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] = (
            accelerator.gradient_accumulation_steps)
    return accelerator


def expected_manifest(cfg: Config, model) -> dict:
    """What the precompute cache must have been made with for this model and config (pipeline.data.SHAPE_FIELDS)."""
    c = model.config
    return shape_fields(cfg.data, max_text_length=c.max_text_seq_length, latent_frames_first=c.latent_frames_first,
                        latent_frames_per_segment=c.latent_frames_per_segment, latent_channels=c.in_channels,
                        text_embed_dim=c.text_embed_dim)


def build_pipeline(cfg: Config, accelerator: Accelerator, model, scheduler) -> TTTVideoPipeline:
    """The sampling pipeline around the (unwrapped) trained transformer; tokenizer, text encoder and VAE are loaded
    here, on the CPU, only when validation or the export needs them."""
    parts = build_components(cfg.model, cfg.train, ("tokenizer", "text_encoder", "vae"))
    dtype = torch_dtype(cfg.train.mixed_precision) if accelerator.device.type == "cuda" else torch.float32
    return TTTVideoPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"].to(dtype),
                            vae=parts["vae"].to(dtype), transformer=accelerator.unwrap_model(model),
                            scheduler=scheduler, fps=cfg.data.fps)


def stop_if_not_finite(accelerator: Accelerator, first_bad_step: torch.Tensor, checkpointer: Checkpointer) -> None:
    """Raise, naming the step, if any process saw a non-finite loss or gradient norm (nothing is saved then)."""
    steps = accelerator.gather(first_bad_step[None])
    if (steps >= 0).any():
        bad = int(steps[steps >= 0].min().item())
        saved = checkpointer.steps()
        last_good = checkpointer.path(saved[-1]) if saved else "none"
        raise FloatingPointError(f"non-finite loss or gradient norm at step {bad}; stopping without saving "
                                 f"(last good checkpoint: {last_good})")


def flat_config(cfg: Config) -> dict:
    """The config as flat scalars for trackers' hyperparameter tables (lists as strings)."""

    def walk(section: dict, prefix: str):
        for key, value in section.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}/")
            else:
                yield f"{prefix}{key}", value if isinstance(value, (int, float, str, bool)) else str(value)

    return dict(walk(to_dict(cfg), ""))


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DatasetError, FileNotFoundError) as e:  # bad input: one line naming it, no traceback
        sys.exit(f"train.py: error: {e}")
