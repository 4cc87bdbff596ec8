"""benchmarks/bench_two_characters.py: which segment each held-out story is cut after, the texts sampled in each
register, and the whole benchmark on the bundled default model (2 denoising steps)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_two_characters  # noqa: E402

from pipeline.toyworld.checks import CharacterResult  # noqa: E402
from pipeline.toyworld.dataset import generate, load_truth, storyboard_dict  # noqa: E402
from pipeline.toyworld.sampler import sample_story  # noqa: E402
from pipeline.toyworld.text import parse_storyboard  # noqa: E402
from pipeline.toyworld.world import Appearance  # noqa: E402


def test_the_cut_is_the_first_newcomer_beside_another_character():
    seen = 0
    for seed in range(40):
        storyboard = storyboard_dict(sample_story(seed, 8, 8))
        segments = parse_storyboard(storyboard).segments
        beside = [s.index for s in segments if s.intros and len(s.on_stage()) > len(s.intros)]
        found = bench_two_characters.newcomer_segment(storyboard, 8)
        assert found == (beside[0] if beside else None), seed
        if found is not None:
            seen += 1
            assert found > 0 and bench_two_characters.newcomer_segment(storyboard, found) is None  # not earlier
    assert 5 < seen < 40  # some stories have one in 8 segments, some do not


def test_dense_cases_sample_every_segments_dense_text_and_are_scored_in_the_story_register(tmp_path):
    generate(tmp_path, stories=6, min_segments=8, max_segments=8, seed=3, progress=False)
    dense, story = (bench_two_characters.cases(tmp_path, 8, register) for register in ("dense", "story"))
    assert dense and [c.story_id for c in dense] == [c.story_id for c in story]
    for d, s in zip(dense, story):
        truth = load_truth(tmp_path / f"{d.story_id}.truth.json")
        assert d.storyboard == s.storyboard and len(parse_storyboard(d.storyboard).segments) == d.segment + 1
        assert d.texts == [seg.dense_text for seg in truth.segments[: d.segment + 1]]
        assert s.texts == [seg.text for seg in truth.segments[: d.segment + 1]] != d.texts
        sampled = bench_two_characters.with_texts(d.storyboard, d.texts)
        assert [x["text"] for scene in sampled["scenes"] for x in scene["segments"]] == d.texts
    for register, short in (("dense", dense), ("story", story)):  # --after 2: two more segments, the same one scored
        longer = bench_two_characters.cases(tmp_path, 8, register, after=2)
        assert [(c.story_id, c.segment) for c in longer] == [(c.story_id, c.segment) for c in short]
        for c, s in zip(longer, short):
            assert len(c.texts) == min(c.segment + 3, 8) == len(parse_storyboard(c.storyboard).segments)
            assert c.texts[: c.segment + 1] == s.texts
            assert bench_two_characters.first_segments(c.storyboard, c.segment + 1) == s.storyboard


def test_composed_parts_split_the_scored_segment_into_one_text_per_character(tmp_path):
    """--compose: the scored segment's entry is [what every part shares, one part per character on stage]; every
    sentence of the text is in the base or in exactly one character's part, each part names only its character (a
    dense text: with its look), and the earlier segments keep their texts."""
    generate(tmp_path, stories=16, min_segments=8, max_segments=8, seed=3, progress=False)
    for register in ("dense", "story"):
        composed = 0
        for case in bench_two_characters.cases(tmp_path, 8, register):
            parts = bench_two_characters.composed_parts(case)
            assert len(parts) == case.segment + 1 and parts[:-1] == [None] * case.segment
            segment = parse_storyboard(case.storyboard).segments[case.segment]
            text, names = case.texts[case.segment], segment.on_stage()
            if parts[-1] is None:  # the story register may name only the newcomer
                assert register == "story" and sum(f"{n} " in text or f"{n}," in text for n in names) < 2
                continue
            composed += 1
            base, *own = parts[-1]
            assert not any(n in base for n in names) and len(own) == len(names)
            for name, part in zip(names, own):
                assert part.startswith(base.split(". ")[0]) and name in part
                assert not any(other in part for other in names if other != name)
            if register == "dense":
                cast = parse_storyboard(case.storyboard).cast
                assert all(f"{n}, {cast[n].describe()}" in part for n, part in zip(names, own))
            words = sorted(text.replace("On stage: ", "").replace(";", ".").split())
            told = " ".join(part.replace(base, "").replace("On stage: ", "") for part in own)
            assert sorted((base + " " + told).split()) == words, (text, parts[-1])
        assert composed >= 2, register


def test_memory_intro_sets_the_scale_on_the_introductions_and_the_models_own_elsewhere(tmp_path):
    """--memory-intro M: per case M on the segments that introduce someone within a scene (the scored one always),
    the bundled model's own 24 on the other segments that continue a scene, 0 on a scene's first; --memory-guidance
    replaces the 24."""
    from pipeline.storyboard import load_storyboard

    model = str(ROOT / "models" / "default")
    generate(tmp_path, stories=8, min_segments=8, max_segments=8, seed=3, progress=False)
    found = bench_two_characters.cases(tmp_path, 8, "story")
    for own, scales in ((24.0, bench_two_characters.intro_scales(model, found, None, 2.0)),
                        (6.0, bench_two_characters.intro_scales(model, found, 6.0, 2.0))):
        assert len(scales) == len(found)
        seen = set()
        for case, per_segment in zip(found, scales):
            segments = parse_storyboard(case.storyboard).segments
            continues = load_storyboard(case.storyboard).continues_scene
            assert len(per_segment) == len(segments) and per_segment[case.segment] == 2.0
            for goes_on, segment, m in zip(continues, segments, per_segment):
                assert m == (0.0 if not goes_on else 2.0 if segment.intros else own)
                seen.add(m)
        assert seen == {0.0, 2.0, own}


def test_main_on_the_bundled_model(tmp_path, capsys):
    model = str(ROOT / "models" / "default")
    out = tmp_path / "results.json"
    assert bench_two_characters.main([model, "--stories", "4", "--within", "20", "--inference-steps", "2",
                                      "--out", str(tmp_path), "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())["results"][model]
    cases = bench_two_characters.cases(tmp_path / "heldout", 20, "dense")
    assert result["segments"] == len(cases) >= 1 and result["newcomers"] == len(cases)  # one newcomer a segment
    assert result["others"] >= len(cases)
    for key in ("newcomer_present", "newcomer_identity_ok", "other_present", "both"):
        assert 0.0 <= result[key] <= 1.0
    assert result["both"] <= result["newcomer_identity_ok"]  # all right needs the newcomer right
    assert set(result["fates"]) == set(bench_two_characters.FATES)
    assert sum(result["fates"].values()) == result["newcomers"]
    assert result["fates"]["right"] == round(result["newcomer_identity_ok"] * result["newcomers"])
    assert result["fates"]["not found"] + result["fates"]["found as another"] == round(
        (1 - result["newcomer_present"]) * result["newcomers"])
    fates = stdout.split("What became of the newcomers")[1].splitlines()
    assert fates[2] == "| model | " + " | ".join(bench_two_characters.FATES) + " |"
    assert fates[4].startswith(f"| {model} |") and fates[4].count("|") == len(bench_two_characters.FATES) + 2
    row = next(line for line in stdout.splitlines() if line.startswith(f"| {model} |"))
    assert row.count("|") == stdout.splitlines()[2].count("|") and row.rstrip().endswith(f"| {len(cases)} |")
    # the same cases composed, with the push on the introductions apart and a segment after each: the same count
    assert bench_two_characters.main([model, "--stories", "4", "--within", "20", "--inference-steps", "2",
                                      "--out", str(tmp_path), "--json", str(out), "--compose", "--memory-intro", "2",
                                      "--after", "1"]) == 0
    composed = json.loads(out.read_text())
    assert composed["results"][model]["segments"] == len(cases)
    assert (composed["settings"]["compose"], composed["settings"]["after"]) == ("True", "1")
    with pytest.raises(SystemExit) as error:
        bench_two_characters.main([model, "--within", "1"])
    assert error.value.code == 2 and "--within at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        bench_two_characters.main([model, "--after", "-1"])
    assert error.value.code == 2 and "--after: expected a number of segments >= 0, got -1" in capsys.readouterr().err


def test_folder_searches_a_dataset_folders_stories(tmp_path, capsys):
    model = str(ROOT / "models" / "default")
    data = tmp_path / "train"
    generate(data, stories=3, min_segments=8, max_segments=8, seed=5, progress=False)
    found = bench_two_characters.cases(data, 8, "dense")
    assert found  # seed 5's three stories bring a newcomer beside another within 8 segments
    out = tmp_path / "results.json"
    assert bench_two_characters.main([model, "--folder", str(data), "--within", "8", "--inference-steps", "2",
                                      "--out", str(tmp_path / "out"), "--json", str(out)]) == 0
    assert not (tmp_path / "out" / "heldout").exists()  # no held-out stories were made
    assert json.loads(out.read_text())["results"][model]["segments"] == len(found)
    assert f"{len(found)} of 3 stories ({data})" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        bench_two_characters.main([model, "--folder", str(tmp_path / "out")])
    assert error.value.code == 2 and "--folder: " in capsys.readouterr().err


def character(look: Appearance, observed: Appearance | None, here: bool) -> CharacterResult:
    right = [observed is not None and getattr(observed, k) == getattr(look, k) for k in ("color", "shape", "size")]
    return CharacterResult(name="x", action="enter left", named=True, introduced_here=here, expected=look,
                           observed=observed, present=observed is not None, color_ok=right[0], shape_ok=right[1],
                           size_ok=right[2], motion_ok=observed is not None)


def test_a_newcomers_fate_names_what_it_was_drawn_as():
    ben, ann = Appearance("circle", "red", "big"), Appearance("bar", "blue", "small")
    other = character(ann, ann, here=False)
    fates = {
        "right": character(ben, ben, True),
        "its colour, wrong shape or size": character(ben, Appearance("tower", "red", "big"), True),
        "another's colour": character(ben, Appearance("circle", "blue", "big"), True),
        "a colour no one has": character(ben, Appearance("circle", "green", "big"), True),
        "not found": character(ben, None, True),
    }
    assert tuple(fates) == tuple(f for f in bench_two_characters.FATES if f != "found as another")
    for expected, newcomer in fates.items():
        assert bench_two_characters.fate(newcomer, [other]) == expected
    # the one already there found in the newcomer's colour, the newcomer nowhere: drawn in its place
    assert bench_two_characters.fate(character(ben, None, True), [character(ann, ben, False)]) == "found as another"
    assert bench_two_characters.fate(character(ben, None, True), [character(ann, None, False)]) == "not found"


def test_memory_guidance_is_the_models_own_unless_told(tmp_path, capsys):
    """--memory-guidance reaches the renderer: a 2-segment story whose segment 2 continues the scene renders otherwise
    at 0 than at the bundled model's own 24 there, and the same at 24 given as at the default."""
    import bench_first_segments

    generate(tmp_path, stories=3, min_segments=2, max_segments=2, seed=1000, progress=False)
    storyboard = json.loads((tmp_path / "story_00002.storyboard.json").read_text())
    model = str(ROOT / "models" / "default")
    own, off, given = (next(bench_first_segments.rendered(model, [storyboard], 2, 2.0, 0, m))
                       for m in (None, 0.0, 24.0))
    assert abs(own.astype(float) - off).mean() > 0.5
    assert np.array_equal(own, given)
    with pytest.raises(SystemExit) as error:
        bench_two_characters.main([model, "--memory-guidance", "-1"])
    assert error.value.code == 2 and "--memory-guidance: expected a number >= 0, got -1.0" in capsys.readouterr().err


