"""Training configuration: typed dataclasses with defaults, loaded from YAML, with `key=value` overrides.

A YAML file mirrors `Config` (sections `model`, `data`, `train`, `optim`, `checkpoint`, `log`, `validation`,
`parallel`); a top-level `extends: other.yaml` (relative to the file) starts from another file, so the stages of a
curriculum only state what changes. Unknown keys, wrong types and values outside a field's choices are rejected
with the key path and what was expected. `save_config` writes the resolved config (all defaults filled in), which
is what train.py stores next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.transformer_ttt import MEMORY_BASELINES, TRAINABLE_MODES, ttt_config_fields

from ..atomic import atomic_write_text
from ..storyboard import MEMORY_GUIDANCE_SEGMENTS


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key path and what was expected."""


def _choice(default: Any, choices: tuple, **kwargs) -> Any:
    return field(default=default, metadata={"choices": choices}, **kwargs)


def _at_least(default: Any, low: float) -> Any:
    """A number field whose value must be >= low (None, where allowed, passes)."""
    return field(default=default, metadata={"min": low})


TTTConfig = dataclasses.make_dataclass("TTTConfig", ttt_config_fields())
TTTConfig.__module__ = __name__
TTTConfig.__doc__ = """The TTT arguments of `CogVideoXTTTTransformer3DModel` (which validates them), with the model's
own types and defaults, passed through verbatim when TTT is inserted into a base CogVideoX. None means the model's
default for the TTT type. ttt_backend, ttt_checkpoint_group and checkpoint_ttt may change from stage to stage; the
others must match a previous stage's transformer (`model.init_from`)."""


@dataclass
class ModelConfig:
    """Where the components come from.

    pretrained: a diffusers CogVideoX pipeline directory or hub id (tokenizer, text_encoder, vae, scheduler and the
        base transformer). init_from: a previous stage's exported pipeline directory; its TTT transformer is
        trained further (the other components still come from `pretrained`). builder: the name of a component
        builder registered in pipeline.training.components ("pretrained" loads the above; a from-scratch builder
        registers its own name, is named as "package.module:name" to be imported, and reads `builder_args`).
    """

    pretrained: str = "THUDM/CogVideoX-5b"
    init_from: str | None = None
    builder: str = "pretrained"
    builder_args: dict[str, Any] = field(default_factory=dict)
    ttt: TTTConfig = field(default_factory=TTTConfig)


def check_repeat(prefix: str, pattern: str | None, times: int) -> None:
    """A repeat_pattern / repeat_times pair (DataConfig, ReplayConfig): times above 1 need a regular expression."""
    if times > 1 and not pattern:
        raise ConfigError(f"{prefix}repeat_pattern: expected a regular expression for {prefix}repeat_times {times}, "
                          "got none")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{prefix}repeat_pattern: not a regular expression ({e}): {pattern!r}") from None


@dataclass
class ReplayConfig:
    """Single segments replayed inside a multi-segment stage (docs/training.md, "Replaying single segments").

    every: every `every`-th optimizer step (0: never; at least 2) trains on single segments instead of the stage's
    sequences: `micro_batch_size` segments per micro-batch (None: data.segments x train.micro_batch_size, as many as
    a micro-batch of the stage's sequences holds; the stage's accumulation applies), each with its latents and loss
    mask from data.cache and its text from `cache` (another precompute cache of the same videos, say the dense
    register; None: data.cache's own texts), at one noise level drawn from every level (the paper's training, not
    train.noise). So the stage keeps practising what the single-segment stage taught, drawing a segment from its
    text, while it learns its sequences. The replayed steps' loss is logged as loss/replay, apart from `loss`.
    repeat_pattern, repeat_times: as data's, for the replayed segments (matched in data.cache's register and in
    `cache`'s), so that a rare kind of segment (two characters on stage) is replayed more often.
    """

    every: int = _at_least(0, 0)
    cache: str | None = None
    micro_batch_size: int | None = _at_least(None, 1)
    repeat_pattern: str | None = None
    repeat_times: int = _at_least(1, 1)

    def __post_init__(self):
        if self.every == 1:
            raise ConfigError("data.replay.every: expected 0 (off) or a step interval >= 2, got 1 (no step would "
                              "train on the stage's sequences)")
        check_repeat("data.replay.", self.repeat_pattern, self.repeat_times)


