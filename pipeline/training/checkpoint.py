"""Checkpoints: Accelerate state every N steps, written atomically, the last K kept, resumable exactly.

Layout: output_dir/checkpoints/step-00000500/ holds what `accelerator.save_state` writes (model, optimizer,
scheduler, RNG states of every process, registered objects such as the EMA) plus config.yaml (the resolved config)
and trainer_state.json ({"step": 500}). A checkpoint is written to a hidden temporary folder and renamed when every
process has finished, so a folder named step-* is always complete. Where the base model is frozen, only the
trainable parameters are stored (the base is re-read from the config's model section on resume).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors import safe_open
from torch import nn

from ..atomic import atomic_write_text
from .config import Config, ConfigError, save_config

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


class Checkpointer:
    """save(step) / load(which) over output_dir/checkpoints, keeping the last `keep`; `model` is the prepared
    (wrapped) model whose trainable parameters are stored."""

    def __init__(self, accelerator: Accelerator, config: Config, model: nn.Module):
        self.accelerator, self.config, self.model = accelerator, config, model
        self.root = Path(config.output_dir) / "checkpoints"
        self.keep = config.checkpoint.keep
        accelerator.register_save_state_pre_hook(self._only_trainable)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.match(p.name)))

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def save(self, step: int) -> Path:
        """Save the state after `step` optimizer steps (call on every process)."""
        final, tmp = self.path(step), self.root / f".tmp-step-{step:08d}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left over from a run that died while saving
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_main_process:
            save_config(self.config, tmp / "config.yaml")
            atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step}) + "\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.steps()[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(self.path(old))
        self.accelerator.wait_for_everyone()
        logger.info("saved checkpoint %s", final)
        return final

    def resolve(self, which: str) -> Path:
        """"latest", a step number or a checkpoint folder → the folder (errors name what exists)."""
        if which == "latest":
            steps = self.steps()
            if not steps:
                raise FileNotFoundError(f"--resume latest: no checkpoint under {self.root}")
            return self.path(steps[-1])
        path = self.path(int(which)) if which.isdigit() else Path(which)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume {which}: {path} is not a complete checkpoint "
                                    f"(available steps: {self.steps() or 'none'})")
        return path

    def load(self, which: str) -> int:
        """Restore everything `save` stored; returns the step to continue from."""
        path = self.resolve(which)
        if self._check_weights(path):  # our state dict of trainable weights: frozen ones are absent on purpose
            self.accelerator.load_state(str(path), strict=False)
        else:  # FSDP / DeepSpeed write and check their own layouts
            self.accelerator.load_state(str(path))
        step = json.loads((path / STATE_FILE).read_text())["step"]
        logger.info("resumed from %s (step %d)", path, step)
        return step

    def _only_trainable(self, models, weights, output_dir) -> None:
        """save_state pre-hook: drop frozen parameters from the model state dicts (weights[i] belongs to models[i];
        FSDP and DeepSpeed save through their own paths and pass no state dicts here)."""
        for i, (model, state) in enumerate(zip(models, weights)):
            keep = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in state.items() if k in keep}

    def _check_weights(self, path: Path) -> bool:
        """Whether `path` holds a plain state dict (model.safetensors); raise if its weights are not exactly the
        trainable parameters."""
        weights = path / "model.safetensors"
        if not weights.is_file():
            return False
        with safe_open(str(weights), framework="pt") as f:
            stored = set(f.keys())
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        if stored != trainable:
            missing, extra = sorted(trainable - stored), sorted(stored - trainable)
            raise ConfigError(f"{path}: the checkpoint's weights do not match the trainable parameters (missing "
                             f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                             f"{'...' if len(extra) > 3 else ''}); resume with the config it was saved with "
                             f"({path / 'config.yaml'})")
        return True
