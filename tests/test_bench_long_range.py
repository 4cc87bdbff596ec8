"""benchmarks/bench_long_range.py's recall mode on the bundled default model (a real toy-world pipeline): segment 1 of
a held-out story is given as clean ground truth, so the rendered video's first segment is that segment through the
VAE, and the scores and table carry both modes."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_long_range  # noqa: E402

from models.transformer_ttt import MEMORY_BASELINES  # noqa: E402
from pipeline.toyworld.dataset import generate  # noqa: E402
from pipeline.toyworld.text import parse_storyboard  # noqa: E402
from pipeline.video_io import read_video  # noqa: E402


def test_recall_mode_keeps_the_ground_truth_first_segment(tmp_path):
    heldout = tmp_path / "heldout"
    generate(heldout, stories=1, min_segments=2, max_segments=2, seed=bench_long_range.HELD_OUT_SEED, progress=False)
    truth, _ = read_video(heldout / "story_00000.mp4")
    outputs = {}
    for mode in bench_long_range.MODES:
        videos = tmp_path / mode
        bench_long_range.sample_child(str(ROOT / "models" / "default"), heldout, videos, steps=2, guidance=1.0,
                                      seed=0, mode=mode)
        outputs[mode], _ = read_video(videos / "story_00000.mp4")
        assert outputs[mode].shape == truth.shape
    first = 25  # segment 1: 24 + 1 frames at 8 fps
    recall_error = np.abs(outputs["recall"][:first].astype(float) - truth[:first]).mean()
    joint_error = np.abs(outputs["joint"][:first].astype(float) - truth[:first]).mean()
    print(f"segment 1 mean abs error: recall {recall_error:.2f}, joint {joint_error:.2f}")
    assert recall_error < 12, recall_error  # the VAE's reconstruction of the given segment (plus H.264)
    assert joint_error > 2 * recall_error, (joint_error, recall_error)  # 2 denoising steps draw something else

    summary = bench_long_range.score(tmp_path / "recall")
    row = bench_long_range.row("mlp (recall)", summary, None)
    assert {"identity_intro", "after_intro@5", "identity@1", "color_intro", "color_recall"} <= set(row)
    table = bench_long_range.markdown([row], summary["chance"])
    assert "| mlp (recall) |" in table and "identity at intro" in table and "colour after intro" in table
    # every line of the table has as many cells as its head
    assert len({line.count("|") for line in table.splitlines()}) == 1


def test_every_story_draws_its_own_noise(tmp_path):
    """Two copies of one storyboard render differently (each story its own noise stream), and the same again when
    rendered again (the stream depends only on the seed and the story's place): in bench_first_segments and in the
    long-range benchmark's renders. With one noise for every story a reading's stories were not independent draws."""
    import bench_first_segments

    heldout = tmp_path / "heldout"
    generate(heldout, stories=1, min_segments=1, max_segments=1, seed=bench_long_range.HELD_OUT_SEED, progress=False)
    board = heldout / "story_00000.storyboard.json"
    storyboard = json.loads(board.read_text())
    model = str(ROOT / "models" / "default")
    first, second = bench_first_segments.rendered(model, [storyboard, storyboard], 2, 1.0, 0)
    assert not np.array_equal(first, second)
    again = next(bench_first_segments.rendered(model, [storyboard], 2, 1.0, 0))
    np.testing.assert_array_equal(first, again)

    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("story_00000", "story_00001"):
        (twins / f"{name}.storyboard.json").write_text(board.read_text())
    bench_long_range.sample_child(model, twins, tmp_path / "videos", steps=2, guidance=1.0, seed=0)
    videos = [read_video(tmp_path / "videos" / f"{name}.mp4")[0] for name in ("story_00000", "story_00001")]
    assert videos[0].shape == first.shape and not np.array_equal(*videos)


def test_memory_guidance_reaches_the_renderer_and_the_settings(tmp_path, capsys):
    """--memory-guidance: passed to the pipeline (a 2-segment story renders otherwise), kept in the renders'
    settings (so a run at another scale renders again) and checked."""
    heldout = tmp_path / "heldout"
    generate(heldout, stories=3, min_segments=2, max_segments=2, seed=bench_long_range.HELD_OUT_SEED, progress=False)
    for other in ("story_00000", "story_00001"):  # story 2 is the one whose segment 2 only names its character
        for path in heldout.glob(f"{other}*"):
            path.unlink()
    model = str(ROOT / "models" / "default")
    storyboard = json.loads((heldout / "story_00002.storyboard.json").read_text())
    named = bench_long_range.segment_guidance(storyboard, 0.0, 2.0)
    assert named == [0.0, 2.0], named  # segment 1 opens the scene; segment 2 only names
    outputs = {}
    for m, where in ((0.0, "all"), (2.0, "all"), (2.0, "named")):
        bench_long_range.sample_child(model, heldout, tmp_path / f"{m}{where}", steps=2, guidance=2.0, seed=0,
                                      memory_guidance=m, memory_segments=where)
        outputs[m, where], _ = read_video(tmp_path / f"{m}{where}" / "story_00002.mp4")
    assert np.abs(outputs[0.0, "all"].astype(float) - outputs[2.0, "all"]).mean() > 0.5
    assert np.abs(outputs[2.0, "named"].astype(float) - outputs[2.0, "all"]).mean() > 0.5
    common = ["--variants", "linear", "--trained", f"linear={model}"]
    args = bench_long_range.parse_args([*common, "--memory-guidance", "1.5"])
    settings = bench_long_range.sampling_settings(args, Path(model), "recall")
    assert settings["memory_guidance"] == 1.5  # placed and pushed as the bundled model's own say
    assert settings["memory_segments"] == "continuing" and settings["memory_baseline"] == "segments_apart"
    args = bench_long_range.parse_args([*common, "--memory-guidance", "1.5", "--memory-segments", "named"])
    assert bench_long_range.sampling_settings(args, Path(model), "joint")["memory_segments"] == "named"
    plain = bench_long_range.sampling_settings(bench_long_range.parse_args(common), Path(model), "recall")
    assert plain["memory_guidance"] == 24.0  # the bundled model's own
    off = bench_long_range.parse_args([*common, "--memory-guidance", "0"])
    assert "memory_guidance" not in bench_long_range.sampling_settings(off, Path(model), "recall")  # as before
    # without --memory-guidance each model samples at its own, as sample.py does (model_index.json)
    own = tmp_path / "own"
    own.mkdir()
    index = json.loads((Path(model) / "model_index.json").read_text())
    (own / "model_index.json").write_text(json.dumps({**index, "memory_guidance_scale": 4.0,
                                                      "memory_guidance_segments": "continuing",
                                                      "memory_guidance_baseline": "no_ttt"}))
    settings = bench_long_range.sampling_settings(bench_long_range.parse_args(common), own, "joint")
    assert settings["memory_guidance"] == 4.0 and settings["memory_segments"] == "continuing"
    assert settings["memory_baseline"] == "no_ttt"
    apart = bench_long_range.parse_args([*common, "--memory-baseline", "segments_apart"])
    assert bench_long_range.sampling_settings(apart, own, "joint")["memory_baseline"] == "segments_apart"
    off = bench_long_range.parse_args([*common, "--memory-guidance", "0"])
    assert "memory_guidance" not in bench_long_range.sampling_settings(off, own, "joint")
    assert bench_long_range.memory_for(off, own) == (0.0, "continuing", "no_ttt")
    assert bench_long_range.MEMORY_BASELINES == MEMORY_BASELINES  # the benchmark names the model's choices
    with pytest.raises(SystemExit) as error:
        bench_long_range.parse_args([*common, "--memory-guidance", "-1"])
    assert error.value.code == 2
    assert "--memory-guidance: expected a number >= 0, got -1.0" in capsys.readouterr().err


def test_the_dense_register_renders_the_dense_texts_and_is_scored_as_the_story(tmp_path):
    """--register dense: the videos are rendered from every segment's dense caption (the same scenes and cuts), the
    story storyboard goes beside them for scoring, and the register is kept in the renders' settings."""
    from pipeline.toyworld.dataset import REGISTERS, load_truth, storyboard_dict

    heldout = tmp_path / "heldout"
    generate(heldout, stories=1, min_segments=2, max_segments=2, seed=bench_long_range.HELD_OUT_SEED, progress=False)
    story = load_truth(heldout / "story_00000.truth.json")
    plain, dense = storyboard_dict(story), storyboard_dict(story, "dense")
    assert plain == json.loads((heldout / "story_00000.storyboard.json").read_text())
    texts = [[seg["text"] for seg in scene["segments"]] for scene in dense["scenes"]]
    assert [len(t) for t in texts] == [len(scene["segments"]) for scene in plain["scenes"]]
    assert sum(texts, []) == [seg.dense_text for seg in story.segments]
    assert "On stage:" in texts[-1][-1] and sum(texts, []) != [seg.text for seg in story.segments]
    with pytest.raises(ValueError, match="register: expected one of"):
        storyboard_dict(story, "shouting")
    assert bench_long_range.REGISTERS == REGISTERS

    model = str(ROOT / "models" / "default")
    outputs = {}
    for register in ("story", "dense"):
        videos = tmp_path / register
        bench_long_range.sample_child(model, heldout, videos, steps=2, guidance=2.0, seed=0, register=register)
        outputs[register], _ = read_video(videos / "story_00000.mp4")
        assert json.loads((videos / "story_00000.storyboard.json").read_text()) == plain  # scored as the story
    assert np.abs(outputs["story"].astype(float) - outputs["dense"]).mean() > 0.5  # other texts, same noise

    common = ["--variants", "linear", "--trained", f"linear={model}"]
    story_settings = bench_long_range.sampling_settings(bench_long_range.parse_args(common), Path(model), "joint")
    assert "register" not in story_settings  # the story renders of earlier runs stay valid
    args = bench_long_range.parse_args([*common, "--register", "dense"])
    assert bench_long_range.sampling_settings(args, Path(model), "joint") == {**story_settings, "register": "dense"}


def test_guidance_named_lowers_only_the_segments_that_only_name_characters():
    """--guidance-named: the segments whose text introduces a character or opens a scene keep the guidance; the ones
    that only name characters get their own scale (per segment, the pipeline's guidance_scale list)."""
    from pipeline.toyworld.dataset import story_seed, storyboard_dict
    from pipeline.toyworld.sampler import sample_story

    storyboard = storyboard_dict(sample_story(story_seed(bench_long_range.HELD_OUT_SEED, 0), 20, 20))
    assert bench_long_range.segment_guidance(storyboard, 2.0, None) == 2.0
    scales = bench_long_range.segment_guidance(storyboard, 2.0, 1.0)
    texts = [seg["text"] for scene in storyboard["scenes"] for seg in scene["segments"]]
    scenes = storyboard["scenes"]
    openings = {sum(len(scene["segments"]) for scene in scenes[:i]) for i in range(len(scenes))}
    assert len(scales) == len(texts) == 20 and {1.0, 2.0} == set(scales)
    for i, (text, scale) in enumerate(zip(texts, scales)):
        describes = i in openings or ", a " in text  # "Tam, a big red bar, comes in from the right."
        assert scale == (2.0 if describes else 1.0), (i, text, scale)


def test_main_with_guidance_named_and_no_ceiling(tmp_path, capsys):
    """The whole benchmark on one held-out story with the bundled model (2 steps): --ceiling-stories 0 leaves the
    ceiling row out instead of failing, and --guidance-named is passed to the renderer and kept in the settings
    (another value renders again)."""
    common = ["--variants", "mlp", "--modes", "joint", "--stories", "1", "--inference-steps", "2", "--base",
              str(ROOT / "models" / "default"), "--trained", f"mlp={ROOT / 'models' / 'default'}",
              "--ceiling-stories", "0", "--out", str(tmp_path)]
    assert bench_long_range.main([*common, "--guidance-named", "1"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in results["rows"]] == ["ground truth (rendered)", "mlp (joint)"]
    timing = json.loads((tmp_path / "mlp" / "videos" / "timing.json").read_text())
    assert timing["settings"]["guidance"] == 2.0 and timing["settings"]["guidance_named"] == 1.0
    named_one, _ = read_video(tmp_path / "mlp" / "videos" / "story_00000.mp4")
    capsys.readouterr()
    assert bench_long_range.main([*common, "--guidance-named", "2"]) == 0
    assert "reusing the videos" not in capsys.readouterr().out
    named_two, _ = read_video(tmp_path / "mlp" / "videos" / "story_00000.mp4")
    assert np.abs(named_one.astype(float) - named_two).mean() > 0.5  # the named segments were drawn at another scale
    # recall mode: segment 1 is the given ground truth, so no check counts it
    assert bench_long_range.main([*common[:3], "recall", *common[4:]]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    recall = results["summaries"]["mlp (recall)"]
    assert recall["given"] == 1 and recall["segments"] == 19  # of the held-out story's 20
    assert math.isnan(results["rows"][-1]["identity@1"])


def test_first_segments_gate_stops_below_the_threshold(tmp_path, capsys):
    """bench_first_segments --min-identity (the recipe's step 6): status 3 and a line naming the model below the
    gate; 0 when the model is at or above it."""
    import bench_first_segments

    model = str(ROOT / "models" / "default")
    common = [model, "--stories", "1", "--inference-steps", "2", "--out", str(tmp_path)]
    assert bench_first_segments.main([*common, "--min-identity", "101"]) == 3  # no model reaches 101%
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith(f"| {model} |"))
    identity, error, count = (float(cell) for cell in row.strip("|").split("|")[-3:])
    storyboard = json.loads(next((tmp_path / "heldout").glob("*.storyboard.json")).read_text())
    introduced = len(parse_storyboard(storyboard).segments[0].intros)  # segment 1 brings in everyone it shows
    assert count == introduced >= 1
    rate = identity / 100
    assert error == pytest.approx(100 * (rate * (1 - rate) / count) ** 0.5, abs=0.6)  # the table rounds the rate
    assert f"below the gate: {model}: identity " in err and f"over {introduced} characters) < 101%" in err
    assert bench_first_segments.main([*common, "--min-identity", "0"]) == 0
    assert "below the gate" not in capsys.readouterr().err


def test_the_gate_reports_its_binomial_standard_error():
    """60% over 50 characters is 6.9 points either way (what one gate reading can tell apart); none without any."""
    import bench_first_segments

    assert bench_first_segments.standard_error(0.6, 50) == pytest.approx(0.069282, abs=1e-6)
    assert bench_first_segments.standard_error(1.0, 50) == 0.0
    assert math.isnan(bench_first_segments.standard_error(0.5, 0))


def test_held_out_stories_are_made_again_when_the_world_changed(tmp_path):
    folder = bench_long_range.held_out_stories(tmp_path, 2)
    truth = folder / "story_00000.truth.json"
    made = truth.stat().st_mtime_ns
    assert bench_long_range.held_out_stories(tmp_path, 2) == folder and truth.stat().st_mtime_ns == made  # reused
    # the same count of stories, but the first one as an earlier world drew it (another shape for its first character)
    data = json.loads(truth.read_text())
    data["cast"][0]["shape"] = "triangle"
    truth.write_text(json.dumps(data))
    bench_long_range.held_out_stories(tmp_path, 2)
    assert json.loads(truth.read_text())["cast"][0]["shape"] != "triangle"
    assert len(list(folder.glob("*.storyboard.json"))) == 2


def test_held_out_stories_are_swapped_in_whole(tmp_path, monkeypatch):
    """Two benchmarks that make the held-out stories at once both get the whole folder (each used to delete the other's
    files as it started), and a run that fails while making them leaves the old folder as it was, nothing half-made."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: bench_long_range.held_out_stories(tmp_path, 2), range(2)))
    folder = tmp_path / "heldout"
    assert folders == [folder, folder]
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["metadata.jsonl"] + [f"story_0000{i}{end}" for i in range(2)
                                                  for end in (".mask.mp4", ".mp4", ".storyboard.json", ".truth.json")])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def killed(command, log):  # the generator dies after its first story
        out = Path(command[command.index("--out") + 1])
        (out / "story_00000.storyboard.json").write_text("{}")
        raise RuntimeError("generate failed")

    monkeypatch.setattr(bench_long_range, "run", killed)
    with pytest.raises(RuntimeError, match="generate failed"):
        bench_long_range.held_out_stories(tmp_path, 3)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_each_model_samples_at_its_own_guidance_unless_told(tmp_path):
    from argparse import Namespace

    old, new = tmp_path / "old", tmp_path / "new"
    for folder, index in ((old, {"_class_name": "TTTVideoPipeline"}), (new, {"guidance_scale": 2.0})):
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps(index))
    mine = Namespace(guidance=None)
    assert bench_long_range.guidance_for(mine, new) == 2.0
    assert bench_long_range.guidance_for(mine, old) == 6.0  # saved before pipelines kept one: CogVideoX's
    assert bench_long_range.guidance_for(Namespace(guidance=4.5), new) == 4.5
    assert bench_long_range.guidance_for(mine, ROOT / "models" / "default") == 2.0  # the recipe's


def test_memory_scales_on_the_segments_that_continue_a_scene(capsys):
    """--memory-segments continuing: memory guidance everywhere but segment 1 and each scene's first segment, with
    --memory-intro's scale where such a segment introduces a character; "named" leaves those introductions at 0."""
    from pipeline.toyworld.dataset import story_seed, storyboard_dict
    from pipeline.toyworld.sampler import sample_story

    storyboard = storyboard_dict(sample_story(story_seed(bench_long_range.HELD_OUT_SEED, 0), 20, 20))
    scenes = storyboard["scenes"]
    openings = {sum(len(scene["segments"]) for scene in scenes[:i]) for i in range(len(scenes))}
    texts = [seg["text"] for scene in scenes for seg in scene["segments"]]
    introduces = [", a " in text for text in texts]  # "Bo, a big green circle, slides in from the left."
    assert any(introduces[i] for i in range(20) if i not in openings)  # the story has an introduction mid-scene
    assert bench_long_range.memory_scales(storyboard, 4.0) == 4.0
    continuing = bench_long_range.memory_scales(storyboard, 4.0, "continuing", intro=1.0)
    named = bench_long_range.memory_scales(storyboard, 4.0, "named")
    for i in range(20):
        expected = 0.0 if i in openings else 1.0 if introduces[i] else 4.0
        assert continuing[i] == expected, (i, texts[i], continuing[i])
        assert named[i] == (0.0 if i in openings or introduces[i] else 4.0), (i, texts[i], named[i])
    assert bench_long_range.memory_scales(storyboard, 4.0, "continuing") == [
        0.0 if i in openings else 4.0 for i in range(20)]
    model = str(ROOT / "models" / "default")
    common = ["--variants", "linear", "--trained", f"linear={model}", "--memory-guidance", "4"]
    args = bench_long_range.parse_args([*common, "--memory-segments", "continuing", "--memory-intro", "1"])
    settings = bench_long_range.sampling_settings(args, Path(model), "joint")
    assert settings["memory_segments"] == "continuing" and settings["memory_intro"] == 1.0
    args = bench_long_range.parse_args([*common, "--memory-timesteps", "600,1000"])
    assert args.memory_timesteps == (600, 1000)
    assert bench_long_range.sampling_settings(args, Path(model), "joint")["memory_timesteps"] == [600, 1000]
    for bad, message in (("600", "expected LOW,HIGH (whole numbers), got '600'"),
                         ("700,600", "expected 0 <= LOW < HIGH, got '700,600'")):
        with pytest.raises(SystemExit):
            bench_long_range.parse_args([*common, "--memory-timesteps", bad])
        assert f"--memory-timesteps: {message}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        bench_long_range.parse_args([*common, "--memory-intro", "1"])
    assert error.value.code == 2
    assert ("--memory-intro: expected a number >= 0 with --memory-segments continuing, got 1.0 with the model's own "
            "segments") in capsys.readouterr().err


def test_the_second_pass_draws_again_the_segments_that_introduce_no_one(tmp_path):
    """--second-pass: the first pass's introductions are kept (segment 1's frames as a single pass draws them), the
    segment that only names its character is drawn again from other noise, and the setting is kept with the renders."""
    heldout = tmp_path / "heldout"
    generate(heldout, stories=3, min_segments=2, max_segments=2, seed=bench_long_range.HELD_OUT_SEED, progress=False)
    for other in ("story_00000", "story_00001"):  # story 2's segment 2 only names its character
        for path in heldout.glob(f"{other}*"):
            path.unlink()
    storyboard = json.loads((heldout / "story_00002.storyboard.json").read_text())
    assert [bool(s.intros) for s in parse_storyboard(storyboard).segments] == [True, False]
    assert bench_long_range.second_pass_segments(storyboard) == [1]
    assert bench_long_range.second_pass_segments(storyboard, given=2) == []
    model = str(ROOT / "models" / "default")
    frames = {}
    for second in (False, True):
        videos = tmp_path / f"second{second}"
        bench_long_range.sample_child(model, heldout, videos, steps=2, guidance=2.0, seed=0, second_pass=second)
        frames[second], _ = read_video(videos / "story_00002.mp4")
    first = 25  # segment 1: 24 + 1 frames at 8 fps
    kept = np.abs(frames[True][:first].astype(float) - frames[False][:first]).mean()
    redrawn = np.abs(frames[True][first:].astype(float) - frames[False][first:]).mean()
    assert kept < 4 and redrawn > 3 * max(kept, 1), (kept, redrawn)  # kept up to H.264; drawn from other noise
    common = ["--variants", "linear", "--trained", f"linear={model}"]
    args = bench_long_range.parse_args([*common, "--second-pass"])
    assert bench_long_range.sampling_settings(args, Path(model), "joint")["second_pass"] is True
    assert "second_pass" not in bench_long_range.sampling_settings(bench_long_range.parse_args(common), Path(model),
                                                                    "joint")  # earlier runs' renders stay valid
