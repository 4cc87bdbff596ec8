"""The samplers a pipeline can use and CogVideoX's noise schedule, named once for sample.py, the demo, the toy
model's recipe and the tests.

diffusers loads on first use, so the names can serve a command line's choices before any model is loaded.
"""

from __future__ import annotations

from typing import Any

SCHEDULERS = ("ddim", "dpm")  # CogVideoXDDIMScheduler, CogVideoXDPMScheduler (DPM-solver++)

# CogVideoX's noise schedule: v-prediction, scaled-linear betas 0.00085 -> 0.012 over 1000 steps, zero-SNR rescale
COGVIDEOX_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, num_train_timesteps=1000,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
    steps_offset=0, timestep_spacing="trailing",
)


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of a name in SCHEDULERS."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    classes = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
    if name not in classes:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    return classes[name]


def scheduler_name(scheduler: Any) -> str:
    """The name in SCHEDULERS of a scheduler object ("dpm" for the DPM-solver, "ddim" otherwise)."""
    return "dpm" if isinstance(scheduler, scheduler_class("dpm")) else "ddim"


def make_scheduler(name: str, config: Any = None) -> Any:
    """A scheduler of kind `name` with `config` (another scheduler's config, e.g. to switch a pipeline's sampler
    keeping its schedule; default: COGVIDEOX_SCHEDULE)."""
    cls = scheduler_class(name)
    return cls(**COGVIDEOX_SCHEDULE) if config is None else cls.from_config(config)
