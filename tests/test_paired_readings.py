"""benchmarks/paired_readings.py: renders of the same stories read against each other, item by item."""

import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipeline.toyworld.corrupt import corrupt
from pipeline.toyworld.dataset import generate, load_truth, story_videos
from pipeline.toyworld.world import FPS
from pipeline.video_io import write_video

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import paired_readings  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Ground-truth renders of 4 stories, and the memoryless baseline of the same stories: every character a text
    only names drawn with a random look, the introductions and backdrops as written."""
    truth = tmp_path_factory.mktemp("truth")
    generate(truth, stories=4, min_segments=6, max_segments=6, seed=3, progress=False)
    memoryless = tmp_path_factory.mktemp("memoryless")
    for i, path in enumerate(sorted(truth.glob("*.truth.json"))):
        story_id = path.name[: -len(".truth.json")]
        frames = corrupt(load_truth(path), "memoryless", np.random.default_rng([i, 2])).render()
        write_video(frames, memoryless / f"{story_id}.mp4", FPS)
        shutil.copyfile(truth / f"{story_id}.storyboard.json", memoryless / f"{story_id}.storyboard.json")
    return truth, memoryless


def test_the_memoryless_baseline_loses_the_looks_after_the_introductions_and_nothing_at_them(folders, capsys):
    truth, memoryless = folders
    base, other = (paired_readings.items(paired_readings.scored(f)) for f in folders)
    assert paired_readings.rate(base["colour after intro"]) == 100.0  # the ground truth: every look kept
    assert paired_readings.rate(base["shape after intro"]) == 100.0
    assert set(other["shape after intro"]) == set(other["colour after intro"])  # the same characters, read for shape
    assert paired_readings.paired(base["shape after intro"], other["shape after intro"])[0] < -20
    assert len(base["colour after intro"]) > 20 and set(base["colour after intro"]) == set(other["colour after intro"])
    diff, error, count = paired_readings.paired(base["colour after intro"], other["colour after intro"])
    assert diff < -40 and 0 < error < 15 and count == len(base["colour after intro"])
    assert paired_readings.paired(base["identity at intro"], other["identity at intro"])[0] == 0.0
    assert paired_readings.paired(base["backdrop after start"], other["backdrop after start"])[0] == 0.0
    # the same folder against itself: no difference, no spread
    assert paired_readings.paired(base["colour after intro"], base["colour after intro"])[:2] == (0.0, 0.0)
    assert (truth / "scores.pkl").is_file()  # scored once: the cache is read back while the videos stay
    assert paired_readings.main([str(truth), str(memoryless)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"| reading | {truth} | {memoryless} |"
    row = next(line for line in lines if line.startswith("| colour after intro |"))
    other_rate = paired_readings.rate(other["colour after intro"])
    assert row == f"| colour after intro | 100.0 ({count}) | {other_rate:.1f} ({count}), {diff:+.1f} ± {error:.1f} |"


def test_in_place_is_split_by_the_size_drawn(folders):
    for folder in folders:
        readings = paired_readings.items(paired_readings.scored(folder))
        small, big = readings["in place (drawn small)"], readings["in place (drawn big)"]
        assert small and big and not set(small) & set(big)  # both sizes drawn, no character in both
        everything = readings["in place at boundary"]
        assert {**small, **big} == {k: v for k, v in everything.items() if k in small or k in big}
        assert len(small) + len(big) >= 0.9 * len(everything)  # all but the characters not found
    truth = paired_readings.items(paired_readings.scored(folders[0]))
    assert paired_readings.rate(truth["in place (drawn small)"]) == 100.0  # the ground truth never jumps


def test_introductions_are_split_by_who_else_is_on_stage(folders):
    """The introductions read apart: a character alone on stage, and one brought in beside another. Who is on stage
    is counted here from every reading's items of that segment, not from the split."""
    for folder in folders:
        readings = paired_readings.items(paired_readings.scored(folder))
        alone, beside = readings["identity at intro (alone)"], readings["identity at intro (beside another)"]
        assert alone and beside and not set(alone) & set(beside)
        assert {**alone, **beside} == readings["identity at intro"]
        on_stage = defaultdict(set)
        for name in ("identity at intro", "colour after intro"):
            for story, segment, character in readings[name]:
                on_stage[story, segment].add(character)
        assert all(len(on_stage[key[:2]]) == 1 for key in alone)
        assert all(len(on_stage[key[:2]]) >= 2 for key in beside)
    truth = paired_readings.items(paired_readings.scored(folders[0]))
    assert paired_readings.rate(truth["identity at intro (beside another)"]) == 100.0