@dataclass
class DataConfig:
    """The dataset (docs/dataset.md) and its precomputed cache.

    root: folder with metadata.jsonl and the videos. cache: precompute's output folder. height, width, fps: the
    model's resolution and frame rate (pixels). segments: consecutive 3-s segments per training sequence (the
    curriculum: 1, 3, 6, 10, 21). stride: a sequence may start every `stride` segments. text_dropout: probability
    that a segment's text is replaced by the null embedding (the encoded empty text the sampler uses). caption: the
    register precompute embeds: "text" (each segment's text) or a name from the metadata's segments[i].captions (the
    toy world writes "dense": every segment names its backdrop and describes every character on stage).
    latents_from: another precompute cache of the same videos, VAE and frame shapes (say, another caption
    register's): precompute copies its latents instead of encoding the videos again and embeds only the texts.
    mix_cache, mix_rate: another precompute cache of the same videos (another caption register, say the dense one);
    each sequence takes all its texts from it with probability mix_rate (its latents always come from `cache`), so
    a stage can keep some sequences whose every text describes what is on screen.
    repeat_pattern, repeat_times: sequences with a segment whose caption (in the cache's register or the mix
    cache's) matches the regular expression repeat_pattern appear repeat_times times in every epoch instead of once,
    so that a rare kind of clip (the toy world's segments with two characters on stage: "; ") is seen more often.
    replay: single segments replayed in a share of a multi-segment stage's steps (`ReplayConfig`).
    told_cache: another precompute cache of the same videos whose texts tell everything on screen (the dense
    register), read beside every sequence's own texts for the loss's told term (train.told_weight).
    """

    root: str = "data/dataset"
    cache: str = "data/cache"
    height: int = 480
    width: int = 720
    fps: int = 16
    max_text_length: int = 226
    segments: int = _at_least(1, 1)
    stride: int = _at_least(1, 1)
    text_dropout: float = 0.1
    caption: str = "text"
    latents_from: str | None = None
    mix_cache: str | None = None
    mix_rate: float = 0.0
    told_cache: str | None = None
    repeat_pattern: str | None = None
    repeat_times: int = _at_least(1, 1)
    num_workers: int = _at_least(2, 0)
    vae_tiling: bool = True
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    def __post_init__(self):
        if self.replay.every and self.segments == 1:
            raise ConfigError("data.replay.every: the stage trains on single segments already (data.segments 1); "
                              "expected 0")
        if not 0.0 <= self.mix_rate <= 1.0:
            raise ConfigError(f"data.mix_rate: expected a probability in [0, 1], got {self.mix_rate!r}")
        if self.mix_rate > 0 and not self.mix_cache:
            raise ConfigError(f"data.mix_cache: expected a precompute cache folder for data.mix_rate {self.mix_rate}, "
                              "got none")
        check_repeat("data.", self.repeat_pattern, self.repeat_times)


