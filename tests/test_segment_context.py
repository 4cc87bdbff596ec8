"""Sampling with clean context segments: extend, regenerate, reference (docs/sampling.md).

Tiny shapes as tests/test_pipeline.py: n segments are 3 + 2 (n - 1) latent frames and 8 n + 1 pixel frames.
"""

import numpy as np
import pytest
import torch
from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, HEIGHT, LATENT_CHANNELS, WIDTH
from tiny_ttt_pipeline import tiny_ttt_pipeline

from pipeline import Segment, Storyboard
from pipeline.schedulers import make_scheduler
from pipeline.segment_context import (
    encode_video,
    file_sha256,
    latents_path,
    load_latents,
    parse_segment_list,
    save_latents,
)

TEXTS = ["a red ball", "a blue box", "a green tree", "a yellow sun"]


def story(n: int) -> Storyboard:
    return Storyboard([Segment(t) for t in TEXTS[:n]])


def latent_frames(segment: int) -> slice:
    """Latent frames of 0-based segment i."""
    start = 0 if segment == 0 else FRAMES_FIRST + (segment - 1) * FRAMES_PER_SEGMENT
    return slice(start, FRAMES_FIRST + segment * FRAMES_PER_SEGMENT)


def pixel_frames(segments: int) -> slice:
    """Pixel frames of the first k segments."""
    return slice(0, 8 * segments + 1)


