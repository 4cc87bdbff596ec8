"""The demo's "keep" column: kept rows of the last result keep their latents exactly; the others (and rows added at
the end) are generated anew (pipeline/demo/worker.py `keep_arguments`, editor.py `kept_rows`)."""

import pytest
import torch
from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, tiny_components
from tiny_ttt_pipeline import tiny_ttt_pipeline

from pipeline.demo.editor import kept_rows
from pipeline.demo.worker import MAX_MEMORY_GUIDANCE, OutputFolders, Renderer, Settings, SettingsError, keep_arguments
from pipeline.segment_context import load_latents
from pipeline.storyboard import Segment, Storyboard

TEXTS = ["a red cat", "a dog runs", "a bird flies", "a fish swims"]
SETTINGS = Settings(steps=2, seed=1)


def story(n: int) -> Storyboard:
    return Storyboard([Segment(t) for t in TEXTS[:n]])


def frames_of(segment: int) -> slice:
    start = 0 if segment == 0 else FRAMES_FIRST + (segment - 1) * FRAMES_PER_SEGMENT
    return slice(start, FRAMES_FIRST + segment * FRAMES_PER_SEGMENT)


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    pipe = tiny_ttt_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return Renderer(pipe, OutputFolders(tmp_path_factory.mktemp("outputs")))


def test_kept_rows_reads_the_keep_column():
    rows = [["a", False, "", True], ["b", False, ""], ["c", True, "", "true"], ["d", False, "", False],
            ["", False, "", True]]  # a blank last row is no segment
    assert kept_rows(rows) == [0, 2]
    assert kept_rows(None) == []


def test_kept_rows_keep_their_latents_and_the_rest_is_generated(renderer):
    first = renderer.render(story(3), SETTINGS)
    before = load_latents(first.latents)[0]
    again = renderer.render(story(4), Settings(steps=2, seed=5), keep=[0, 2], previous=first.video)
    after = load_latents(again.latents)[0]
    assert again.kept == (0, 2) and again.num_frames == 8 * 4 + 1
    for row in (0, 2):
        assert torch.equal(after[:, frames_of(row)], before[:, frames_of(row)])
    assert not torch.equal(after[:, frames_of(1)], before[:, frames_of(1)])
    # rows removed at the end: the kept rows of the first ones still count
    shorter = renderer.render(story(2), SETTINGS, keep=[1], previous=again.video)
    assert torch.equal(load_latents(shorter.latents)[0][:, frames_of(1)], after[:, frames_of(1)])


def test_bad_keep_marks_are_clear_errors(renderer, tmp_path):
    first = renderer.render(story(2), SETTINGS)
    with pytest.raises(ValueError, match="rows 1, 2 are marked keep, but there is no earlier video"):
        keep_arguments([0, 1], None, renderer.pipe, 2)
    with pytest.raises(ValueError, match="row 3 is marked keep, but the last video has only 2 segments"):
        keep_arguments([0, 2], first.video, renderer.pipe, 3)
    with pytest.raises(ValueError, match="every row is marked keep"):
        keep_arguments([0, 1], first.video, renderer.pipe, 2)
    assert keep_arguments([], None, renderer.pipe, 2) == {}
    with pytest.raises(ValueError, match="row 1 is marked keep, but the last video is gone"):
        keep_arguments([0], tmp_path / "video.mp4", renderer.pipe, 2)


def test_default_settings_sample_at_the_pipelines_own_guidance(tmp_path):
    """Settings() leaves guidance to the pipeline (its config's guidance_scale, 2 here, as for the bundled model): the
    same latents as asking for 2, not CogVideoX's 6; a cache that needs guidance is refused against that scale."""
    pipe = tiny_ttt_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(guidance_scale=2.0)
    renderer = Renderer(pipe, OutputFolders(tmp_path))
    chosen = {None: Settings(steps=2, seed=1), **{g: Settings(steps=2, seed=1, guidance=g) for g in (2.0, 6.0)}}
    latents = {g: load_latents(renderer.render(story(2), settings).latents)[0] for g, settings in chosen.items()}
    torch.testing.assert_close(latents[None], latents[2.0], atol=0, rtol=0)
    assert (latents[None] - latents[6.0]).abs().max() > 1e-4
    pipe.register_to_config(guidance_scale=1.0)
    with pytest.raises(SettingsError, match="cache: cache 'faster'"):
        renderer.render(story(1), Settings(steps=1, cache="faster"))


def test_default_settings_sample_at_the_pipelines_own_memory_guidance(tmp_path):
    """Settings() leaves memory guidance to the pipeline (its config's scale and segments, 3 on the segments that
    continue a scene here; the bundled model keeps 24 there): the same latents as asking for 3, not the plain run; a
    cache that cannot take memory guidance is refused against that scale."""
    pipe = tiny_ttt_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(memory_guidance_scale=3.0, memory_guidance_segments="continuing")
    renderer = Renderer(pipe, OutputFolders(tmp_path))
    chosen = {None: Settings(steps=2, seed=1), **{m: Settings(steps=2, seed=1, memory_guidance=m) for m in (0.0, 3.0)}}
    latents = {m: load_latents(renderer.render(story(2), settings).latents)[0] for m, settings in chosen.items()}
    torch.testing.assert_close(latents[None], latents[3.0], atol=0, rtol=0)
    assert (latents[None] - latents[0.0]).abs().max() > 1e-4
    with pytest.raises(SettingsError, match="cache: cache 'faster' keeps one state for every transformer call"):
        renderer.render(story(1), Settings(steps=1, cache="faster"))


def test_memory_guidance_setting_reaches_the_pipeline_and_is_checked(renderer, tmp_path):
    """Settings.memory_guidance is the pipeline's memory_guidance_scale: 0 is the plain run, > 0 another video; with a
    cache that keeps one state for every call, or on a model without TTT layers, it is a settings error."""
    plain = load_latents(renderer.render(story(2), SETTINGS).latents)[0]
    off = load_latents(renderer.render(story(2), Settings(steps=2, seed=1, memory_guidance=0)).latents)[0]
    guided = load_latents(renderer.render(story(2), Settings(steps=2, seed=1, memory_guidance=3)).latents)[0]
    torch.testing.assert_close(off, plain, atol=0, rtol=0)
    assert (guided - plain).abs().max() > 1e-4
    with pytest.raises(SettingsError, match=r"cache: cache 'faster' keeps one state for every transformer call"):
        Settings(memory_guidance=2, cache="faster").checked()
    with pytest.raises(SettingsError,
                       match=rf"memory_guidance: expected a number from 0 \(off\) to {MAX_MEMORY_GUIDANCE:g}, got -1"):
        Settings(memory_guidance=-1).checked()
    from models import CogVideoXTTTTransformer3DModel
    from pipeline.pipeline_ttt_video import TTTVideoPipeline

    components = tiny_components()
    components["transformer"] = CogVideoXTTTTransformer3DModel.from_base(
        components["transformer"], ttt_type="none", latent_frames_first=FRAMES_FIRST,
        latent_frames_per_segment=FRAMES_PER_SEGMENT)
    no_ttt = Renderer(TTTVideoPipeline(**components), OutputFolders(tmp_path))
    assert renderer.has_ttt and not no_ttt.has_ttt
    with pytest.raises(SettingsError, match="memory_guidance: this model has no TTT layers"):
        no_ttt.render(story(1), Settings(steps=1, memory_guidance=1))
