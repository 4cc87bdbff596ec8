"""Training building blocks used by train.py: components, optimizer and schedule, loss, checkpoints, validation."""

from .checkpoint import Checkpointer, CheckpointError
from .components import BUILDERS, build_components, register_builder, training_scheduler
from .export import build_pipeline, ema_weights, export_final, export_pipeline, full_transformer
from .logging import MetricLogger
from .loss import DiffusionCollate, LossTerms, diffusion_loss, diffusion_terms
from .optim import build_optimizer, build_scheduler, param_groups
from .validation import Validator, validate

__all__ = ["BUILDERS", "CheckpointError", "Checkpointer", "DiffusionCollate", "LossTerms", "MetricLogger", "Validator",
           "build_components", "build_optimizer", "build_scheduler", "build_pipeline", "diffusion_loss",
           "diffusion_terms", "ema_weights",
           "export_final", "export_pipeline", "full_transformer", "param_groups", "register_builder",
           "training_scheduler", "validate"]
