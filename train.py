"""Fine-tune CogVideoX with TTT layers on n-segment sequences (one stage of the 3 s → 63 s curriculum).

    accelerate launch [--config_file configs/accelerate/fsdp_8gpu.yaml] train.py \
        --config configs/cogvideox-5b-ttt-mlp/9s.yaml [key=value ...] [--resume latest|STEP|DIR]

Config → build → loop → save. Run `python -m pipeline.data.precompute --config <same config>` first; docs/training.md
has the recipe, the Accelerate configs and the memory table.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel

from pipeline.data import DatasetError, batch_stream
from pipeline.training import (
    Checkpointer,
    CheckpointError,
    MetricLogger,
    Validator,
    build_optimizer,
    build_scheduler,
    diffusion_terms,
    export_final,
    training_scheduler,
)
from pipeline.training.config import ConfigError, load_config, save_config
from pipeline.training.parallel import prepare_loader
from pipeline.training.setup import (
    build_accelerator,
    build_loader,
    build_model,
    build_replay_loader,
    check_inputs,
    describe_batch,
    flat_config,
)

logger = logging.getLogger("train")


def main(argv: list[str] | None = None) -> None:
    # 1. config
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)  # paths, storyboards, cache: one-line errors before anything is loaded
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 2. build
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)  # the same TTT initialisation on every process
    model, sampler_scheduler, mesh, teacher = build_model(cfg, accelerator)  # mesh: (dp, cp), None without cp
    noise_scheduler = training_scheduler(sampler_scheduler)
    loader = build_loader(cfg, model, noise_scheduler.config.num_train_timesteps)
    replay_loader = build_replay_loader(cfg, model, noise_scheduler.config.num_train_timesteps)
    optimizer = build_optimizer(model, cfg.optim)
    lr_scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    loader = prepare_loader(accelerator, loader, mesh)  # sharded over dp: a cp group reads the same batches
    if replay_loader is not None:
        replay_loader = prepare_loader(accelerator, replay_loader, mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(trainable, decay=cfg.train.ema_decay) if cfg.train.ema else None  # on the model's device
    checkpointer = Checkpointer(accelerator, cfg, model, optimizer, lr_scheduler, ema)
    step = checkpointer.start(args.resume, args.overwrite, tuple(args.allow_config_change))
    stop_at = cfg.train.steps if args.stop_after is None else min(cfg.train.steps, step + args.stop_after)
    metrics = MetricLogger(accelerator, cfg.output_dir, cfg.log.every, cfg.train.steps, step, stop_at)
    validator = Validator(cfg, accelerator, model, sampler_scheduler, ema, trainable)
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    accelerator.init_trackers(cfg.log.project, config=flat_config(cfg),  # TensorBoard hides events after `step`
                              init_kwargs={"tensorboard": {"purge_step": step + 1}} if step else {})
    accumulation = accelerator.gradient_accumulation_steps
    logger.info("training %d parameters (%s) for %d steps: %s", sum(p.numel() for p in trainable),
                cfg.train.trainable, cfg.train.steps, describe_batch(cfg, accelerator))

    # 3. loop
    frames_per_segment = accelerator.unwrap_model(model).config.latent_frames_per_segment
    every = cfg.data.replay.every  # step s (1-based) replays single segments when s % every == 0
    replayed = step // every if every else 0
    batches = batch_stream(loader, start=(step - replayed) * accumulation)
    replays = batch_stream(replay_loader, start=replayed * accumulation) if replay_loader is not None else None
    while step < stop_at:
        replay = replays is not None and (step + 1) % every == 0
        for _ in range(accumulation):
            batch = next(replays if replay else batches)
            with accelerator.accumulate(model):
                terms = diffusion_terms(model, noise_scheduler, batch, cfg.train.hard_fraction, cfg.train.hard_weight,
                                        cfg.train.mask_weight, cfg.train.mask_dilate, cfg.train.boundary_weight,
                                        frames_per_segment, cfg.train.told_weight, teacher)
                loss = terms.per_sample.mean()
                accelerator.backward(loss * cfg.parallel.context)  # pipeline/training/parallel.py: why x cp
                grad_norm = None
                if accelerator.sync_gradients:  # the last micro-batch of the step
                    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n = batch["text"].shape[1]
            later = terms.later_segments(n, frames_per_segment) if n > 1 else None
            later_masked = terms.later_masked(n, frames_per_segment) if n > 1 else None
            metrics.record(step + 1, loss, grad_norm, batch["names"], accumulation, later, later_masked, replay,
                           terms.boundary(), terms.told())
        lr_scheduler.step()
        if ema is not None:
            ema.step(trainable)
        step += 1
        metrics.step_done(step, replay)
        if metrics.should_log(step) or checkpointer.should_save(step, stop_at) or validator.should_validate(step):
            metrics.stop_if_not_finite(checkpointer.last)  # nothing non-finite is logged, saved or sampled
        metrics.maybe_log(step, optimizer, model)
        checkpointer.maybe_save(step, stop_at)
        validator.maybe_validate(step)
    metrics.close()

    # 4. save
    if step < cfg.train.steps:
        logger.info("stopped after step %d of %d (--stop-after); continue with --resume latest", step, cfg.train.steps)
    else:
        export_final(cfg, accelerator, model, sampler_scheduler, ema, trainable)
    accelerator.end_training()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML under configs/")
    parser.add_argument("--resume", help='"latest", a step number or a checkpoint folder')
    parser.add_argument("--stop-after", type=int, help="save a checkpoint and stop after this many steps in this run "
                        "(for jobs with a time limit; continue with --resume latest)")
    parser.add_argument("--overwrite", action="store_true", help="start a new run in an output_dir that holds "
                        "another run, deleting that run's checkpoints, logs and export")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="KEY[,KEY]",
                        help="on --resume, apply these changed training-defining keys (e.g. optim.lr, or a section "
                        "such as optim) instead of refusing the resume")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=2e-5 train.steps=100")
    args = parser.parse_args(argv)
    args.allow_config_change = [k.strip() for item in args.allow_config_change for k in item.split(",") if k.strip()]
    return args


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DatasetError, FileNotFoundError, CheckpointError, FloatingPointError) as e:  # one line
        sys.exit(f"train.py: error: {e}")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        sys.exit(f"train.py: error: no space left on device ({e.filename or e})")
