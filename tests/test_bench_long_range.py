"""benchmarks/bench_long_range.py's recall mode on the bundled default model (a real toy-world pipeline): segment 1 of
a held-out story is given as clean ground truth, so the rendered video's first segment is that segment through the
VAE, and the scores and table carry both modes."""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_long_range  # noqa: E402

from pipeline.toyworld.dataset import generate  # noqa: E402
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


def test_first_segments_gate_stops_below_the_threshold(tmp_path, capsys):
    """bench_first_segments --min-identity (the recipe's step 6): status 3 and a line naming the model below the
    gate; 0 when the model is at or above it."""
    import bench_first_segments

    model = str(ROOT / "models" / "default")
    common = [model, "--stories", "1", "--inference-steps", "2", "--out", str(tmp_path)]
    assert bench_first_segments.main([*common, "--min-identity", "101"]) == 3  # no model reaches 101%
    out, err = capsys.readouterr()
    assert f"| {model} |" in out
    assert f"below the gate: {model}: identity " in err and "< 101%" in err
    assert bench_first_segments.main([*common, "--min-identity", "0"]) == 0
    assert "below the gate" not in capsys.readouterr().err


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
