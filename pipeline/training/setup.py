"""What train.py sets up before the loop: the input checks, the Accelerator and the data loader.

`check_inputs` runs first, before any model is loaded, so that a wrong path, a missing storyboard or a broken
cache is one line naming the field or file at start-up rather than a traceback minutes (or, for validation,
hours) into a run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.data import DataLoader

from ..data import EpochSampler, SequenceDataset, shape_fields
from ..data.dataset import read_null_embedding
from ..data.format import read_manifest
from ..storyboard import StoryboardError, load_storyboard
from .components import build_components
from .config import Config, ConfigError, NoiseConfig, to_dict
from .loss import DiffusionCollate
from .parallel import context_parallel_mesh, data_parallel_size

logger = logging.getLogger(__name__)


def check_inputs(cfg: Config) -> None:
    """Raise ConfigError / DatasetError (one line, naming the key or file and what was expected) for missing model
    directories, unreadable validation storyboards, a precompute cache whose manifest or null embedding is missing
    or corrupt, a mix, told or replay cache without a manifest; a parallel.context that does not divide the launched
    processes (WORLD_SIZE), or one above 1 with data.replay (a single segment cannot be split)."""
    replay = cfg.data.replay
    if replay.every and cfg.parallel.context > 1:
        raise ConfigError(f"data.replay.every={replay.every}: a single segment cannot be split between "
                          f"parallel.context={cfg.parallel.context} ranks; expected data.replay.every=0 or "
                          "parallel.context=1")
    data_parallel_size(cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")))
    model = cfg.model
    if model.builder == "pretrained" and _looks_local(model.pretrained):
        if not Path(model.pretrained).is_dir():
            raise ConfigError(f"model.pretrained={model.pretrained}: no such directory; expected a diffusers CogVideoX "
                              "pipeline directory (model_index.json, transformer/, vae/, ...) or a hub id such as "
                              "THUDM/CogVideoX-5b")
        if not (Path(model.pretrained) / "model_index.json").is_file():
            raise ConfigError(f"model.pretrained={model.pretrained}: model_index.json not found; expected a diffusers "
                              "pipeline directory (save_pretrained's output)")
    if model.init_from is not None and not (Path(model.init_from) / "transformer" / "config.json").is_file():
        raise ConfigError(f"model.init_from={model.init_from}: no transformer/config.json there; expected a previous "
                          "stage's exported pipeline directory (its output_dir/final)")
    if cfg.validation.every > 0:
        for i, source in enumerate(cfg.validation.storyboards):
            if not Path(source).is_file():
                raise ConfigError(f"validation.storyboards[{i}]={source}: file not found; expected a storyboard file "
                                  "(.json, .yaml, .txt)")
            try:
                load_storyboard(source)
            except StoryboardError as e:
                problems = str(e).replace("\n", "; ")
                raise ConfigError(f"validation.storyboards[{i}]={source}: {problems}") from None
    caches = [("data.cache", cfg.data.cache)]
    if cfg.data.mix_rate > 0:
        caches.append(("data.mix_cache", cfg.data.mix_cache))
    if cfg.train.told_weight > 0:
        caches.append(("data.told_cache", cfg.data.told_cache))
    if replay.every and replay.cache:
        caches.append(("data.replay.cache", replay.cache))
    manifests = [(key, cache, read_manifest(cache)) for key, cache in caches]
    read_null_embedding(cfg.data.cache)
    if model.builder == "pretrained" and _looks_local(model.pretrained):
        for key, cache, manifest in manifests:
            check_cache_vae(key, cache, manifest, model.pretrained)


def check_cache_vae(key: str, cache: str, manifest: dict, pretrained: str) -> None:
    """The cache's latents must come from the VAE that the run's export will carry (model.pretrained's): a cache
    encoded by another VAE trains the transformer on latents that the exported pipeline then decodes with the wrong
    decoder. The VAEs are told apart by their scaling factor (set from each trained VAE's own latent spread), which
    the precompute records in the manifest; a local model.pretrained only (a hub id's VAE would need a download)."""
    path = Path(pretrained) / "vae" / "config.json"
    if "scaling_factor" not in manifest or not path.is_file():
        return
    try:
        theirs = json.loads(path.read_text()).get("scaling_factor")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"model.pretrained={pretrained}: {path} is not a JSON object ({e}); expected the VAE's "
                          "config (save_pretrained's config.json)") from None
    ours = manifest["scaling_factor"]
    if isinstance(theirs, (int, float)) and not math.isclose(float(theirs), float(ours), rel_tol=1e-6):
        raise ConfigError(f"{key}={cache}: its latents were encoded by a VAE with scaling_factor {ours} (its "
                          f"manifest), but model.pretrained={pretrained} has a VAE with scaling_factor {theirs}, so "
                          "the export would decode them with another VAE; precompute the cache with this "
                          "model.pretrained, or set model.pretrained to the pipeline the cache was made with")


def _looks_local(source: str) -> bool:
    """Whether `source` is meant as a directory rather than a hub id ("name" or "org/name")."""
    return (Path(source).exists() or os.path.isabs(source) or source.startswith((".", "~"))
            or source.strip("/").count("/") > 1 or source.endswith("/"))


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


def describe_batch(cfg: Config, accelerator: Accelerator) -> str:
    context = cfg.parallel.context
    return (f"global batch {cfg.train.global_batch_size} = {cfg.train.micro_batch_size} per process x "
            f"{accelerator.gradient_accumulation_steps} accumulation x "
            f"{data_parallel_size(cfg.parallel, accelerator.num_processes)} processes"
            + (f" (x {context} context-parallel ranks each)" if context > 1 else ""))


def build_model(cfg: Config, accelerator: Accelerator) -> tuple[torch.nn.Module, object, DeviceMesh | None,
                                                                 torch.nn.Module | None]:
    """The (unprepared) transformer to train, the sampler's scheduler, the (dp, cp) mesh (None without context
    parallelism: parallel.context = 1) and the told term's frozen teacher (`FrozenTeacher`; None unless
    train.told_weight > 0 with train.told_teacher "initial"). Under FSDP with activation checkpointing, diffusers' own
    gradient checkpointing is turned off (FSDP checkpoints every wrapped block already)."""
    parts = build_components(cfg.model, cfg.train, ("scheduler", "transformer"))
    model = parts["transformer"]
    teacher = None
    if cfg.train.told_weight > 0 and cfg.train.told_teacher == "initial":
        teacher = FrozenTeacher(copy.deepcopy(model), accelerator)  # before context parallelism holds a group
    mesh = context_parallel_mesh(cfg.parallel, accelerator)
    if mesh is not None:
        model.enable_context_parallel(mesh["cp"])
        if teacher is not None:
            teacher.model.enable_context_parallel(mesh["cp"])
    fsdp = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if fsdp is not None and fsdp.activation_checkpointing and model.is_gradient_checkpointing:
        model.disable_gradient_checkpointing()
        logger.info("FSDP activation checkpointing is on: diffusers' gradient checkpointing is left off")
    return model, parts["scheduler"], mesh, teacher


class FrozenTeacher(torch.nn.Module):
    """The transformer as training starts (its init_from weights, also on --resume), for the told term's target:
    never stepped, saved or wrapped; on the accelerator's device and run under its autocast as the prepared model
    is. A whole copy on every process: under FSDP it is not sharded."""

    def __init__(self, model: torch.nn.Module, accelerator: Accelerator):
        super().__init__()
        self.model = model.to(accelerator.device)
        self.autocast = accelerator.autocast
        self.requires_grad_(False).eval()

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self.autocast():
            return self.model(*args, **kwargs)


def build_loader(cfg: Config, model: torch.nn.Module, num_train_timesteps: int) -> DataLoader:
    """The (unprepared) loader of n-segment sequences from the cache, checked against the model's shapes."""
    dataset = SequenceDataset(cfg.data.root, cfg.data.cache, cfg.data.segments, cfg.data.stride,
                              cfg.data.text_dropout, expected=expected_manifest(cfg, model),
                              mix_cache=cfg.data.mix_cache, mix_rate=cfg.data.mix_rate,
                              loss_mask=cfg.train.mask_weight > 0, repeat_pattern=cfg.data.repeat_pattern,
                              repeat_times=cfg.data.repeat_times,
                              told_cache=cfg.data.told_cache if cfg.train.told_weight > 0 else None)
    return _loader(cfg, dataset, cfg.train.micro_batch_size, cfg.seed, cfg.train.noise, model, num_train_timesteps)


def build_replay_loader(cfg: Config, model: torch.nn.Module, num_train_timesteps: int) -> DataLoader | None:
    """The (unprepared) loader of the single segments that data.replay replays (None when it is off): latents and
    loss masks from data.cache, texts from data.replay.cache, one noise level per segment drawn from every level.
    Its own sample order and seeds (seed + 1), so that its noise is not the main loader's."""
    replay = cfg.data.replay
    if not replay.every:
        return None
    dataset = SequenceDataset(cfg.data.root, cfg.data.cache, 1, 1, cfg.data.text_dropout,
                              expected=expected_manifest(cfg, model), mix_cache=replay.cache,
                              mix_rate=1.0 if replay.cache else 0.0, loss_mask=cfg.train.mask_weight > 0,
                              repeat_pattern=replay.repeat_pattern, repeat_times=replay.repeat_times,
                              repeat_key="data.replay.repeat_pattern")
    batch_size = replay.micro_batch_size or cfg.data.segments * cfg.train.micro_batch_size  # the stage's tokens
    return _loader(cfg, dataset, batch_size, cfg.seed + 1, NoiseConfig(), model, num_train_timesteps)


def _loader(cfg: Config, dataset: SequenceDataset, batch_size: int, seed: int, noise: NoiseConfig,
            model: torch.nn.Module, num_train_timesteps: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed),
                      collate_fn=DiffusionCollate(num_train_timesteps, dataset.scaling_factor, noise,
                                                   model.config.latent_frames_per_segment),
                      num_workers=cfg.data.num_workers, drop_last=True, pin_memory=torch.cuda.is_available())


def expected_manifest(cfg: Config, model: torch.nn.Module) -> dict:
    """What the precompute cache must have been made with for this model and config (pipeline.data.SHAPE_FIELDS)."""
    c = model.config
    return shape_fields(cfg.data, max_text_length=c.max_text_seq_length, latent_frames_first=c.latent_frames_first,
                        latent_frames_per_segment=c.latent_frames_per_segment, latent_channels=c.in_channels,
                        text_embed_dim=c.text_embed_dim)


def flat_config(cfg: Config) -> dict:
    """The config as flat scalars for trackers' hyperparameter tables (lists as strings)."""

    def walk(section: dict, prefix: str):
        for key, value in section.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}/")
            else:
                yield f"{prefix}{key}", value if isinstance(value, (int, float, str, bool)) else str(value)

    return dict(walk(to_dict(cfg), ""))
