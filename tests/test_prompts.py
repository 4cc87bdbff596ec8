"""diffusers' prompt arguments on TTTVideoPipeline: prompt / negative_prompt as a storyboard, num_videos_per_prompt."""

import pytest
import torch
from test_pipeline import make_pipeline

from pipeline import Segment, Storyboard, StoryboardError


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline(scene_embedding=True)


def latents(pipe, seed=0, **kwargs) -> torch.Tensor:
    generator = [torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list) else \
        torch.Generator().manual_seed(seed)
    return pipe(num_inference_steps=2, generator=generator, output_type="latent", **kwargs).frames


def test_prompt_list_is_one_scene(pipe):
    by_prompt = latents(pipe, prompt=["a red ball rolls in", "the ball jumps"], negative_prompt="dark")
    board = Storyboard([Segment("a red ball rolls in"), Segment("the ball jumps")])
    torch.testing.assert_close(by_prompt, latents(pipe, storyboard=board, negative_text="dark"), atol=0, rtol=0)


def test_prompt_list_of_lists_is_scenes_with_per_segment_negatives(pipe):
    by_prompt = latents(pipe, prompt=[["a red ball rolls in", "the ball jumps"], ["a blue box"]],
                        negative_prompt=[["dark", ""], ["blurry"]])
    board = Storyboard([Segment("a red ball rolls in", "dark"), Segment("the ball jumps", ""),
                        Segment("a blue box", "blurry", scene_start=True)])
    torch.testing.assert_close(by_prompt, latents(pipe, storyboard=board), atol=0, rtol=0)
    one_scene = latents(pipe, prompt=["a red ball rolls in", "the ball jumps", "a blue box"],
                        negative_prompt=["dark", "", "blurry"])
    assert not torch.equal(one_scene, by_prompt)  # the scene transition reaches the transformer


def test_a_string_prompt_is_one_segment(pipe):
    assert latents(pipe, prompt="a red ball").shape[1] == pipe.transformer.num_latent_frames(1)


def test_num_videos_per_prompt_batches_videos_each_from_its_own_noise(pipe):
    prompt = ["a red ball rolls in", "the ball jumps"]
    both = latents(pipe, seed=[3, 4], prompt=prompt, num_videos_per_prompt=2)
    assert both.shape[0] == 2
    for b, seed in enumerate((3, 4)):
        torch.testing.assert_close(both[b:b + 1], latents(pipe, seed=seed, prompt=prompt), atol=1e-5, rtol=1e-5)
    frames = pipe(prompt=prompt, num_videos_per_prompt=2, num_inference_steps=1, output_type="np").frames
    assert frames.shape[0] == 2


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, ValueError, "pass a storyboard or a prompt"),
    ({"storyboard": "x.json", "prompt": "a ball"}, ValueError, "either storyboard or prompt"),
    ({"prompt": "a ball", "negative_prompt": "dark", "negative_text": "cold"}, ValueError,
     "either negative_prompt or negative_text"),
    ({"prompt": ["a ball", "a box"], "negative_prompt": ["dark"]}, StoryboardError,
     "negative_prompt: expected one text per segment"),
    ({"prompt": [["a ball"], []]}, StoryboardError, "prompt[1]: an empty scene"),
    ({"prompt": ["a ball", ""]}, StoryboardError, "prompt[1].text: empty"),
    ({"prompt": ["a ball", ["a box"]]}, StoryboardError, "prompt: expected a string, a list of strings"),
    ({"prompt": "a ball", "num_videos_per_prompt": 0}, ValueError, "num_videos_per_prompt must be"),
    ({"prompt": "a ball", "latents": torch.zeros(1, 3, 4, 4, 4), "num_videos_per_prompt": 2}, ValueError,
     "latents: expected batch size num_videos_per_prompt=2, got 1"),
], ids=["none", "both", "two-negatives", "negative-nesting", "empty-scene", "empty-text", "mixed", "zero-videos",
        "latents-batch"])
def test_bad_prompt_arguments_are_clear_errors(pipe, kwargs, error, message):
    with pytest.raises(error) as info:
        pipe(num_inference_steps=1, **kwargs)
    assert message in str(info.value)
