"""sample.py end to end, as a subprocess, against a tiny TTT pipeline saved with save_pretrained."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
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
                         r"1 steps at guidance 6, generated in \d+\.\d s\n", result.stdout)
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
    (["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number >= 0, got inf"),
    (["--seed", "-1"], "--seed must be from 0 to 18446744073709551615, got -1"),
    (["--seed", str(2**64)], "--seed must be from 0 to 18446744073709551615, got 18446744073709551616"),
    (["--cfg-mode", "fast"], "argument --cfg-mode: invalid choice: 'fast'"),
    (["--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--cache", "fastest"], "argument --cache: invalid choice: 'fastest'"),
    (["--cache", "pab", "--cfg-mode", "sequential"], "--cache pab: cache 'pab' keeps one attention output per layer"),
    (["--cache", "faster", "--guidance", "1"], "--cache faster: cache 'faster' approximates the unconditional half"),
    (["--memory-guidance", "-1"], "argument --memory-guidance: every scale must be a finite number >= 0, got '-1'"),
    (["--memory-guidance", "0,x"], "argument --memory-guidance: expected a number or comma-separated numbers, got "
                                   "'0,x'"),
    (["--memory-guidance", "2", "--cache", "pab"], "--cache pab: cache 'pab' keeps one state for every transformer "
                                                   "call, and memory guidance's pass without TTT is a call of its own"),
    (["--memory-guidance", "0,2", "--memory-segments", "all"], "--memory-segments places one --memory-guidance "
                                                               "number; a list gives each segment its own already"),
    (["--memory-segments", "named"], "argument --memory-segments: invalid choice: 'named'"),
], ids=["steps-zero", "steps-text", "max-segments", "steps-fraction", "guidance", "guidance-nan", "guidance-inf",
        "seed-negative", "seed-too-big", "cfg-mode", "scheduler", "dtype", "unknown", "cache",
        "cache-pab-sequential", "cache-faster-no-guidance", "memory-negative", "memory-text", "memory-cache",
        "memory-segments-with-a-list", "memory-segments-unknown"])
def test_bad_flags(flags, message, tmp_path):
    assert_one_line_error(run(*flags, cwd=tmp_path), 2, message)


def test_the_models_own_guidance_is_the_default(model_dir, short_story, tmp_path):
    """Without --guidance the model's config decides (here 1: guidance off), so a cache that needs guidance is
    refused once the model is loaded, naming the model's scale; an explicit --guidance wins."""
    off = tmp_path / "off"
    shutil.copytree(model_dir, off)
    index = json.loads((off / "model_index.json").read_text())
    assert index["guidance_scale"] == 6.0  # saved by a pipeline built without one: CogVideoX's
    (off / "model_index.json").write_text(json.dumps({**index, "guidance_scale": 1.0}))
    assert_one_line_error(run("--model", off, "--storyboard", short_story, "--cache", "faster", cwd=tmp_path), 2,
                          "--cache faster: cache 'faster' approximates the unconditional half of a batched guidance "
                          "call: it needs guidance > 1 and cfg_mode 'batched' (the model's guidance is 1)")
    result = run("--model", off, "--storyboard", short_story, "--output", tmp_path / "a.mp4", "--steps", 1,
                 "--guidance", 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 steps at guidance 3," in result.stdout


def test_the_models_own_memory_guidance_is_the_default(model_dir, tmp_path):
    """Without --memory-guidance the model's config decides (here 4 on the segments that continue a scene, away from
    the prediction without TTT): the same video as those flags on a model without it, named in the summary;
    --memory-guidance 0 turns it off, --memory-baseline segments_apart pushes otherwise, and a cache that cannot
    take it is refused once the model is loaded, naming the model's scale."""
    own = tmp_path / "own"
    shutil.copytree(model_dir, own)
    index = json.loads((own / "model_index.json").read_text())
    assert index["memory_guidance_scale"] == 0.0 and index["memory_guidance_segments"] == "all"
    (own / "model_index.json").write_text(json.dumps({**index, "memory_guidance_scale": 4.0,
                                                      "memory_guidance_segments": "continuing",
                                                      "memory_guidance_baseline": "no_ttt"}))
    story = tmp_path / "one_scene.txt"
    story.write_text("a red ball rolls\nthe ball stops\n")  # one scene: segment 2 continues it
    latents = {}
    for name, model, flags in (("own", own, []), ("off", own, ["--memory-guidance", 0]),
                               ("flags", model_dir, ["--memory-guidance", 4, "--memory-segments", "continuing",
                                                     "--memory-baseline", "no_ttt"]),
                               ("apart", own, ["--memory-baseline", "segments_apart"])):
        out = tmp_path / f"{name}.mp4"
        result = run("--model", model, "--storyboard", story, "--output", out, "--steps", 2, "--save-latents", *flags,
                     cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert ("memory guidance 4 on the segments that continue a scene" in result.stdout) == (name != "off")
        assert ("(away from no TTT)" in result.stdout) == (name in ("own", "flags"))
        latents[name] = load_file(tmp_path / f"{name}.latents.safetensors")["latents"]
    assert torch.equal(latents["own"], latents["flags"])
    for other in ("off", "apart"):
        assert not torch.allclose(latents["own"][:, FRAMES_FIRST:], latents[other][:, FRAMES_FIRST:])
    assert_one_line_error(run("--model", own, "--storyboard", story, "--cache", "pab", cwd=tmp_path), 2,
                          "--cache pab: cache 'pab' keeps one state for every transformer call, and memory guidance's "
                          "pass without TTT is a call of its own: use first-block or taylorseer (or no cache) with "
                          "memory guidance (the model's memory guidance is 4; --memory-guidance 0 turns it off)")


def test_memory_guidance_per_segment_changes_the_guided_segment(model_dir, short_story, tmp_path):
    """--memory-guidance 0,4 on two segments reaches the pipeline (segment 2's frames change; segment 1's may too,
    as the TTT scans read segment 2) and the summary names the scales; a list of the wrong length is refused before
    the model is loaded."""
    videos = {}
    for flags in ([], ["--memory-guidance", "0,4"]):
        out = tmp_path / f"m{len(flags)}.mp4"
        result = run("--model", model_dir, "--storyboard", short_story, "--output", out, "--steps", 2, *flags,
                     cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert ("memory guidance 0,4" in result.stdout) == bool(flags)
        videos[len(flags)] = read_video(out)[0].astype(int)
    assert abs(videos[2][-8:] - videos[0][-8:]).max() > 0  # segment 2 is pushed along what TTT adds
    assert_one_line_error(run("--model", model_dir, "--storyboard", short_story, "--memory-guidance", "1,2,3",
                              cwd=tmp_path), 2, "--memory-guidance: expected one number or one per storyboard "
                                                "segment (2), got 3 numbers")
    components = tiny_components()
    local = CogVideoXTTTTransformer3DModel.from_base(components.pop("transformer"), ttt_type="none",
                                                     latent_frames_first=FRAMES_FIRST,
                                                     latent_frames_per_segment=FRAMES_PER_SEGMENT)
    TTTVideoPipeline(transformer=local, **components).save_pretrained(tmp_path / "local")
    assert_one_line_error(run("--model", tmp_path / "local", "--storyboard", short_story, "--memory-guidance", "2",
                              cwd=tmp_path), 1, "has no TTT layers to guide by")


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


def test_text_over_the_token_budget_with_strict_text(model_dir, tmp_path):
    story = tmp_path / "long.txt"
    story.write_text("one two three four five six seven eight nine\n")
    assert_one_line_error(run("--model", model_dir, "--storyboard", story, "--steps", 1, "--strict-text",
                              cwd=tmp_path), 1,
                          f"{story} line 1: text has 11 tokens, over the text encoder's budget of 8 (shorten it)")


def test_the_original_releases_long_texts_render_truncated_with_one_warning_line_each(model_dir, tmp_path):
    story = ROOT / "tests" / "data" / "long_texts_legacy.json"
    output = tmp_path / "long.mp4"
    result = run("--model", model_dir, "--storyboard", story, "--output", output, "--steps", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("sample.py: warning: ")]
    assert len(warnings) == 4, result.stderr  # three texts and a negative text
    assert warnings[1] == (f"sample.py: warning: {story}: [1]: text has 44 tokens, over the text encoder's budget of "
                           "8; truncated, dropping 'small hop and then a much higher jump that takes it almost to the "
                           "top of the fra…'")
    assert read_video(output)[0].shape == (3 * 8 + 1, HEIGHT, WIDTH, 3)


@pytest.fixture
def no_loading(monkeypatch):
    """sample.main in-process with model loading forbidden: what it refuses, it refuses before any long work."""
    sys.path.insert(0, str(ROOT))
    import sample

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(sample, "load_pipeline", fail)
    return sample


def test_the_output_is_checked_before_loading(no_loading, model_dir, short_story, tmp_path):
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "file").write_text("")
    for output, message in [
        (tmp_path / "folder.mp4", f"--output: {tmp_path / 'folder.mp4'} is a folder; expected an .mp4 file name"),
        (tmp_path / "video.avi", f"--output: {tmp_path / 'video.avi'}: expected a file name ending in .mp4"),
        (tmp_path / "file" / "new" / "v.mp4", f"--output: {tmp_path / 'file' / 'new' / 'v.mp4'}: cannot create its "
                                              f"folder, {tmp_path / 'file'} is not a folder"),
    ]:
        with pytest.raises(no_loading.UsageError) as info:
            no_loading.main(["--model", str(model_dir), "--storyboard", str(short_story), "--output", str(output)])
        assert str(info.value) == message
    with pytest.raises(AssertionError, match="loaded"):  # a new folder is fine: write_video creates it
        no_loading.main(["--model", str(model_dir), "--storyboard", str(short_story), "--output",
                         str(tmp_path / "new" / "deeper" / "v.mp4")])


def test_steps_over_the_schedulers_training_timesteps(model_dir, short_story, tmp_path):
    assert_one_line_error(run("--model", model_dir, "--storyboard", short_story, "--steps", 1001, cwd=tmp_path), 2,
                          "--steps must be at most 1000 (the scheduler's training timesteps), got 1001")


@pytest.mark.parametrize("damage, message", [
    ("no-vae", "the vae component (AutoencoderKLCogVideoX in model_index.json) is missing: no folder vae/"),
    ("no-vae-weights", "the vae component (AutoencoderKLCogVideoX in model_index.json) has no weights: no .safetensors "
                       "or .bin file in vae/"),
    ("no-scheduler-config", "the scheduler component (CogVideoXDDIMScheduler in model_index.json) is incomplete: no "
                            "config in scheduler/"),
    ("cut-transformer", "transformer/diffusion_pytorch_model.safetensors: cut off: {half} bytes, its header says "
                        "{full}"),
])
def test_a_model_folder_missing_a_component_names_it(no_loading, model_dir, short_story, tmp_path, damage, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    if damage == "no-vae":
        shutil.rmtree(model / "vae")
    elif damage == "no-vae-weights":
        (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    elif damage == "no-scheduler-config":
        (model / "scheduler" / "scheduler_config.json").unlink()
    else:
        weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
        full = weights.stat().st_size
        weights.write_bytes(weights.read_bytes()[:full // 2])
        message = message.format(half=full // 2, full=full)
    with pytest.raises(no_loading.InputError) as info:
        no_loading.main(["--model", str(model), "--storyboard", str(short_story)])
    assert str(info.value).startswith(f"--model {model}: {message}")


def test_a_hub_id_not_in_the_cache_is_one_line_offline(short_story, tmp_path):
    import os

    # the endpoint is a closed local port: a request to the hub, had one been made, fails at once with another message
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, str(SAMPLE), "--model", "someone/not-cached", "--storyboard",
                             str(short_story)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert_one_line_error(result, 1, "--model someone/not-cached: not available offline (HF_HUB_OFFLINE is set and "
                                     "the hub id is not in the local Hugging Face cache)")
    assert "Retrying" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_gpu_flags_without_a_gpu(model_dir, short_story, tmp_path):
    assert_one_line_error(run("--model", model_dir, "--storyboard", short_story, "--device", "cuda", cwd=tmp_path), 2,
                          "--device cuda: no CUDA device is available")
    assert_one_line_error(run("--model", model_dir, "--storyboard", short_story, "--offload", cwd=tmp_path), 2,
                          "--offload moves models between the CPU and a GPU; it needs a CUDA --device")


@pytest.mark.parametrize("cores, load, current, expected", [
    (2, 0.2, 2, 2),  # free cores: torch's own count
    (2, 1.0, 2, 1),  # one busy core: one thread (2 threads took 448 s against 51 s there)
    (2, 3.4, 2, 1),  # never fewer than one
    (16, 4.4, 8, 8),  # torch's count is never raised
    (16, 10.6, 8, 5),
])
def test_cpu_threads_leave_the_busy_cores(cores, load, current, expected):
    from pipeline.loading import cpu_threads

    assert cpu_threads(cores, load, current) == expected


def test_fit_cpu_threads_lowers_torchs_count_unless_omp_num_threads_chose_it(monkeypatch):
    """The busy cores are the world's; they are set here so that the outcome does not depend on this machine's."""
    import pipeline.loading as loading

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(loading, "current_load", lambda: 1.0)
        assert loading.fit_cpu_threads() is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(loading, "current_load", lambda: 0.3)
        assert loading.fit_cpu_threads() is None and torch.get_num_threads() == 2
        monkeypatch.setattr(loading, "current_load", lambda: None)  # nothing to read: torch's count
        assert loading.fit_cpu_threads() is None and torch.get_num_threads() == 2
        monkeypatch.setattr(loading, "current_load", lambda: 1.2)
        assert loading.fit_cpu_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


STAT = "cpu  {} 0 {} {} {} 0 0 0 7 7\ncpu0 0 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\nintr 5\n"


def test_busy_cores_counts_the_time_not_idle_nor_waiting_for_io():
    from pipeline.loading import busy_cores

    # 100 ticks pass on each of 2 cores: user 60 + system 40 busy, idle 80, iowait 20 -> half the time: one core
    assert busy_cores(STAT.format(10, 5, 100, 3), STAT.format(70, 45, 180, 23)) == pytest.approx(1.0)
    assert busy_cores(STAT.format(10, 5, 100, 3), STAT.format(10, 5, 300, 3)) == 0.0  # idle
    assert busy_cores(STAT.format(10, 5, 100, 3), STAT.format(10, 5, 100, 3)) == 0.0  # no time passed
    with pytest.raises(ValueError, match="/proc/stat: expected a first line"):
        busy_cores("intr 5\n", STAT.format(1, 1, 1, 1))


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_current_load_sees_a_busy_core_now_and_falls_back_to_the_load_average(monkeypatch, tmp_path):
    """A child process that spins keeps one core busy while current_load sleeps: it counts it at once, where the
    1-minute load average would take a minute to."""
    from pipeline.loading import current_load

    spin = "import time\nend = time.time() + 5\nwhile time.time() < end: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)
        assert current_load(interval=1.0) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 1.0, 1.0))
    assert current_load(interval=0.0, stat=tmp_path / "missing") == 3.5
