"""Named presets of diffusers' cache hooks for faster sampling (`sample.py --cache NAME`, the demo's Cache setting).

Each preset is a diffusers config given to `pipe.transformer.enable_cache` (CacheMixin); the TTT transformer registers
its block for them (`CogVideoXTTTTransformer3DModel.enable_cache`). What each reuses, what it costs in the toy
metrics, and why some settings cannot combine: docs/sampling.md, "Faster sampling"; numbers in docs/performance.md.

- first-block: FirstBlockCacheConfig. Runs block 0; when its output residual changed by less than `threshold`
  (relative mean) since the last full step, the other blocks are skipped and their cached residual added.
- taylorseer: TaylorSeerCacheConfig in lite mode. Every block is skipped on the steps between full ones and the
  output projection is extrapolated by a first-order Taylor series from the last full steps. (Its default, non-lite
  patterns match modules whose names end in "attn": none in CogVideoX, whose attention is `attn1`.)
- pab: PyramidAttentionBroadcastConfig. The segment-local attention (attn1) output is reused every other step
  inside the timestep range; TTT and the feed-forward always run.
- faster: FasterCacheConfig. attn1 outputs are extrapolated from the last two computed ones every other step, and
  the unconditional branch of guidance is approximated from the conditional one (frequency-wise) on 4 steps of 5.
"""

from __future__ import annotations

from typing import Any

CACHES = ("none", "first-block", "taylorseer", "pab", "faster")


def cache_config(name: str, pipe) -> Any | None:
    """The diffusers cache config of preset `name` for `pipe` (a TTTVideoPipeline), None for "none"."""
    import torch
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    if name not in CACHES:
        raise ValueError(f"cache: expected one of {', '.join(CACHES)}, got {name!r}")

    def timestep() -> int:
        return int(pipe.current_timestep)

    if name == "first-block":
        return FirstBlockCacheConfig(threshold=0.2)
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=3, max_order=1,
                                     taylor_factors_dtype=torch.float32, use_lite_mode=True)
    if name == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(100, 800),
                                               current_timestep_callback=timestep)
    if name == "faster":
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                                 low_frequency_weight_update_timestep_range=(99, 641),
                                 high_frequency_weight_update_timestep_range=(-1, 301),
                                 unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 641),
                                 attention_weight_callback=lambda _: 0.3, tensor_format="BFCHW",
                                 current_timestep_callback=timestep)
    return None


# the presets whose hooks keep one state per cache context (the pipeline names each transformer call: "cond_uncond",
# "cond", "uncond", "cond_without_memory", "part_<k>"); the others keep one state for every call
PER_CONTEXT = ("first-block", "taylorseer")


def cache_problems(name: str, guidance_scale: float | None, cfg_mode: str, memory_guidance: bool = False) -> list[str]:
    """Why preset `name` cannot run with these call settings (empty when it can); guidance_scale None: not known yet
    (the model's own, before it is loaded), so only the rules that do not depend on it are checked.

    FasterCache approximates the unconditional half of ONE batched guidance call, so it needs guidance with
    cfg_mode "batched". Pyramid Attention Broadcast keeps one cached attention output per layer, not one per guidance
    branch: with cfg_mode "sequential" the conditional call would reuse the unconditional call's attention. Memory
    guidance adds a call of its own (the conditional branch without TTT): only the PER_CONTEXT presets keep its state
    apart from the others'.
    """
    if memory_guidance and name != "none" and name not in PER_CONTEXT:
        return [f"cache '{name}' keeps one state for every transformer call, and memory guidance's pass without TTT is "
                f"a call of its own: use {' or '.join(PER_CONTEXT)} (or no cache) with memory guidance"]
    if name == "faster" and ((guidance_scale is not None and guidance_scale <= 1) or cfg_mode != "batched"):
        return ["cache 'faster' approximates the unconditional half of a batched guidance call: it needs guidance > 1 "
                "and cfg_mode 'batched'"]
    if name == "pab" and cfg_mode == "sequential":
        return ["cache 'pab' keeps one attention output per layer, shared by both guidance branches when they run in "
                "turn: use cfg_mode 'batched'"]
    return []


def set_cache(pipe, name: str) -> None:
    """Enables preset `name` on pipe.transformer (replacing any cache enabled before); "none" disables caching."""
    transformer = pipe.transformer
    config = cache_config(name, pipe)
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    if config is not None:
        transformer.enable_cache(config)
