"""Checkpoints: Accelerate state every N steps, written atomically, the last K kept, resumable exactly.

Layout: output_dir/checkpoints/step-00000500/ holds what `accelerator.save_state` writes (model, optimizer,
scheduler, RNG states of every process) plus the EMA (ema.pt; one ema-rankNNNNN.pt per process where FSDP or
DeepSpeed shard it), config.yaml (the resolved config) and trainer_state.json ({"step": 500}). A checkpoint is
written to a hidden temporary folder (.tmp-step-00000500) and renamed when every process has finished, so a folder
named step-* is always complete; temporaries left by a killed run are removed at the next start. Where the base
model is frozen, only the trainable parameters are stored (the base is re-read from the config's model section on
resume).

A new run refuses a folder that holds another run's checkpoints (`overwrite` clears it); a resumed run compares
its config with the checkpoint's and refuses changed training-defining keys unless they are allowed explicitly.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from safetensors import SafetensorError, safe_open
from torch import nn

from ..atomic import atomic_write_text
from .config import Config, ConfigError, load_config, save_config, to_dict

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-step-"
# what a new run finds in an output_dir that another run wrote (removed by `overwrite`)
RUN_OUTPUTS = ("checkpoints", "final", "logs", "validation", "metrics.jsonl", "config.yaml")
# keys that change how a run executes or reports, not what it learns: they may differ on resume
RUNTIME_KEYS = ("output_dir", "data.num_workers", "data.vae_tiling", "train.gradient_checkpointing",
                "model.ttt.ttt_backend", "model.ttt.ttt_checkpoint_group", "model.ttt.checkpoint_ttt",
                "checkpoint.", "log.", "validation.")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the message says where and what to do."""


