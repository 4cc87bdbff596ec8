"""Training building blocks used by train.py: components, optimizer and schedule, loss, checkpoints, validation."""

from .checkpoint import Checkpointer
from .components import BUILDERS, build_components, register_builder, training_scheduler
from .export import ema_weights, export_pipeline, full_transformer
from .loss import DiffusionCollate, diffusion_loss
from .optim import build_optimizer, build_scheduler, param_groups
from .validation import validate

__all__ = ["BUILDERS", "Checkpointer", "DiffusionCollate", "build_components", "build_optimizer", "build_scheduler",
           "diffusion_loss", "ema_weights", "export_pipeline", "full_transformer", "param_groups", "register_builder",
           "training_scheduler", "validate"]
