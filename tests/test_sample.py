"""sample.py end to end, as a subprocess, against a tiny TTT pipeline saved with save_pretrained."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, HEIGHT, WIDTH, tiny_components

from models import CogVideoXTTTTransformer3DModel
from pipeline import TTTVideoPipeline
from pipeline.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    components = tiny_components()
    transformer = CogVideoXTTTTransformer3DModel.from_base(
        components.pop("transformer"), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT)
    path = tmp_path_factory.mktemp("sample") / "pipeline"
    TTTVideoPipeline(transformer=transformer, **components).save_pretrained(path)
    return path


@pytest.fixture
def short_story(tmp_path) -> Path:
    path = tmp_path / "short.txt"
    path.write_text("a red ball rolls\n\na blue box\n")  # two scenes of one segment, within the 8-token budget
    return path


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SAMPLE), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sample.py: error: ")]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_renders_a_storyboard_to_mp4(model_dir, short_story, tmp_path):
    output = tmp_path / "videos" / "short.mp4"
    result = run("--model", model_dir, "--storyboard", short_story, "--output", output, "--steps", 1,
                 "--scheduler", "dpm", "--cfg-mode", "sequential", "--seed", 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(rf"wrote {re.escape(str(output))}: 6\.38 s, 17 frames at 2\.66667 fps \(2 segments\), "
                         r"generated in \d+\.\d s\n", result.stdout)
    assert match, result.stdout
    frames, fps = read_video(output)
    assert frames.shape == (17, HEIGHT, WIDTH, 3)  # 8 frames per segment x 2 + the first
    assert fps == pytest.approx(8 / 3, rel=1e-3)
    assert sorted(p.name for p in output.parent.iterdir()) == ["short.mp4"]


def test_renders_with_a_cache_hook(model_dir, short_story, tmp_path):
    output = tmp_path / "cached.mp4"
    result = run("--model", model_dir, "--storyboard", short_story, "--output", output, "--steps", 3, "--cache",
                 "first-block", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_video(output)[0].shape == (17, HEIGHT, WIDTH, 3)


def test_a_missing_default_model_is_a_usage_error(tmp_path, monkeypatch):
    # in-process, with the default path pointed away (the real models/default/ is bundled)
    sys.path.insert(0, str(ROOT))
    import sample

    monkeypatch.setattr(sample, "DEFAULT_MODEL", tmp_path / "models" / "default")
    with pytest.raises(sample.UsageError, match=r"the default model is missing: no folder .*models/default; restore "
                                                r"it with `git checkout models/default`"):
        sample.main([])


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x' (see --help)"),
    (["--max-segments", "0"], "--max-segments must be at least 1, got 0"),
    (["--guidance", "-1"], "--guidance must be >= 0, got -1.0"),
    (["--cfg-mode", "fast"], "argument --cfg-mode: invalid choice: 'fast'"),
    (["--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--cache", "fastest"], "argument --cache: invalid choice: 'fastest'"),
    (["--cache", "pab", "--cfg-mode", "sequential"], "--cache pab: cache 'pab' keeps one attention output per layer"),
    (["--cache", "faster", "--guidance", "1"], "--cache faster: cache 'faster' approximates the unconditional half"),
], ids=["steps-zero", "steps-text", "max-segments", "guidance", "cfg-mode", "scheduler", "dtype", "unknown", "cache",
        "cache-pab-sequential", "cache-faster-no-guidance"])
def test_bad_flags(flags, message, tmp_path):
    assert_one_line_error(run(*flags, cwd=tmp_path), 2, message)


def test_bad_paths(model_dir, short_story, tmp_path):
    assert_one_line_error(run("--model", tmp_path / "nowhere", "--storyboard", short_story, cwd=tmp_path), 2,
                          f"--model: no such directory: {tmp_path / 'nowhere'}")
    # "folder/name" with a local folder is a missing directory, not a hub id to look up (no network wait)
    (tmp_path / "models").mkdir()
    assert_one_line_error(run("--model", "models/default", "--storyboard", short_story, cwd=tmp_path), 2,
                          "--model: no such directory: models/default")
    assert_one_line_error(run("--model", model_dir, "--storyboard", short_story, "--ttt-adapter",
                              tmp_path / "ttt.safetensors", cwd=tmp_path), 2,
                          f"--ttt-adapter: file not found: {tmp_path / 'ttt.safetensors'}")
    assert_one_line_error(run("--model", model_dir, "--storyboard", tmp_path / "missing.json", cwd=tmp_path), 1,
                          f"{tmp_path / 'missing.json'}: storyboard file not found")


def test_bad_storyboards(model_dir, short_story, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"scenes": [{"segments": [{"text": "a"}]}')
    assert_one_line_error(run("--model", model_dir, "--storyboard", broken, cwd=tmp_path), 1,
                          f"{broken} line 1, column 42: invalid JSON: Expecting ',' delimiter")
    assert_one_line_error(run("--model", model_dir, "--storyboard", short_story, "--max-segments", 1, cwd=tmp_path), 1,
                          "storyboard has 2 segments (6 s); the maximum is 1 (3 s)")


def test_model_directory_without_a_pipeline(short_story, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("--model", empty, "--storyboard", short_story, cwd=tmp_path), 1,
                          f"--model {empty}: no pipeline there (no model_index.json; save one with "
                          "TTTVideoPipeline.save_pretrained)")


def test_text_over_the_token_budget(model_dir, tmp_path):
    story = tmp_path / "long.txt"
    story.write_text("one two three four five six seven eight nine\n")
    assert_one_line_error(run("--model", model_dir, "--storyboard", story, "--steps", 1, cwd=tmp_path), 1,
                          f"{story} line 1: text has 11 tokens, over the text encoder's budget of 8 (shorten it)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_gpu_flags_without_a_gpu(model_dir, short_story, tmp_path):
    assert_one_line_error(run("--model", model_dir, "--storyboard", short_story, "--device", "cuda", cwd=tmp_path), 2,
                          "--device cuda: no CUDA device is available")
    assert_one_line_error(run("--model", model_dir, "--storyboard", short_story, "--offload", cwd=tmp_path), 2,
                          "--offload moves models between the CPU and a GPU; it needs a CUDA --device")
