"""diffusers' cache hooks (transformer.enable_cache) on the tiny TTT pipeline: each preset of pipeline/cache.py skips
work and stays within a stated tolerance of the uncached run."""

import pytest
import torch
from diffusers import FirstBlockCacheConfig
from test_pipeline import make_pipeline, story

from pipeline.cache import CACHES, cache_config, cache_problems, set_cache

STEPS = 6
# relative L2 distance of the final latents to the uncached run's (measured on this tiny model at 6-10 steps:
# taylorseer ~0.02, pab ~0.01, faster ~0.04; first-block is run with threshold 0.5)
TOLERANCE = {"first-block": 0.1, "taylorseer": 0.1, "pab": 0.05, "faster": 0.15}


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline()


def run_counting(pipe, **kwargs) -> tuple[torch.Tensor, int]:
    """Final latents of a 3-segment story and how many Linear layers of the blocks ran."""
    calls = []
    linears = [m for m in pipe.transformer.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in linears]
    try:
        latents = pipe(story(["a red ball rolls in", "the ball jumps", "a blue box spins"], [2]),
                       num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent",
                       **kwargs).frames
    finally:
        for h in handles:
            h.remove()
    return latents, len(calls)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def uncached(pipe):
    return run_counting(pipe)


@pytest.mark.parametrize("name", CACHES[1:])
def test_cache_preset_skips_work_within_tolerance(pipe, uncached, name):
    reference, full_calls = uncached
    if name == "first-block":  # the preset's 0.2 suits the default model; 0.5 surely skips on this random one
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    else:
        set_cache(pipe, name)
    try:
        latents, calls = run_counting(pipe)
        again, _ = run_counting(pipe)
    finally:
        set_cache(pipe, "none")
    assert calls < full_calls, f"{name} skipped nothing"
    assert relative_error(latents, reference) < TOLERANCE[name]
    assert torch.equal(latents, again), "the hooks' state must be reset between calls"
    assert torch.equal(run_counting(pipe)[0], reference), "disabling the cache restores the uncached model"


def test_sequential_guidance_with_first_block_cache(pipe, uncached):
    """FirstBlockCache keeps one state per guidance branch (the pipeline's cache_context names them)."""
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        sequential, calls = run_counting(pipe, cfg_mode="sequential")
    finally:
        set_cache(pipe, "none")
    assert calls < 2 * uncached[1]
    assert relative_error(sequential, uncached[0]) < TOLERANCE["first-block"]


@pytest.mark.parametrize("name", ["first-block", "taylorseer"])
def test_memory_guidance_with_a_per_context_cache(pipe, name):
    """Memory guidance's pass without TTT is a call of its own ("cond_without_memory"): FirstBlockCache and TaylorSeer
    keep its state apart from the guided call's, skip work in both and stay within their tolerance of the uncached
    memory-guided run; the hooks that keep one state for every call are refused before any step."""
    memory = {"memory_guidance_scale": 2.0}
    reference, full_calls = run_counting(pipe, **memory)
    assert relative_error(reference, run_counting(pipe)[0]) > 1e-3  # memory guidance changes the run
    if name == "first-block":
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    else:
        set_cache(pipe, name)
    try:
        latents, calls = run_counting(pipe, **memory)
        again, _ = run_counting(pipe, **memory)
    finally:
        set_cache(pipe, "none")
    assert calls < full_calls, f"{name} skipped nothing"
    assert relative_error(latents, reference) < TOLERANCE[name]
    assert torch.equal(latents, again)
    for refused in ("pab", "faster"):
        set_cache(pipe, refused)
        try:
            with pytest.raises(ValueError, match="memory_guidance_scale: not combined with"):
                run_counting(pipe, **memory)
        finally:
            set_cache(pipe, "none")


def test_cache_settings_that_cannot_combine_are_named():
    assert cache_problems("faster", 6.0, "batched") == []
    assert "guidance" in cache_problems("faster", 1.0, "batched")[0]
    assert "batched" in cache_problems("faster", 6.0, "sequential")[0]
    assert "batched" in cache_problems("pab", 6.0, "sequential")[0]
    assert cache_problems("first-block", 1.0, "sequential") == []
    assert cache_problems("faster", None, "batched") == []  # the model's guidance, not known yet
    assert "batched" in cache_problems("faster", None, "sequential")[0]
    for name in ("first-block", "taylorseer", "none"):
        assert cache_problems(name, 6.0, "batched", memory_guidance=True) == []
    for name in ("pab", "faster"):
        assert "memory guidance's pass without TTT" in cache_problems(name, 6.0, "batched", memory_guidance=True)[0]
    with pytest.raises(ValueError, match="expected one of"):
        cache_config("fastest", None)


def test_demo_settings_check_the_cache():
    from pipeline.demo.worker import Settings, SettingsError

    assert Settings(cache="pab").checked().cache == "pab"
    with pytest.raises(SettingsError, match="cache: expected one of none, first-block"):
        Settings(cache="fastest").checked()
    with pytest.raises(SettingsError, match="cache: cache 'faster' approximates"):
        Settings(guidance=1.0, cache="faster").checked()
    assert Settings(cache="taylorseer", memory_guidance=2).checked().memory_guidance == 2.0
    with pytest.raises(SettingsError, match="cache: cache 'pab' keeps one state for every transformer call"):
        Settings(cache="pab", memory_guidance=2).checked()
