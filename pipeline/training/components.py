"""The components training needs, built from the config's `model` section.

A builder returns the requested parts of {"tokenizer", "text_encoder", "vae", "scheduler", "transformer"}; the
transformer is always a `CogVideoXTTTTransformer3DModel` with its trainable parameters chosen. "pretrained" reads a
diffusers pipeline directory or hub id (the stock CogVideoX, or a previous stage's export through `init_from`).
A builder that makes components from scratch (e.g. a toy model) registers itself with `register_builder("name")`
and is selected with `model.builder: name`, or `model.builder: package.module:name` to have its module imported
first; it reads its own settings from `model.builder_args`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import CogVideoXDDIMScheduler

from models import CogVideoXTTTTransformer3DModel

from .config import ConfigError, ModelConfig, TrainConfig

PARTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attn1 of every block; the TTT projections are named wq/wk/...
# TTT settings that may change between stages (how the maths runs, not which weights exist); gate_init only
# matters when TTT is inserted, so it is not compared with a previous stage either
RUNTIME_TTT_KEYS = ("ttt_backend", "ttt_checkpoint_group", "checkpoint_ttt")

Builder = Callable[[ModelConfig, TrainConfig, Iterable[str]], dict[str, Any]]
BUILDERS: dict[str, Builder] = {}


def register_builder(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn

    return register


def build_components(model: ModelConfig, train: TrainConfig, parts: Iterable[str] = PARTS) -> dict[str, Any]:
    """The requested parts (see module docstring) by the builder `model.builder`."""
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; known: {', '.join(PARTS)}")
    name = model.builder
    if name not in BUILDERS and ":" in name:
        module, _, name = name.partition(":")
        try:
            importlib.import_module(module)  # registers its builders
        except ImportError as e:
            raise ConfigError(f"model.builder={model.builder!r}: cannot import {module} ({e})") from None
    if name not in BUILDERS:
        raise ConfigError(f"model.builder: expected one of {sorted(BUILDERS)} or 'module:name', got {model.builder!r}")
    return BUILDERS[name](model, train, parts)


@register_builder("pretrained")
def load_pretrained(model: ModelConfig, train: TrainConfig, parts: Iterable[str]) -> dict[str, Any]:
    """Components from `model.pretrained` (the scheduler as stored: the sampler's); the transformer from
    `model.init_from` when set, else the pretrained CogVideoX transformer with TTT inserted (`model.ttt`)."""
    out = {name: load_component(model.pretrained, name) for name in parts if name != "transformer"}
    if "transformer" in parts:
        out["transformer"] = prepare_transformer(load_transformer(model), train)
    return out


def load_transformer(model: ModelConfig) -> CogVideoXTTTTransformer3DModel:
    """TTT transformer from a previous stage (`init_from`) or the pretrained CogVideoX with TTT inserted."""
    ttt = dataclasses.asdict(model.ttt)
    if model.init_from is None:
        return CogVideoXTTTTransformer3DModel.from_base(model.pretrained, subfolder="transformer", **ttt)
    runtime = {k: ttt[k] for k in RUNTIME_TTT_KEYS}
    transformer = CogVideoXTTTTransformer3DModel.from_pretrained(model.init_from, subfolder="transformer", **runtime)
    clashes = [f"{k}={v!r} (init_from has {transformer.config[k]!r})" for k, v in ttt.items()
               if k not in (*RUNTIME_TTT_KEYS, "gate_init") and v is not None and transformer.config[k] != v]
    if clashes:
        raise ConfigError(f"model.ttt differs from the transformer in model.init_from={model.init_from}: "
                          + ", ".join(clashes))
    return transformer


def prepare_transformer(transformer: CogVideoXTTTTransformer3DModel, train: TrainConfig
                        ) -> CogVideoXTTTTransformer3DModel:
    """LoRA (for trainable "lora"), requires_grad by `train.trainable`, gradient checkpointing; training mode."""
    if train.trainable == "lora":
        from peft import LoraConfig

        transformer.add_adapter(LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha,
                                           init_lora_weights=True, target_modules=LORA_TARGETS))
    transformer.set_trainable(train.trainable)
    if train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer.train()


def training_scheduler(scheduler: Any) -> CogVideoXDDIMScheduler:
    """The DDIM form of a (DDIM or DPM) sampler's noise schedule, for add_noise / get_velocity in the loss; it must
    be v-prediction."""
    scheduler = CogVideoXDDIMScheduler.from_config(scheduler.config)
    if scheduler.config.prediction_type != "v_prediction":
        raise ConfigError(f"the scheduler predicts {scheduler.config.prediction_type!r}; training here expects "
                          "'v_prediction' (CogVideoX's)")
    return scheduler


def model_index(source: str) -> dict[str, Any]:
    """model_index.json of a pipeline directory or hub id."""
    path = Path(source) / "model_index.json"
    if not path.is_file():
        if os.path.isdir(source):
            raise ConfigError(f"model.pretrained={source}: {path.name} not found; expected a diffusers pipeline "
                              "directory (tokenizer/, text_encoder/, vae/, scheduler/, transformer/)")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, "model_index.json"))
    return json.loads(path.read_text())


def load_component(source: str, name: str, **kwargs) -> Any:
    """One component of a diffusers pipeline (directory or hub id), with the class its model_index.json names."""
    index = model_index(source)
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
        raise ConfigError(f"{source}: model_index.json has no component {name!r}")
    library, class_name = entry
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        cls = getattr(importlib.import_module("diffusers"), class_name)
    return cls.from_pretrained(source, subfolder=name, **kwargs)


def torch_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen components run in under an Accelerate mixed-precision setting."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