def test_the_looks_after_the_introductions_are_split_by_who_else_is_on_stage(folders):
    """As the introductions: a later segment's characters read apart when they are alone there and when someone else
    is on stage, counted here from every reading's items of that segment."""
    for folder in folders:
        readings = paired_readings.items(paired_readings.scored(folder))
        on_stage = defaultdict(set)
        for name in ("identity at intro", "colour after intro"):
            for story, segment, character in readings[name]:
                on_stage[story, segment].add(character)
        for look in ("colour", "identity"):
            alone, beside = readings[f"{look} after intro (alone)"], readings[f"{look} after intro (beside another)"]
            assert alone and beside and not set(alone) & set(beside)
            assert {**alone, **beside} == readings[f"{look} after intro"]
            assert all(len(on_stage[key[:2]]) == 1 for key in alone)
            assert all(len(on_stage[key[:2]]) >= 2 for key in beside)
    truth, memoryless = (paired_readings.items(paired_readings.scored(f)) for f in folders)
    assert paired_readings.rate(truth["identity after intro (beside another)"]) == 100.0
    alone = "colour after intro (alone)"
    assert paired_readings.paired(truth[alone], memoryless[alone])[0] < -20


def test_given_segments_hold_no_item_and_what_they_introduce_is_read_after_them(folders, capsys):
    """Recall mode gives segment 1: its introductions are not the model's, so --given 1 leaves them out, and the
    characters and scene it introduces are still read in the segments after it."""
    truth, memoryless = folders
    results = paired_readings.scored(memoryless)
    whole, given = paired_readings.items(results), paired_readings.items(results, given=1)
    for name in paired_readings.READINGS:
        assert set(given[name]) == {key for key in whole[name] if key[1] >= 1}, name
    assert any(key[1] == 0 for key in whole["identity at intro"])  # segment 1 introduces characters
    assert given["colour after intro"] and given["backdrop after start"]  # read after segment 1 as before
    assert paired_readings.main(["--given", "1", str(truth), str(memoryless)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| identity at intro |"))
    assert row.startswith(f"| identity at intro | 100.0 ({len(given['identity at intro'])}) |")
    with pytest.raises(SystemExit) as error:
        paired_readings.main(["--given", "-1", str(truth), str(memoryless)])
    assert error.value.code == 2 and "--given: expected a number of segments >= 0, got -1" in capsys.readouterr().err


def test_the_score_cache_is_redone_when_a_video_changes(folders, tmp_path):
    truth, _ = folders
    copy = tmp_path / "copy"
    shutil.copytree(truth, copy)
    first = paired_readings.items(paired_readings.scored(copy))
    videos = story_videos(copy)
    shutil.copyfile(videos[1], videos[0])  # another story's frames under the first story's name
    again = paired_readings.items(paired_readings.scored(copy))
    assert paired_readings.rate(again["identity at intro"]) < paired_readings.rate(first["identity at intro"])


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        paired_readings.main([str(tmp_path)])
    assert error.value.code == 2
    assert "expected at least two folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paired_readings.main([str(tmp_path), str(tmp_path / "nowhere")])
    assert f"{tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    assert paired_readings.main([str(tmp_path), str(tmp_path)]) == 1
    assert "no .mp4 files to score" in capsys.readouterr().err