def test_told_gain_probes_a_newcomer_beside_another_and_one_brought_in_alone(tmp_path):
    generate(tmp_path, stories=12, min_segments=8, max_segments=8, seed=3, progress=False)
    probes = bench_two_characters.text_probes(tmp_path, 8)
    assert {p["beside"] for p in probes} == {True, False}  # both kinds among these stories
    for p in probes:
        storyboard = json.loads((tmp_path / f"{p['story']}.storyboard.json").read_text())
        seg = parse_storyboard(storyboard).segments[p["segment"]]
        assert p["segment"] >= 1 and p["character"] in seg.intros
        if p["beside"]:
            assert p["segment"] == bench_two_characters.newcomer_segment(storyboard, 8)
            assert len(seg.on_stage()) > len(seg.intros)
        else:
            assert seg.on_stage() == [p["character"]]
            earlier = parse_storyboard(storyboard).segments[1:p["segment"]]
            assert not any(len(s.intros) == 1 and s.on_stage() == list(s.intros) for s in earlier)  # the first


def test_told_gain_differs_only_in_the_newcomers_description_and_heeds_it(tmp_path):
    """The told and mistold sequences share latents and every text but the probed segment's, which describes the
    newcomer in another look; the loss there reads the same on the story cut after that segment as on the whole one;
    and the bundled model's loss on a newcomer is lower with its own look told, at a level where the look is not yet
    on screen (t = 800), for every probe of two held-out stories."""
    import torch
    from bench_memory import MemoryProbe, character_mask, swapped_story

    from pipeline import TTTVideoPipeline
    from pipeline.toyworld.render import render_story

    generate(tmp_path, stories=12, min_segments=8, max_segments=8, seed=3, progress=False)
    probes = bench_two_characters.text_probes(tmp_path, 8)
    picked = [next(p for p in probes if p["beside"]), next(p for p in probes if not p["beside"])]
    pipe = TTTVideoPipeline.from_pretrained(str(ROOT / "models" / "default"))
    pipe.set_progress_bar_config(disable=True)
    rows = bench_two_characters.told_gains(pipe, tmp_path, picked, [800], progress=False)
    for p, row in zip(picked, rows):
        assert row["swapped"]["character"][0] > row["true"]["character"][0], p
        assert row["character_elements"] > 0

    p = picked[0]
    story = load_truth(tmp_path / f"{p['story']}.truth.json")
    other = swapped_story(story, p["character"])
    probe = MemoryProbe(pipe, [800])
    told, mistold = probe.encode_dense_text(story), probe.encode_dense_text(other)
    differ = [s for s in range(len(story.segments)) if not torch.equal(told[0][:, s], mistold[0][:, s])]
    assert differ[0] == p["segment"]  # from the newcomer's segment on, where the dense texts describe it
    # the whole story gives the loss the cut one did (the cut drops only what the loss never reads)
    frames = render_story(story, probe.size)
    mask = character_mask(frames, render_story(other, probe.size), p["segment"], pipe.vae_scale_factor_temporal,
                          pipe.vae_scale_factor_spatial)
    latents, _, _, starts = probe.encode(story, frames)
    whole = probe.gain((latents, *told, starts), (latents, *mistold, starts), p["segment"], mask)
    for which in ("true", "swapped"):
        assert whole[which]["character"] == pytest.approx(rows[0][which]["character"], rel=1e-4)


