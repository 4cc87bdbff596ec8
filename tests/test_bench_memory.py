"""benchmarks/bench_memory.py on the bundled default model (a real toy-world pipeline, no mocks): the counterfactual
story changes one character and nothing else, and the gain is exactly zero when no path joins the segments."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_memory  # noqa: E402

from pipeline.toyworld.render import render_story  # noqa: E402
from pipeline.toyworld.sampler import sample_story  # noqa: E402
from pipeline.toyworld.world import plan, segment_frames  # noqa: E402


def story_with_probes(segments: int = 4):
    """The first sampled story (seeds 0, 1, ...) of `segments` segments with a probed segment."""
    for seed in range(100):
        story = sample_story(seed, segments, segments)
        if bench_memory.probes(story):
            return story
    raise AssertionError("no story with a probed segment")


def test_swapped_story_changes_one_look_and_its_description():
    story = story_with_probes(6)
    name = bench_memory.probes(story)[0]["character"]
    old, new = story.cast[name], bench_memory.swapped_look(story, name)
    assert new.shape != old.shape and new.size == old.size
    assert new.color not in {a.color for a in story.cast.values()}
    other = bench_memory.swapped_story(story, name)
    assert other.cast == {**story.cast, name: new}
    changed = [i for i, (a, b) in enumerate(zip(story.segments, other.segments)) if a.text != b.text]
    assert len(changed) == 1 and new.describe() in other.segments[changed[0]].text  # the introduction only
    assert [s.actions for s in other.segments] == [s.actions for s in story.segments]
    # the renders differ exactly in the character's pixels: nowhere in segments without it on stage
    a, b = render_story(story), render_story(other)
    for p in bench_memory.probes(story):
        if p["character"] == name:
            mask = bench_memory.character_mask(a, b, p["segment"], 4, 4)
            assert mask.shape == (6, 16, 16) and 0 < mask.sum() < mask.numel() // 2
    states = plan(story)
    absent = [i for i, seg in enumerate(story.segments) if name not in states[i].positions and name not in seg.actions]
    assert absent  # the chosen story has segments without the character (else this check would check nothing)
    for i in absent:  # segments without it on stage: the same frames
        start, end = segment_frames(i)
        assert np.array_equal(a[start:end], b[start:end]), i


def test_swap_shape_or_colour_changes_only_that_part():
    story = story_with_probes(6)
    name = bench_memory.probes(story)[0]["character"]
    old, both = story.cast[name], bench_memory.swapped_look(story, name)
    shape, colour = (bench_memory.swapped_look(story, name, swap) for swap in ("shape", "colour"))
    assert (shape.shape, shape.color, shape.size) == (both.shape, old.color, old.size)
    assert (colour.shape, colour.color, colour.size) == (old.shape, both.color, old.size)
    other = bench_memory.swapped_story(story, name, "shape")
    assert other.cast[name] == shape and any(shape.describe() in s.text for s in other.segments)
    # only the outline differs: fewer changed pixels than with the colour changed too
    a, b, c = render_story(story), render_story(other), render_story(bench_memory.swapped_story(story, name))
    assert 0 < (a != b).any(-1).sum() < (a != c).any(-1).sum()
    with pytest.raises(ValueError, match="swap: expected one of look, shape, colour, got 'size'"):
        bench_memory.swapped_look(story, name, "size")


@pytest.fixture(scope="module")
def pipe():
    from pipeline import TTTVideoPipeline

    pipe = TTTVideoPipeline.from_pretrained(str(ROOT / "models" / "default"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_gain_is_zero_without_a_path_between_segments_and_not_with_ttt(pipe):
    story = story_with_probes(4)
    probe = bench_memory.probes(story)[-1]
    name, segment = probe["character"], probe["segment"]
    other = bench_memory.swapped_story(story, name)
    a, b = render_story(story), render_story(other)
    mask = bench_memory.character_mask(a, b, segment, 4, 4)
    memory = bench_memory.MemoryProbe(pipe, [600, 900])
    true, swapped = memory.encode(story, a), memory.encode(other, b)
    assert not torch.equal(true[0], swapped[0]) and not torch.equal(true[1], swapped[1])

    with_ttt = memory.gain(true, swapped, segment, mask)
    assert with_ttt["true"]["character"] != with_ttt["swapped"]["character"] and "described" not in with_ttt
    dense = memory.encode_dense_text(story)
    assert not torch.equal(dense[0][:, segment], true[1][:, segment])  # the dense caption describes the look
    described = memory.gain(true, swapped, segment, mask, dense)
    for which in ("true", "swapped"):  # the same sequences, a larger batch
        assert described[which]["character"] == pytest.approx(with_ttt[which]["character"], rel=1e-4)
    assert described["described"]["character"] != pytest.approx(described["true"]["character"], rel=1e-4)

    transformer = pipe.transformer
    saved = {k: v.clone() for k, v in transformer.state_dict().items() if ".gate_" in k}
    assert saved  # the TTT gates
    try:
        with torch.no_grad():
            for key in saved:
                transformer.get_parameter(key).zero_()
        transformer.register_to_config(overlap_frames=0)  # no shared frame: segment-local attention only
        cut = memory.gain(true, swapped, segment, mask, dense)
    finally:
        transformer.register_to_config(overlap_frames=1)
        with torch.no_grad():
            for key, value in saved.items():
                transformer.get_parameter(key).copy_(value)
    for region in bench_memory.REGIONS:
        assert cut["true"][region] == pytest.approx(cut["swapped"][region], abs=1e-7)
        assert cut["true"][region] != pytest.approx(with_ttt["true"][region], abs=1e-7)
        assert cut["described"][region] != pytest.approx(cut["true"][region], abs=1e-7)  # the text still reaches it


def test_unshaped_caption_encodes_every_segment_in_that_register(pipe):
    """--caption unshaped: the texts are the story's unshaped captions (size and colour of everyone on stage), the
    latents the same as in the story register; a register it does not know is refused."""
    from pipeline.toyworld.dataset import story_captions

    story = story_with_probes(4)
    frames = render_story(story)
    plain = bench_memory.MemoryProbe(pipe, [900]).encode(story, frames)
    unshaped = bench_memory.MemoryProbe(pipe, [900], caption="unshaped").encode(story, frames)
    texts = [c["unshaped"] for c in story_captions(story)]
    embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device="cpu")
    assert torch.equal(unshaped[1], embeds) and torch.equal(unshaped[2], mask)
    assert torch.equal(unshaped[0], plain[0]) and torch.equal(unshaped[3], plain[3])
    probed = bench_memory.probes(story)[-1]["segment"]  # its text names a character that the caption describes
    assert texts[probed] != story.segments[probed].text
    assert not torch.equal(unshaped[1][:, probed], plain[1][:, probed])
    with pytest.raises(ValueError, match="caption: expected one of text, unshaped, got 'dense'"):
        bench_memory.MemoryProbe(pipe, [900], caption="dense")


def test_summary_of_known_gains():
    rows = [{"adjacent": i < 2, "true": {r: [1.0] for r in bench_memory.REGIONS},
             "swapped": {r: [1.0 + g] for r in bench_memory.REGIONS}} for i, g in enumerate([0.2, 0.4, -0.1])]
    summary = {(s["group"], s["region"]): s for s in bench_memory.summarize(rows, [700])}
    assert summary[("all", "segment")]["gain"] == pytest.approx(0.5 / 3)
    assert summary[("adjacent", "character")]["gain"] == pytest.approx(0.3)
    assert summary[("adjacent", "character")]["gain_se"] == pytest.approx(0.1)
    assert summary[("apart", "segment")]["positive"] == 0.0 and summary[("all", "segment")]["probes"] == 3
    assert "text_gain" not in summary[("all", "segment")]
    for r, d in zip(rows, (0.5, 0.7, 0.9)):  # described losses: text gains 0.7, 0.7, 0.0 (swapped 1.2, 1.4, 0.9)
        r["described"] = {region: [d] for region in bench_memory.REGIONS}
    summary = {(s["group"], s["region"]): s for s in bench_memory.summarize(rows, [700])}
    assert summary[("all", "character")]["text_gain"] == pytest.approx((0.7 + 0.7 + 0.0) / 3)
    assert summary[("all", "character")]["share"] == pytest.approx((0.5 / 3) / (1.4 / 3))
    assert summary[("adjacent", "segment")]["loss_described"] == pytest.approx(0.6)
    assert "| 36% |" in bench_memory.markdown({"m": bench_memory.summarize(rows, [700])})
