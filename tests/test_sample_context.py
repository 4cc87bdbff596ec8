"""sample.py --video / --regenerate / --reference / --save-latents end to end (docs/sampling.md), as subprocesses
against the tiny TTT pipeline (8 frames per segment plus one)."""

import numpy as np
import pytest
import torch
from test_sample import assert_one_line_error, run
from tiny_ttt_pipeline import save_tiny_ttt_pipeline

from pipeline.segment_context import latents_path, load_latents
from pipeline.video_io import read_video, write_video

STORY = ["a red ball rolls", "a blue box", "a green tree", "a yellow sun"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_ttt_pipeline(tmp_path_factory.mktemp("sample_context") / "pipeline")


@pytest.fixture(scope="module")
def two(model_dir, tmp_path_factory):
    """A 2-segment video made with --save-latents."""
    folder = tmp_path_factory.mktemp("two")
    result = run("--model", model_dir, "--storyboard", storyboard(folder, 2), "--output", folder / "two.mp4",
                 "--steps", 2, "--save-latents", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "two.mp4"


def storyboard(folder, n: int):
    path = folder / f"story{n}.txt"
    path.write_text("\n".join(STORY[:n]) + "\n")
    return path


def latents_of(video) -> torch.Tensor:
    return load_latents(latents_path(video))[0]


def test_save_latents_writes_them_beside_the_mp4(two):
    assert sorted(p.name for p in two.parent.iterdir() if p.name.startswith("two")) == [
        "two.latents.safetensors", "two.mp4"]
    assert latents_of(two).shape == (1, 5, 4, 4, 4)


def test_extend_keeps_the_saved_latents_exactly(model_dir, two, tmp_path):
    out = tmp_path / "four.mp4"
    result = run("--model", model_dir, "--storyboard", storyboard(tmp_path, 4), "--video", two, "--output", out,
                 "--steps", 2, "--seed", 7, "--save-latents", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"(4 segments; kept 1, 2 from {two} (latents))" in result.stdout
    assert read_video(out)[0].shape[0] == 8 * 4 + 1
    assert torch.equal(latents_of(out)[:, :5], latents_of(two))


def test_regenerate_keeps_the_other_segments(model_dir, two, tmp_path):
    out = tmp_path / "redo.mp4"
    result = run("--model", model_dir, "--storyboard", storyboard(tmp_path, 2), "--video", two, "--regenerate", "2",
                 "--output", out, "--steps", 2, "--seed", 9, "--save-latents", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"kept 1 from {two} (latents)" in result.stdout
    redo, before = latents_of(out), latents_of(two)
    assert torch.equal(redo[:, :3], before[:, :3]) and not torch.equal(redo[:, 3:], before[:, 3:])


def test_without_latents_the_frames_are_encoded(model_dir, two, tmp_path):
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(two.read_bytes())  # no latents beside it
    stale = tmp_path / "stale.mp4"
    stale.write_bytes(two.read_bytes())
    (tmp_path / "stale.latents.safetensors").write_bytes((two.parent / "two.latents.safetensors").read_bytes())
    write_video(read_video(two)[0][::-1].copy(), stale, 8 / 3)  # rewritten after its latents were saved
    for video in (copy, stale):
        result = run("--model", model_dir, "--storyboard", storyboard(tmp_path, 3), "--video", video,
                     "--output", tmp_path / "out.mp4", "--steps", 1, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"kept 1, 2 from {video} (frames)" in result.stdout


def test_reference_clip_is_not_in_the_output(model_dir, two, tmp_path):
    out = tmp_path / "ref.mp4"
    result = run("--model", model_dir, "--storyboard", storyboard(tmp_path, 2), "--reference", two, "--output", out,
                 "--steps", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"after 2 reference segments from {two} (latents)" in result.stdout
    assert read_video(out)[0].shape[0] == 8 * 2


def test_bad_context_is_a_one_line_error(model_dir, two, tmp_path):
    def fails(code, message, *flags, n=2):
        assert_one_line_error(run("--model", model_dir, "--storyboard", storyboard(tmp_path, n), "--steps", 1,
                                  "--output", tmp_path / "x.mp4", *flags, cwd=tmp_path), code, message)

    fails(2, "--regenerate needs --video", "--regenerate", "1")
    fails(2, "--reference cannot be combined with --video", "--video", two, "--reference", two)
    fails(2, f"--video: file not found: {tmp_path / 'no.mp4'}", "--video", tmp_path / "no.mp4")
    fails(1, f"nothing left to generate: --video {two} covers all 2 segments of the storyboard", "--video", two)
    fails(1, "--regenerate: segment 3 is out of range: the video has segments 1 to 2", "--video", two,
          "--regenerate", "1,3")
    fails(1, f"--video {two} covers 2 segments, the storyboard has only 1", "--video", two, n=1)
    frames = read_video(two)[0]
    write_video(frames[:10], tmp_path / "ten.mp4", 8 / 3)
    fails(1, f"--video {tmp_path / 'ten.mp4'}: 10 frames are not a whole number of segments of this model (8 k + 1",
          "--video", tmp_path / "ten.mp4")
    write_video(np.zeros((9, 48, 64, 3), np.uint8), tmp_path / "big.mp4", 8 / 3)
    fails(1, f"--video {tmp_path / 'big.mp4'}: frames are 64x48, the model makes 32x32", "--video",
          tmp_path / "big.mp4")
