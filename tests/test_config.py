"""Config: YAML loading with `extends`, key=value overrides, validation errors, the resolved config round trip, and
every shipped YAML loading cleanly."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from models import CogVideoXTTTTransformer3DModel
from models.transformer_ttt import TTT_CONFIG_KEYS
from pipeline.training.config import Config, ConfigError, TTTConfig, load_config, save_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.optim.betas == (0.9, 0.95) and cfg.data.segments == 1


def test_yaml_extends_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"output_dir": "out/base", "optim": {"lr": 1e-5, "warmup_steps": 100},
                                   "model": {"ttt": {"ttt_type": "linear"}}})
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "optim": {"warmup_steps": 50},
                                            "data": {"segments": 3}})
    cfg = load_config(child, ["optim.lr=2e-5", "train.trainable=ttt+attn", "validation.storyboards=[a.json, b.txt]",
                              "model.init_from=null", "optim.betas=[0.9, 0.99]"])
    assert cfg.output_dir == "out/base"  # inherited
    assert cfg.model.ttt.ttt_type == "linear"  # inherited inside a nested section
    assert cfg.optim.warmup_steps == 50 and cfg.data.segments == 3  # the child's values
    assert cfg.optim.lr == 2e-5  # "2e-5" is a string to YAML 1.1: coerced for a float field
    assert cfg.train.trainable == "ttt+attn"
    assert cfg.validation.storyboards == ["a.json", "b.txt"]
    assert cfg.model.init_from is None
    assert cfg.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1e-4"], "unknown config key 'optim.lrr'; known keys under 'optim': lr, ttt_lr, schedule"),
    (["nonsense=1"], "unknown config key 'nonsense'; known keys: output_dir, seed, model, data"),
    (["model.ttt.gate=0.5"], "unknown config key 'model.ttt.gate'; known keys under 'model.ttt': ttt_type"),
    (["train.trainable=everything"], "train.trainable: expected one of ['full', 'ttt', 'ttt+attn', 'lora']"),
    (["train.steps=many"], "train.steps: expected int, got 'many'"),
    (["train.steps=2.5"], "train.steps: expected int"),
    (["optim.betas=[0.9]"], "optim.betas: expected 2 values"),
    (["train.ema=maybe"], "train.ema: expected bool"),
    (["data=3"], "data: expected a mapping"),
    (["optim.lr"], "expected key=value"),
    (["log.every=0"], "log.every: expected a number >= 1, got 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size: expected a number >= 1, got 0"),
    (["train.steps=0"], "train.steps: expected a number >= 1, got 0"),
    (["optim.lr=-1e-5"], "optim.lr: expected a number >= 0.0, got -1e-05"),
    (["optim.ttt_lr=-0.1"], "optim.ttt_lr: expected a number >= 0.0, got -0.1"),
    (["validation.memory_guidance_scale=-1"], "validation.memory_guidance_scale: expected a number >= 0.0, got -1"),
    (["validation.memory_guidance_segments=named"], "validation.memory_guidance_segments: expected one of "
                                                    "['all', 'continuing']"),
    (["validation.memory_guidance_baseline=local"], "validation.memory_guidance_baseline: expected one of "
                                                    "['segments_apart', 'no_ttt']"),
    (["model.ttt.ttt_type=none", "validation.memory_guidance_scale=2"],
     "validation.memory_guidance_scale: a model without TTT layers (model.ttt.ttt_type none) has nothing to guide by"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "typo.yaml", {"optim": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config(tmp_path / "typo.yaml")


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "cogvideox-5b-ttt-mlp" / "9s.yaml", ["optim.lr=3e-5"])
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, no temporary left
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)  # every default spelled out


def test_ttt_section_mirrors_the_model():
    """model.ttt is passed verbatim to CogVideoXTTTTransformer3DModel.from_base: same keys, same defaults."""
    fields = {f.name: f.default for f in dataclasses.fields(TTTConfig)}
    assert tuple(fields) == TTT_CONFIG_KEYS
    signature = inspect.signature(CogVideoXTTTTransformer3DModel.__init__).parameters
    assert fields == {k: signature[k].default for k in TTT_CONFIG_KEYS}


@pytest.mark.parametrize("path", sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")
                                        if "accelerate" not in p.parts))
def test_shipped_configs_load(path):
    cfg = load_config(CONFIGS / path)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_recipe_stages():
    """The paper's curriculum (docs/training.md, "The curriculum") in the shipped CogVideoX-5B configs."""
    stages = {"3s": (1, "full", 5000, 100), "9s": (3, "ttt+attn", 5000, 100), "18s": (6, "ttt+attn", 1000, 50),
              "30s": (10, "ttt+attn", 500, 50), "63s": (21, "ttt+attn", 250, 25)}
    for ttt_type in ("mlp", "linear"):
        previous = None
        for stage, (segments, trainable, steps, warmup) in stages.items():
            cfg = load_config(CONFIGS / f"cogvideox-5b-ttt-{ttt_type}" / f"{stage}.yaml")
            assert cfg.model.ttt.ttt_type == ttt_type
            assert (cfg.data.segments, cfg.train.trainable, cfg.train.steps, cfg.optim.warmup_steps) == (
                segments, trainable, steps, warmup), stage
            assert cfg.train.global_batch_size == 64 and cfg.optim.grad_clip == 0.1
            assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 1e-4
            assert cfg.data.text_dropout == 0.1 and cfg.train.mixed_precision == "bf16"
            if previous is None:
                assert cfg.model.init_from is None
                assert (cfg.optim.lr, cfg.optim.ttt_lr, cfg.optim.schedule, cfg.optim.min_lr) == (
                    1e-5, 1e-4, "cosine", 1e-5)
            else:
                assert cfg.model.init_from == str(Path(previous.output_dir) / "final")
                assert cfg.optim.lr == 1e-5 and cfg.optim.ttt_lr in (None, 1e-5)
            previous = cfg