class Checkpointer:
    """start(resume) / maybe_save(step) / save(step) / load(which) over output_dir/checkpoints, keeping the last
    `keep`. `model`, `optimizer` and `lr_scheduler` are the prepared ones (the model's trainable parameters are
    stored); `ema` is the run's EMAModel or None. `last` is the checkpoint this run last saved or resumed from."""

    def __init__(self, accelerator: Accelerator, config: Config, model: nn.Module, optimizer=None, lr_scheduler=None,
                 ema=None):
        self.accelerator, self.config, self.model, self.ema = accelerator, config, model, ema
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.output_dir = Path(config.output_dir)
        self.root = self.output_dir / "checkpoints"
        self.every, self.keep, self.total = config.checkpoint.every, config.checkpoint.keep, config.train.steps
        self.last: Path | None = None
        accelerator.register_save_state_pre_hook(self._only_trainable)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.match(p.name)))

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def start(self, resume: str | None, overwrite: bool = False, allow_changes: tuple[str, ...] = ()) -> int:
        """Begin a run (call on every process): remove temporaries a killed run left, then resume from `resume`
        ("latest", a step, a folder) or, for a new run, check that output_dir holds no other run (`overwrite`
        removes it). `allow_changes`: config keys (or sections, "optim") that may differ from a resumed
        checkpoint's. Returns the step to continue from."""
        held = self._other_run() if resume is None else None
        if held and not overwrite:  # raised on every process, before anything is removed
            raise ConfigError(f"output_dir={self.output_dir} holds another run ({held}); continue it with --resume "
                              "latest, choose a new output_dir, or pass --overwrite to delete it and start afresh")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            remove_leftovers(self.output_dir)
            if held:
                self._remove_run()
        self.accelerator.wait_for_everyone()
        return self.load(resume, allow_changes) if resume is not None else 0

    def should_save(self, step: int, stop_at: int) -> bool:
        """Every `checkpoint.every` steps and at the last step; also where this invocation stops early."""
        last = step == self.total
        return (step == stop_at and not last) or (self.every > 0 and (step % self.every == 0 or last))

    def maybe_save(self, step: int, stop_at: int) -> Path | None:
        return self.save(step) if self.should_save(step, stop_at) else None

    def save(self, step: int) -> Path:
        """Save the state after `step` optimizer steps (call on every process)."""
        final, tmp = self.path(step), self.root / f"{TMP_PREFIX}{step:08d}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left over from a run that died while saving
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(tmp))
            self._save_ema(tmp)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                save_config(self.config, tmp / "config.yaml")
                atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step}) + "\n")
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                for old in self.steps()[:-self.keep] if self.keep > 0 else []:
                    shutil.rmtree(self.path(old))
        except (OSError, RuntimeError, SafetensorError) as e:
            if not disk_full(e, self.output_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"no space left on device while saving checkpoint step {step} under {self.root}; "
                                  f"free space (or lower checkpoint.keep) and continue with --resume latest "
                                  f"(last complete checkpoint: {self.last or 'none'})") from None
        self.accelerator.wait_for_everyone()
        self.last = final
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

    def load(self, which: str, allow_changes: tuple[str, ...] = ()) -> int:
        """Restore everything `save` stored; returns the step to continue from. The current config must agree with
        the checkpoint's on every training-defining key not in `allow_changes`; allowed optimizer and schedule
        changes are applied (not the stored values)."""
        path = self.resolve(which)
        changed = self._compare_config(path, allow_changes)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups] \
            if self.optimizer is not None else []
        if self._check_weights(path):  # our state dict of trainable weights: frozen ones are absent on purpose
            self.accelerator.load_state(str(path), strict=False)
        else:  # FSDP / DeepSpeed write and check their own layouts
            self.accelerator.load_state(str(path))
        self._load_ema(path)
        if any(k.startswith(("optim.", "train.steps")) for k in changed) and fresh:
            self._apply_hyperparameters(fresh)
        step = json.loads((path / STATE_FILE).read_text())["step"]
        self.last = path
        logger.info("resumed from %s (step %d)", path, step)
        return step

    def _other_run(self) -> str | None:
        """What of another run output_dir holds (its checkpoints or export), or None."""
        steps = self.steps()
        if steps:
            return f"checkpoints of steps {steps}"
        return "an exported final/ pipeline" if (self.output_dir / "final").exists() else None

    def _remove_run(self) -> None:
        """--overwrite: delete the previous run's outputs."""
        for name in RUN_OUTPUTS:
            path = self.output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        logger.warning("--overwrite: removed the previous run's outputs from %s", self.output_dir)

    def _compare_config(self, path: Path, allow_changes: tuple[str, ...]) -> list[str]:
        """Keys whose value differs between the checkpoint's config and this run's; raise for training-defining
        ones not allowed, naming each key and both values."""
        saved_file = path / "config.yaml"
        if not saved_file.is_file():
            raise ConfigError(f"{path}: config.yaml missing; not a checkpoint train.py wrote")
        saved, now = _flat(to_dict(load_config(saved_file))), _flat(to_dict(self.config))
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        refused = [k for k in changed if not k.startswith(RUNTIME_KEYS) and not _matches(k, allow_changes)]
        describe = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in refused)
        if refused:
            raise ConfigError(f"--resume: the config differs from the checkpoint's ({saved_file}) in training-defining "
                              f"keys: {describe}; resume with the checkpoint's values, or pass --allow-config-change "
                              f"{','.join(refused)} to apply the new ones")
        for k in changed:
            logger.warning("config differs from the checkpoint's: %s: %r in the checkpoint, %r now (%s)", k,
                           saved.get(k), now.get(k), "runtime-only" if k.startswith(RUNTIME_KEYS) else "allowed")
        return changed

    def _apply_hyperparameters(self, fresh: list[dict]) -> None:
        """Put this config's optimizer hyperparameters back over the loaded ones (load_state_dict restores the old
        lr, weight decay, betas) and re-evaluate the schedule at the loaded step with the new base lrs."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # Accelerate's wrapper
        for group, values in zip(self.optimizer.param_groups, fresh):
            group.update(values)
        scheduler.base_lrs = [values["initial_lr"] for values in fresh]
        for group, base, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _ema_files(self, folder: Path) -> tuple[Path, bool]:
        """This process's EMA file and whether the EMA is sharded (one file per process)."""
        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        name = f"ema-rank{self.accelerator.process_index:05d}.pt" if sharded else "ema.pt"
        return folder / name, sharded

    def _save_ema(self, folder: Path) -> None:
        if self.ema is None:
            return
        path, sharded = self._ema_files(folder)
        if sharded or self.accelerator.is_main_process:
            state = dict(self.ema.state_dict())
            state["shadow_params"] = [_local(p).detach().cpu() for p in self.ema.shadow_params]
            torch.save(state, path)

    def _load_ema(self, folder: Path) -> None:
        """Copy the stored EMA into the live shadow parameters in place: they keep the device (and, under FSDP,
        the sharding) of the model they follow."""
        if self.ema is None:
            return
        path, sharded = self._ema_files(folder)
        if not path.is_file():
            stored = sorted(p.name for p in folder.glob("ema*.pt"))
            raise ConfigError(f"{folder}: no {path.name} (EMA files there: {stored or 'none'}); an EMA sharded over "
                              "processes resumes with the same number of processes")
        state = torch.load(path, map_location="cpu", weights_only=True)
        shadow = state.pop("shadow_params")
        if len(shadow) != len(self.ema.shadow_params):
            raise ConfigError(f"{path}: {len(shadow)} EMA tensors, the trainable parameters are "
                              f"{len(self.ema.shadow_params)}")
        self.ema.load_state_dict({**state, "shadow_params": None})
        with torch.no_grad():
            for live, stored in zip(self.ema.shadow_params, shadow):
                _local(live).copy_(stored)

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


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Remove the temporary folders a killed run left: checkpoints/.tmp-step-* (Checkpointer.save) and .final.*
    (pipeline/atomic.py's temporaries of the export)."""
    output_dir = Path(output_dir)
    found = [*(output_dir / "checkpoints").glob(f"{TMP_PREFIX}*"), *output_dir.glob(".final.*")]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if found:
        logger.warning("removed %d temporary folder(s) left by an interrupted run: %s", len(found),
                       ", ".join(p.name for p in found))
    return found


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC from Python, the text of safetensors' (Rust) or
    torch.save's (C++) errors, which carry no errno, or no free space left where the file was going."""
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or "StorageFull" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def _flat(section: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in section.items():
        if isinstance(value, dict) and key != "builder_args":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _matches(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allowed)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