@dataclass
class NoiseConfig:
    """Noise levels per training sequence (docs/training.md, "Noise levels per segment"): each sample draws a mode.

    uniform: one level for the whole sequence (the paper's training; uniform 1 alone reproduces it bit for bit).
    independent: a level per segment. context: a random set of segments is clean (t = 0, its latents as they are,
    no loss), the rest share one level; segment 1 is clean with probability context_first, each later segment with
    probability context_rate, and at least one segment stays noisy. The three probabilities must sum to 1.
    t_min, t_max: the noisy levels are drawn uniformly from [t_min, t_max) (t_max None: the scheduler's
    num_train_timesteps), in every mode; the defaults draw exactly what they always did. context_t_min: context-mode
    sequences draw their level from [context_t_min, t_max) instead (None: t_min), so the memory signal can sit at
    high noise while the one-level sequences that joint sampling needs still cover every level.
    """

    uniform: float = 1.0
    independent: float = 0.0
    context: float = 0.0
    context_first: float = 0.5
    context_rate: float = 0.5
    t_min: int = 0
    t_max: int | None = None
    context_t_min: int | None = None

    def __post_init__(self):
        for name in ("uniform", "independent", "context", "context_first", "context_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"train.noise.{name}: expected a probability in [0, 1], got {value!r}")
        total = self.uniform + self.independent + self.context
        if abs(total - 1.0) > 1e-6:
            raise ConfigError("train.noise: uniform + independent + context must sum to 1, got "
                              f"{self.uniform} + {self.independent} + {self.context} = {total:g}")
        if self.t_min < 0:
            raise ConfigError(f"train.noise.t_min: expected a timestep >= 0, got {self.t_min!r}")
        if self.t_max is not None and self.t_max <= self.t_min:
            raise ConfigError(f"train.noise.t_max: expected a timestep above t_min ({self.t_min}), got {self.t_max!r}")
        if self.context_t_min is not None and self.context_t_min < 0:
            raise ConfigError(f"train.noise.context_t_min: expected a timestep >= 0, got {self.context_t_min!r}")
        if self.context_t_min is not None and self.t_max is not None and self.t_max <= self.context_t_min:
            raise ConfigError(f"train.noise.context_t_min: expected a timestep below t_max ({self.t_max}), "
                              f"got {self.context_t_min!r}")

    @property
    def is_uniform(self) -> bool:
        """Only the paper's single level: the training batch and loss are exactly the original ones."""
        return self.uniform == 1.0


@dataclass
class TrainConfig:
    """global_batch_size = micro_batch_size x gradient accumulation x processes; accumulation is derived.

    trainable: "full", "ttt" (TTT layers, gates, scene embedding), "ttt+attn" (+ attention q/k/v/o and qk-norms) or
    "lora" (TTT + LoRA of rank lora_rank on attn1's to_q, to_k, to_v, to_out.0). noise: per-segment noise levels
    (`NoiseConfig`). hard_fraction, hard_weight: the loss's term on each sample's largest errors; mask_weight: its
    term on the elements the dataset's loss masks cover, grown by mask_dilate latent positions first
    (pipeline.training.loss.diffusion_terms); boundary_weight: its term on the first latent frame of each segment that
    continues a scene; told_weight: its term on the distance from the prediction given data.told_cache's texts, on
    segments 2..n, by the model being trained (told_teacher "self") or by a frozen copy of it as training started
    ("initial"); 0: the plain objective.
    """

    steps: int = _at_least(5000, 1)
    global_batch_size: int = _at_least(64, 1)
    micro_batch_size: int = _at_least(1, 1)
    trainable: str = _choice("full", TRAINABLE_MODES)
    lora_rank: int = 64
    lora_alpha: float = 64.0
    mixed_precision: str = _choice("bf16", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = True
    ema: bool = False
    ema_decay: float = 0.9999
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    hard_fraction: float = 0.0
    hard_weight: float = 0.0
    mask_weight: float = 0.0
    mask_dilate: int = 0
    boundary_weight: float = 0.0
    told_weight: float = 0.0
    told_teacher: str = _choice("self", ("self", "initial"))

    def __post_init__(self):
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ConfigError(f"train.hard_fraction: expected a fraction in [0, 1], got {self.hard_fraction!r}")
        if self.hard_weight < 0:
            raise ConfigError(f"train.hard_weight: expected a weight >= 0, got {self.hard_weight!r}")
        if self.mask_weight < 0:
            raise ConfigError(f"train.mask_weight: expected a weight >= 0, got {self.mask_weight!r}")
        if self.mask_dilate < 0:
            raise ConfigError(f"train.mask_dilate: expected a whole number of latent positions >= 0, "
                              f"got {self.mask_dilate!r}")
        if self.boundary_weight < 0:
            raise ConfigError(f"train.boundary_weight: expected a weight >= 0, got {self.boundary_weight!r}")
        if self.told_weight < 0:
            raise ConfigError(f"train.told_weight: expected a weight >= 0, got {self.told_weight!r}")


@dataclass
class OptimConfig:
    """AdamW. lr applies to the base parameters, ttt_lr (None: lr) to the parameters TTT adds. The schedule warms
    up linearly for warmup_steps, then stays constant or follows a cosine down to min_lr (a group whose lr is at or
    below min_lr stays constant). use_8bit: bitsandbytes' AdamW8bit (must be installed)."""

    lr: float = _at_least(1e-5, 0.0)
    ttt_lr: float | None = _at_least(None, 0.0)
    schedule: str = _choice("constant", ("constant", "cosine"))
    warmup_steps: int = _at_least(100, 0)
    min_lr: float = _at_least(0.0, 0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = _at_least(1e-4, 0.0)
    grad_clip: float = 0.1
    use_8bit: bool = False


@dataclass
class CheckpointConfig:
    """Accelerate state every `every` steps (0: never) under output_dir/checkpoints, the last `keep` kept."""

    every: int = _at_least(500, 0)
    keep: int = _at_least(3, 0)


@dataclass
class LogConfig:
    """Scalars every `every` steps to the tracker ("tensorboard", "wandb" or "none") under output_dir/logs."""

    every: int = _at_least(10, 1)
    tracker: str = _choice("tensorboard", ("tensorboard", "wandb", "none"))
    project: str = "ttt-video"


@dataclass
class ValidationConfig:
    """Every `every` steps (0: never), sample each storyboard file listed in `storyboards` to an mp4 under
    output_dir/validation and log it. cpu_offload: move idle components to the CPU while sampling on a GPU.
    guidance_scale and memory_guidance_scale, _segments and _baseline are also the exported pipeline's defaults (its
    config's; memory guidance: docs/sampling.md, "Memory guidance"; a scale > 0 needs TTT layers)."""

    every: int = _at_least(0, 0)
    storyboards: list[str] = field(default_factory=list)
    num_inference_steps: int = 50
    guidance_scale: float = _at_least(6.0, 0.0)
    memory_guidance_scale: float = _at_least(0.0, 0.0)
    memory_guidance_segments: str = _choice("all", MEMORY_GUIDANCE_SEGMENTS)
    memory_guidance_baseline: str = _choice("segments_apart", MEMORY_BASELINES)
    seed: int = 0
    cpu_offload: bool = True


@dataclass
class ParallelConfig:
    """context: ranks that share one sample (context parallelism, docs/training.md): its segments are split between
    them and the TTT heads too, so it must divide the process count, the TTT heads and be at most data.segments.
    The processes form a (data, context) mesh: process count / context groups, each reading its own batches."""

    context: int = 1


@dataclass
class Config:
    output_dir: str = "outputs/run"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if self.train.told_weight > 0 and not self.data.told_cache:
            raise ConfigError(f"data.told_cache: expected a precompute cache folder for train.told_weight "
                              f"{self.train.told_weight}, got none")
        if self.validation.memory_guidance_scale > 0 and self.model.ttt.ttt_type == "none":
            raise ConfigError(f"validation.memory_guidance_scale: a model without TTT layers (model.ttt.ttt_type "
                              f"none) has nothing to guide by; expected 0, got {self.validation.memory_guidance_scale}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from a YAML file (None: the defaults) with `section.key=value` overrides applied in order.

    Override values are parsed as YAML (`optim.lr=2e-5`, `validation.storyboards=[a.json, b.json]`,
    `model.init_from=null`).
    """
    raw = _read_yaml(Path(path), seen=()) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=2e-5")
        _set_path(raw, key.strip().split("."), yaml.safe_load(value), item)
    return from_dict(Config, raw)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build the dataclass `cls` from nested dicts, checking every key and value (errors name the key path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f" under '{prefix.rstrip('.')}'" if prefix else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys{where}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = prefix + name
        values[name] = _coerce(value, hints[name], key)
        choices, low = fields[name].metadata.get("choices"), fields[name].metadata.get("min")
        if choices is not None and values[name] not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        if low is not None and values[name] is not None and values[name] < low:
            raise ConfigError(f"{key}: expected a number >= {low}, got {values[name]!r}")
    return cls(**values)


def to_dict(config: Any) -> dict:
    """Plain nested dicts/lists (YAML-ready) of a config dataclass."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (temporary name in the same folder, then rename)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"{path}: 'extends' loops back to a file already being read")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file path, got {parent!r}")
    return _merge(_read_yaml(path.parent / parent, seen + (resolved,)), data)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_path(raw: dict, keys: list[str], value: Any, item: str) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    elif origin is dict and isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