def test_told_text_describes_the_newcomer_alone_or_as_the_story_does(tmp_path):
    """--tell newcomer: beside another, the probed segment's dense text keeps the backdrop and the newcomer's look and
    sentences and names no one else; every other segment, and a text that names only the newcomer, stay as they were
    (--tell story: the segment's story text, which describes the newcomer, and nothing else changed);
    the sampled cases get the same cut; the bundled model's told gain then reads the same for a character brought in
    alone and otherwise beside another."""
    import re

    from pipeline import TTTVideoPipeline

    generate(tmp_path, stories=12, min_segments=8, max_segments=8, seed=3, progress=False)
    probes = bench_two_characters.text_probes(tmp_path, 8)
    for p in probes:
        story = load_truth(tmp_path / f"{p['story']}.truth.json")
        name, s = p["character"], p["segment"]
        cut = bench_two_characters.told_text(story, s, name, "newcomer")
        old, new = story.segments[s].dense_text, cut.segments[s].dense_text
        others = [n for n in story.cast if n != name and re.search(rf"\b{n}\b", old)]
        assert bool(others) == p["beside"], old
        assert not any(re.search(rf"\b{n}\b", new) for n in others), new
        assert new.startswith(old.split(". ")[0] + ".")  # the backdrop
        assert f"On stage: {name}, {story.cast[name].describe()}." in new and new.count(name) == old.count(name)
        assert new == old or p["beside"]
        assert [x.dense_text for i, x in enumerate(cut.segments) if i != s] == \
            [x.dense_text for i, x in enumerate(story.segments) if i != s]
        told = bench_two_characters.told_text(story, s, name, "story")
        assert told.segments[s].dense_text == story.segments[s].text != old
        assert f"{name}, {story.cast[name].describe()}" in told.segments[s].text
        assert [x.dense_text for x in told.segments[:s]] == [x.dense_text for x in story.segments[:s]]
    with pytest.raises(ValueError, match="tell: expected one of all, newcomer, story"):
        bench_two_characters.told_text(story, s, name, "none")

    # sampled likewise: only the scored segment's dense text is cut
    for every, alone in zip(bench_two_characters.cases(tmp_path, 8, "dense"),
                            bench_two_characters.cases(tmp_path, 8, "dense", tell="newcomer")):
        s = every.segment
        assert alone.texts[:s] == every.texts[:s] and alone.texts[s] != every.texts[s]
        newcomer = next(iter(parse_storyboard(every.storyboard).segments[s].intros))
        story = load_truth(tmp_path / f"{every.story_id}.truth.json")
        assert alone.texts[s] == bench_two_characters.told_text(story, s, newcomer, "newcomer").segments[s].dense_text

    picked = [next(p for p in probes if p["beside"]), next(p for p in probes if not p["beside"])]
    pipe = TTTVideoPipeline.from_pretrained(str(ROOT / "models" / "default"))
    pipe.set_progress_bar_config(disable=True)
    every, alone = (bench_two_characters.told_gains(pipe, tmp_path, picked, [800], progress=False, tell=tell)
                    for tell in ("all", "newcomer"))
    assert every[1]["true"] == alone[1]["true"] and every[1]["swapped"] == alone[1]["swapped"]
    assert every[0]["true"]["character"] != pytest.approx(alone[0]["true"]["character"], rel=1e-4)


