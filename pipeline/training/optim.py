"""AdamW with parameter groups and the warmup → constant / cosine learning-rate schedule (docs/training.md, "The
curriculum")."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError, OptimConfig


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """The trainable parameters in up to four groups: {base, TTT} x {weight decay, none}.

    No weight decay on the model's `no_weight_decay_names()` (biases, norms, gates, scene embedding); TTT parameters
    (`added_parameter_names()`, everything TTT adds) use optim.ttt_lr when set. Each group carries a "name".
    """
    no_decay = set(model.no_weight_decay_names())
    ttt = set(model.added_parameter_names())
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name in ttt, name not in no_decay), []).append(param)
    if not groups:
        raise ConfigError("train.trainable selects no parameter to train")
    ttt_lr = optim.ttt_lr if optim.ttt_lr is not None else optim.lr
    return [{"params": params, "name": f"{'ttt' if is_ttt else 'base'}{'' if decay else '_no_decay'}",
             "lr": ttt_lr if is_ttt else optim.lr, "weight_decay": optim.weight_decay if decay else 0.0}
            for (is_ttt, decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (torch's, or bitsandbytes' AdamW8bit with optim.use_8bit) over `param_groups`."""
    groups = param_groups(model, optim)
    if optim.use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.use_8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, betas=optim.betas, eps=optim.eps)
    return torch.optim.AdamW(groups, betas=optim.betas, eps=optim.eps)


def lr_factor(step: int, base_lr: float, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of a group's base_lr after `step` optimizer steps: linear warmup over warmup_steps, then 1
    (constant) or a cosine from base_lr down to optim.min_lr at total_steps (groups at or below min_lr stay)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant" or base_lr <= optim.min_lr:
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    lr = optim.min_lr + (base_lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr / base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with one `lr_factor` per group (each group decays from its own lr)."""
    lambdas = [lambda step, lr=group["lr"]: lr_factor(step, lr, optim, total_steps) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