def generate(pipe, n: int, seed: int = 0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(story(n), generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_ttt_pipeline(seed=0)
    with torch.no_grad():  # open gates: segments see each other through TTT
        for name, p in pipe.transformer.named_parameters():
            if ".gate_" in name:
                p.fill_(0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def four(pipe):
    """A 4-segment video (frames and latents)."""
    return generate(pipe, 4)


def test_output_carries_the_final_latents(pipe, four):
    assert four.latents.shape == (1, 9, LATENT_CHANNELS, HEIGHT // 8, WIDTH // 8)
    again = generate(pipe, 4, output_type="latent")
    assert torch.equal(again.frames, four.latents)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_clean_segments_pass_through_the_loop_unchanged(pipe, scheduler):
    pipe.scheduler = make_scheduler(scheduler)  # DPM keeps the previous x0 prediction and adds noise every step
    given = torch.randn(1, 5, LATENT_CHANNELS, HEIGHT // 8, WIDTH // 8)  # 2 segments of arbitrary latents
    seen = []

    def callback(p, step, t, tensors):
        seen.append(tensors["latents"][:, :5].clone())
        return {}

    out = generate(pipe, 3, video_latents=given, output_type="latent", callback_on_step_end=callback)
    assert len(seen) == 3 and all(torch.equal(s, given) for s in seen)
    assert torch.equal(out.frames[:, :5], given)
    assert not torch.equal(out.frames[:, 5:], generate(pipe, 3, output_type="latent").frames[:, 5:])
    pipe.scheduler = make_scheduler("ddim")


def test_kept_segments_are_fed_at_timestep_zero(pipe):
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"]),
                                                      with_kwargs=True)
    try:
        generate(pipe, 3, video_latents=torch.randn(1, 5, LATENT_CHANNELS, 4, 4), regenerate=[0],
                 num_inference_steps=2)
    finally:
        hook.remove()
    assert [tuple(t.shape) for t in seen] == [(2, 3)] * 2  # guidance batches both branches
    for t, step in zip(seen, pipe.scheduler.timesteps):
        assert t.tolist() == [[int(step), 0, int(step)]] * 2


def test_regenerating_segment_3_of_4_keeps_the_others(pipe, four):
    redo = generate(pipe, 4, seed=1, video_latents=four.latents, regenerate=[2])
    for kept in (0, 1, 3):
        assert torch.equal(redo.latents[:, latent_frames(kept)], four.latents[:, latent_frames(kept)])
    assert not torch.equal(redo.latents[:, latent_frames(2)], four.latents[:, latent_frames(2)])
    # the VAE decode is causal: frames before the regenerated segment are unchanged
    np.testing.assert_array_equal(redo.frames[0, pixel_frames(2)], four.frames[0, pixel_frames(2)])
    assert not np.array_equal(redo.frames[0, pixel_frames(3)], four.frames[0, pixel_frames(3)])


def test_extension_starts_with_the_input(pipe):
    two = generate(pipe, 2)
    extended = generate(pipe, 4, seed=5, video_latents=two.latents)
    assert extended.frames.shape[1] == 8 * 4 + 1
    assert torch.equal(extended.latents[:, :5], two.latents)
    np.testing.assert_array_equal(extended.frames[0, pixel_frames(2)], two.frames[0])


def test_extension_from_frames_encodes_them_with_the_vae(pipe):
    two = generate(pipe, 2)
    frames = two.frames[0]  # (17, H, W, 3) in [0, 1]
    encoded = encode_video(pipe.vae, pipe.video_processor, frames, HEIGHT, WIDTH, FRAMES_FIRST, FRAMES_PER_SEGMENT)
    assert encoded.shape == two.latents.shape
    # a fixed encoding: no autograd graph (which would keep the VAE's activations of every frame alive), even when
    # called outside the pipeline's no-grad call, on a VAE whose weights require grad
    assert any(p.requires_grad for p in pipe.vae.parameters())
    assert torch.is_grad_enabled() and encoded.grad_fn is None and not encoded.requires_grad
    extended = generate(pipe, 3, video=frames, output_type="latent")
    assert torch.equal(extended.frames[:, :5], encoded)
    uint8 = generate(pipe, 3, video=(frames * 255).round().astype(np.uint8), output_type="latent")
    assert torch.isfinite(uint8.frames).all()


def test_a_reference_clip_is_context_not_output(pipe):
    clip = generate(pipe, 1, seed=3)
    other = generate(pipe, 1, seed=4)
    with_clip = generate(pipe, 2, reference_latents=clip.latents)
    assert with_clip.frames.shape[1] == 8 * 2  # the reference's 9 frames are dropped, the story's 16 kept
    assert torch.equal(with_clip.latents[:, :FRAMES_FIRST], clip.latents)
    with_other = generate(pipe, 2, reference_latents=other.latents)
    assert not np.array_equal(with_clip.frames, with_other.frames)  # TTT carries the reference into the story
    as_latents = generate(pipe, 2, reference_latents=clip.latents, output_type="latent")
    assert torch.equal(as_latents.frames, with_clip.latents[:, FRAMES_FIRST:])


@pytest.mark.parametrize("kwargs, message", [
    ({"video_latents": torch.zeros(1, 9, 4, 4, 4)}, "nothing left to generate: the video covers all 4 segments"),
    ({"video_latents": torch.zeros(1, 9, 4, 4, 4), "regenerate": [4]},
     "regenerate: segment 5 is out of range: the video has segments 1 to 4"),
    ({"video_latents": torch.zeros(1, 6, 4, 4, 4)}, "video: 6 latent frames are not a whole number of segments"),
    ({"video_latents": torch.zeros(1, 3, 4, 2, 2)}, "video: latents of shape (1, 3, 4, 2, 2) do not fit"),
    ({"regenerate": [1]}, "regenerate: needs a video"),
    ({"video": np.zeros((10, HEIGHT, WIDTH, 3), np.float32)}, "10 frames are not a whole number of segments (8 k + 1"),
    ({"video": np.zeros((9, 16, 16, 3), np.float32)}, "video: frames are 16x16, the pipeline makes 32x32"),
    ({"video_latents": torch.zeros(1, 3, 4, 4, 4), "reference_latents": torch.zeros(1, 3, 4, 4, 4)},
     "reference: cannot be combined with a video"),
], ids=["nothing-left", "out-of-range", "frames", "size", "no-video", "pixel-frames", "pixel-size", "both"])
def test_bad_context_is_a_clear_error(pipe, kwargs, message):
    with pytest.raises(ValueError) as info:
        generate(pipe, 4, num_inference_steps=1, **kwargs)
    assert message in str(info.value)


def test_segment_lists_and_latent_files(tmp_path):
    assert parse_segment_list("3, 5,3", 6) == [2, 4]
    with pytest.raises(ValueError, match="segment 7 is out of range: the video has segments 1 to 6"):
        parse_segment_list("7", 6)
    with pytest.raises(ValueError, match="expected segment numbers like 3,5"):
        parse_segment_list("3-5", 6)
    assert latents_path(tmp_path / "out.mp4") == str(tmp_path / "out.latents.safetensors")
    latents = torch.randn(1, 5, 4, 4, 4)
    (tmp_path / "x.mp4").write_bytes(b"not really a video")
    save_latents(latents, tmp_path / "x.safetensors", video=tmp_path / "x.mp4")
    loaded, video_hash = load_latents(tmp_path / "x.safetensors")
    assert torch.equal(loaded, latents) and video_hash == file_sha256(tmp_path / "x.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mp4", "x.safetensors"]
    with pytest.raises(ValueError, match="not a latents file written by sample.py --save-latents"):
        load_latents(tmp_path / "x.mp4")