def test_told_gain_main_on_the_bundled_model(tmp_path, capsys):
    model = str(ROOT / "models" / "default")
    out = tmp_path / "results.json"
    assert bench_two_characters.main([model, "--stories", "6", "--within", "20", "--told-gain", "800,950",
                                      "--out", str(tmp_path), "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())["results"][model]
    probes = bench_two_characters.text_probes(tmp_path / "heldout", 20)
    assert len(result["rows"]) == len(probes)
    groups = {(r["group"], r["timestep"]): r for r in result["summary"] if r["region"] == "character"}
    beside = sum(p["beside"] for p in probes)
    assert groups["beside another", 800]["probes"] == beside and groups["alone", 950]["probes"] == len(probes) - beside
    table = [line for line in stdout.splitlines() if line.startswith(f"| {model} |")]
    assert len(table) == 3 * 2  # all, beside another, alone at each of the two levels
    assert f"| beside another ({beside}) | 800 |" in "\n".join(table)
    for flags, named in ((["--register", "story"], "--register story"), (["--after", "1"], "--after"),
                         (["--memory-guidance", "0"], "--memory-guidance"), (["--guidance", "3"], "--guidance"),
                         (["--inference-steps", "2"], "--inference-steps")):
        with pytest.raises(SystemExit) as error:
            bench_two_characters.main([model, "--told-gain", "800", *flags])
        assert error.value.code == 2 and f"it takes no {named}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        bench_two_characters.main([model, "--tell", "newcomer", "--register", "story"])
    assert error.value.code == 2 and "--tell: only with dense texts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        bench_two_characters.main([model, "--tell", "story", "--compose"])
    assert error.value.code == 2 and "--tell: not with --compose" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        bench_two_characters.main([model, "--told-gain", "0,800"])
    assert error.value.code == 2 and "--told-gain: expected comma-separated integers in (0, 1000)" in \
        capsys.readouterr().err


def test_paired_told_gains_of_known_rows():
    def row(beside, true, swapped):
        return {"beside": beside, "true": {"character": true}, "swapped": {"character": swapped}}
    first = [row(True, [1.0, 2.0], [1.5, 2.0]), row(True, [1.0, 1.0], [1.0, 1.0]), row(False, [0.0, 0.0], [1.0, 0.0])]
    other = [row(True, [1.0, 2.0], [2.0, 2.0]), row(True, [0.0, 1.0], [0.5, 1.0]), row(False, [0.0, 0.0], [0.0, 3.0])]
    out = {(r["group"], r["timestep"]): r for r in bench_two_characters.paired_told_gains(first, other, [800, 950])}
    # gains at 800: first 0.5, 0, 1; other 1, 0.5, 0 -> differences 0.5, 0.5, -1
    assert out["beside another", 800]["difference"] == pytest.approx(0.5) and out["beside another", 800]["se"] == 0
    assert out["alone", 800]["difference"] == pytest.approx(-1.0) and out["alone", 800]["probes"] == 1
    assert out["all", 800]["difference"] == pytest.approx(0.0)
    assert out["all", 800]["se"] == pytest.approx((1.5 / 2 / 3) ** 0.5)  # differences 0.5, 0.5, -1 about 0
    assert out["alone", 950]["difference"] == pytest.approx(3.0)
