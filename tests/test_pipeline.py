"""TTTVideoPipeline on tiny random components (tests/tiny.py) and the real TTT transformer.

Tiny shapes: 32 x 32 pixels, a first segment of 3 latent frames (9 pixel frames) and 2 latent frames (8 pixel frames)
per later segment, so n segments make 8 n + 1 frames. The pipeline's default fps is one segment's frames per 3 s,
here 8/3 fps, so every segment plays for exactly 3 s (CogVideoX: 48 frames, 16 fps).
"""

import copy
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, HEIGHT, LATENT_CHANNELS, TEXT_LEN, WIDTH, tiny_components

from models import CogVideoXTTTTransformer3DModel
from pipeline import Segment, Storyboard, StoryboardError, TTTVideoPipeline, load_storyboard
from pipeline.cache import set_cache
from pipeline.vae_decode import decode_windows
from pipeline.video_io import read_video, to_uint8_frames, write_video

TINY_FPS = 8 / 3  # 8 pixel frames per 3-s segment


def make_pipeline(gate_init: float = 0.1, scheduler: str = "ddim", seed: int = 0,
                  scene_embedding: bool = False) -> TTTVideoPipeline:
    components = tiny_components(seed, scheduler)
    transformer = CogVideoXTTTTransformer3DModel.from_base(
        components.pop("transformer"), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        gate_init=gate_init)
    if scene_embedding:
        with torch.no_grad():
            transformer.scene_embedding.normal_(generator=torch.Generator().manual_seed(seed))
    pipe = TTTVideoPipeline(transformer=transformer, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def story(texts: list[str], scene_starts: list[int] = ()) -> Storyboard:
    return Storyboard([Segment(t, scene_start=i in scene_starts) for i, t in enumerate(texts)])


def generate(pipe: TTTVideoPipeline, storyboard, seed: int = 0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(storyboard, generator=torch.Generator().manual_seed(seed), **kwargs).frames


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline(scene_embedding=True)


# against diffusers' CogVideoXPipeline


@pytest.mark.parametrize("scheduler, dynamic_cfg", [("ddim", False), ("dpm", False), ("dpm", True)],
                         ids=["ddim", "dpm", "dpm-dynamic-cfg"])
def test_one_segment_with_closed_gates_equals_cogvideox(scheduler, dynamic_cfg):
    components = tiny_components(0, scheduler)
    reference = CogVideoXPipeline(**components)
    reference.set_progress_bar_config(disable=True)
    expected = reference(prompt="a red ball rolls", negative_prompt="blurry", num_frames=(FRAMES_FIRST - 1) * 4 + 1,
                         num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=dynamic_cfg,
                         generator=torch.Generator().manual_seed(0), output_type="np",
                         max_sequence_length=TEXT_LEN).frames
    transformer = CogVideoXTTTTransformer3DModel.from_base(
        components["transformer"], latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        gate_init=0.0)
    pipe = TTTVideoPipeline(**{**components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    frames = generate(pipe, {"scenes": [{"segments": [{"text": "a red ball rolls"}]}]}, num_inference_steps=3,
                      negative_text="blurry", use_dynamic_cfg=dynamic_cfg, guidance_scale=6.0)
    assert frames.shape == expected.shape == (1, 9, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(frames, expected, rtol=0, atol=1e-5)


# a minute of video


def test_twenty_segments_make_sixty_seconds_and_an_mp4_that_reads_back(pipe, tmp_path):
    storyboard = story([f"segment {i}" for i in range(20)], scene_starts=[5, 12])
    output = pipe(storyboard, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    (frames,) = output.frames
    assert output.fps == pytest.approx(TINY_FPS) == pipe.config.fps
    assert pipe.frames_per_segment == 8 and pipe.num_frames(20) == 8 * 20 + 1
    assert frames.shape == (8 * 20 + 1, HEIGHT, WIDTH, 3)
    assert (len(frames) - 1) / output.fps == pytest.approx(20 * 3.0)  # 20 x 3 s, plus the first frame
    assert np.isfinite(frames).all() and 0 <= frames.min() and frames.max() <= 1

    path = write_video(frames, tmp_path / "minute.mp4", output.fps)
    decoded, fps = read_video(path)
    assert decoded.shape == (161, HEIGHT, WIDTH, 3) and decoded.dtype == np.uint8
    assert Fraction(fps).limit_denominator(100) == Fraction(8, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["minute.mp4"]  # written under a temporary name, then renamed


# decoding


@pytest.mark.parametrize("mode, windows", [("plain", (1, 4)), ("tiled", (2,)), ("sliced", (2,))])
def test_windowed_decode_equals_whole_sequence_decode(mode, windows):
    pipe = make_pipeline()
    batch = 2 if mode == "sliced" else 1
    if mode == "tiled":  # 2 x 2 overlapping tiles of 3 x 3 latents on the 4 x 4 latent grid
        pipe.vae.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=24, tile_overlap_factor_height=1 / 3,
                               tile_overlap_factor_width=1 / 3)
    if mode == "sliced":
        pipe.vae.enable_slicing()
    num_segments = 3 if mode == "plain" else 2  # 7 or 5 latent frames: an odd first frame batch, then pairs
    latents = torch.randn(batch, pipe.transformer.num_latent_frames(num_segments), LATENT_CHANNELS, HEIGHT // 8,
                          WIDTH // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = pipe.vae.decode(latents.permute(0, 2, 1, 3, 4) / pipe.vae.config.scaling_factor).sample
    assert whole.shape == (batch, 3, pipe.num_frames(num_segments), HEIGHT, WIDTH)
    window_frames = {}
    for window in windows:
        pieces = list(pipe.decode_windows(latents, window))
        window_frames[window] = [p.shape[2] for p in pieces]
        torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=0, atol=1e-6)
    if mode == "plain":
        assert window_frames == {1: [9, 8, 8], 4: [9, 16]}  # VAE frame batches (3), (2), (2) latent frames


@pytest.mark.parametrize("tile, overlap", [(16, 1 / 6), (24, 1 / 5)], ids=["tile-16", "tile-24"])
def test_tiling_keeps_the_frame_size_whatever_the_tile_settings(tile, overlap):
    # diffusers' tiled_decode keeps tile * (1 - overlap) pixels per tile: here 14 or 20 of every 8 or 16 the tiles
    # step by, which made 50 x 50 or 36 x 36 frames out of 32 x 32
    pipe = make_pipeline()
    latents = torch.randn(1, pipe.transformer.num_latent_frames(1), LATENT_CHANNELS, HEIGHT // 8, WIDTH // 8,
                          generator=torch.Generator().manual_seed(0))
    plain = torch.cat(list(pipe.decode_windows(latents)), dim=2)
    pipe.vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_overlap_factor_height=overlap,
                           tile_overlap_factor_width=overlap)
    tiled = torch.cat(list(pipe.decode_windows(latents)), dim=2)
    assert tiled.shape == plain.shape == (1, 3, pipe.num_frames(1), HEIGHT, WIDTH)


def test_tiling_keeps_the_default_models_frame_size():
    # the default model is 64 x 64; VAE tiles of 32 pixels with CogVideoX's 1/6 and 1/5 overlaps made it 70 x 68
    default = Path(__file__).resolve().parents[1] / "models" / "default"
    vae = TTTVideoPipeline.from_pretrained(default).vae
    latents = torch.randn(1, 3, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = torch.cat(list(decode_windows(vae, latents, 3)), dim=2)
    vae.enable_tiling()
    tiled = torch.cat(list(decode_windows(vae, latents, 3)), dim=2)
    assert tiled.shape == plain.shape == (1, 3, 9, 64, 64)


def test_windows_group_whole_frame_batches():
    pipe = make_pipeline()
    latents = torch.randn(1, pipe.transformer.num_latent_frames(4), LATENT_CHANNELS, 1, 1)  # 9 frames, 8 x 8 pixels
    assert [p.shape[2] for p in pipe.decode_windows(latents, 4)] == [9, 16, 8]  # (3), (2, 2), (2)
    assert [p.shape[2] for p in pipe.decode_windows(latents, None)] == [9, 8, 8, 8]  # default: one segment each
    assert [p.shape[2] for p in pipe.decode_windows(latents, 100)] == [33]


def test_decoding_segments_separately_would_leave_seams():
    """Why the cache is carried: decoding each segment's latents on their own gives different pixels."""
    pipe = make_pipeline()
    latents = torch.randn(1, pipe.transformer.num_latent_frames(2), LATENT_CHANNELS, HEIGHT // 8, WIDTH // 8)
    carried = torch.cat(list(pipe.decode_windows(latents, 2)), dim=2)
    with torch.no_grad():
        separate = torch.cat([pipe.vae.decode(part.permute(0, 2, 1, 3, 4) / pipe.vae.config.scaling_factor).sample
                              for part in latents.split([FRAMES_FIRST, FRAMES_PER_SEGMENT], dim=1)], dim=2)
    assert carried.shape == separate.shape
    assert (carried - separate).abs().max() > 1e-3


def test_frame_batches_follow_the_vae():
    pipe = make_pipeline()
    assert pipe.frame_batches(1) == [(0, 1)]
    assert pipe.frame_batches(2) == [(0, 2)]
    assert pipe.frame_batches(7) == [(0, 3), (3, 5), (5, 7)]
    assert pipe.frame_batches(8) == [(0, 2), (2, 4), (4, 6), (6, 8)]


# guidance, loading, conditioning


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_cfg_batched_equals_sequential(scheduler):
    pipe = make_pipeline(scheduler=scheduler, scene_embedding=True)
    storyboard = story(["a red ball rolls", "it bounces", "a blue box"], scene_starts=[2])
    batched = generate(pipe, storyboard, cfg_mode="batched", output_type="latent", negative_text="dark")
    sequential = generate(pipe, storyboard, cfg_mode="sequential", output_type="latent", negative_text="dark")
    assert batched.shape == (1, pipe.transformer.num_latent_frames(3), LATENT_CHANNELS, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(batched, sequential, rtol=1e-5, atol=1e-5)


def test_save_pretrained_from_pretrained_round_trip(pipe, tmp_path):
    storyboard = story(["a red ball rolls", "a blue box"], scene_starts=[1])
    expected = generate(pipe, storyboard, output_type="pt")
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = TTTVideoPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is CogVideoXTTTTransformer3DModel
    assert loaded.config.fps == pipe.config.fps
    torch.testing.assert_close(generate(loaded, storyboard, output_type="pt"), expected, rtol=0, atol=0)


def test_from_pretrained_on_a_stock_cogvideox_folder_names_from_cogvideox(tmp_path):
    CogVideoXPipeline(**tiny_components()).save_pretrained(tmp_path / "cogvideox")
    with pytest.raises(TypeError, match=r"^transformer: expected a CogVideoXTTTTransformer3DModel, got "
                                        r"CogVideoXTransformer3DModel; .*TTTVideoPipeline\.from_cogvideox"):
        TTTVideoPipeline.from_pretrained(tmp_path / "cogvideox")


def test_from_cogvideox_with_an_adapter(tmp_path):
    trained = make_pipeline(gate_init=0.3, seed=1, scene_embedding=True)
    trained.transformer.save_adapter(tmp_path / "ttt.safetensors")
    components = tiny_components(1)
    CogVideoXPipeline(**components).save_pretrained(tmp_path / "cogvideox")
    rebuilt = TTTVideoPipeline.from_cogvideox(tmp_path / "cogvideox", ttt_adapter=tmp_path / "ttt.safetensors")
    rebuilt.set_progress_bar_config(disable=True)
    assert rebuilt.transformer.config.latent_frames_per_segment == FRAMES_PER_SEGMENT  # from the adapter's config
    storyboard = story(["a red ball", "a box"], scene_starts=[1])
    torch.testing.assert_close(generate(rebuilt, storyboard, output_type="latent"),
                               generate(trained, storyboard, output_type="latent"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ttt\.safetensors: TTT config arguments differ from the adapter's: "
                                         r"latent_frames_per_segment=5 \(adapter: 2\)"):
        TTTVideoPipeline.from_cogvideox(tmp_path / "cogvideox", ttt_adapter=tmp_path / "ttt.safetensors",
                                        latent_frames_per_segment=5)


def test_scene_transitions_reach_the_transformer(pipe):
    one_scene = generate(pipe, story(["a red ball", "a box"]), output_type="latent")
    two_scenes = generate(pipe, story(["a red ball", "a box"], scene_starts=[1]), output_type="latent")
    assert (one_scene - two_scenes).abs().max() > 1e-4
    closed = make_pipeline()  # scene embedding at its init (zeros): the boundary flag changes nothing
    torch.testing.assert_close(generate(closed, story(["a red ball", "a box"]), output_type="latent"),
                               generate(closed, story(["a red ball", "a box"], scene_starts=[1]), output_type="latent"))


def test_null_text_embedding_is_the_unconditional_condition(pipe):
    null, null_mask = pipe.null_text_embedding()
    assert null.shape == (TEXT_LEN, pipe.text_encoder.config.d_model) and null_mask.shape == (TEXT_LEN,)
    assert null_mask.sum() == 2  # [CLS] [SEP] of the empty text; the rest is padding
    embeds, mask, negative, negative_mask = pipe.encode_prompt(["a red ball", "a box"], ["", "dark"])
    assert embeds.shape == negative.shape == (1, 2, TEXT_LEN, null.shape[-1]) and mask.shape == (1, 2, TEXT_LEN)
    torch.testing.assert_close(negative[0, 0], null, rtol=1e-6, atol=1e-6)  # batch size changes the float sums
    assert torch.equal(negative_mask[0, 0], null_mask)
    # each text encoded on its own equals its row of the batched, de-duplicated encoding
    alone, alone_mask, _, _ = pipe.encode_prompt(["a box"], do_classifier_free_guidance=False)
    torch.testing.assert_close(alone[0, 0], embeds[0, 1], rtol=1e-6, atol=1e-6)
    assert torch.equal(alone_mask[0, 0], mask[0, 1])


def test_output_types_agree(pipe):
    storyboard = story(["a red ball"])
    as_np = generate(pipe, storyboard, output_type="np")
    as_pt = generate(pipe, storyboard, output_type="pt")
    as_pil = generate(pipe, storyboard, output_type="pil")
    latents = generate(pipe, storyboard, output_type="latent")
    assert as_np.shape == (1, 9, HEIGHT, WIDTH, 3) and as_pt.shape == (1, 9, 3, HEIGHT, WIDTH)
    np.testing.assert_allclose(as_pt.permute(0, 1, 3, 4, 2).numpy(), as_np, rtol=0, atol=0)
    assert len(as_pil) == 1 and len(as_pil[0]) == 9 and as_pil[0][0].size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(as_pil[0][4]), (as_np[0, 4] * 255).round().astype(np.uint8))
    assert latents.shape == (1, FRAMES_FIRST, LATENT_CHANNELS, HEIGHT // 8, WIDTH // 8)


def test_given_latents_and_callback(pipe):
    storyboard = story(["a red ball", "a box"])
    noise = torch.randn(1, pipe.transformer.num_latent_frames(2), LATENT_CHANNELS, HEIGHT // 8, WIDTH // 8)
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return {"latents": tensors["latents"] * 0} if step == 1 else {}

    zeroed = pipe(storyboard, num_inference_steps=2, latents=noise, output_type="latent", callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).frames
    assert seen == [(0, ["latents", "prompt_embeds"]), (1, ["latents", "prompt_embeds"])]
    assert torch.equal(zeroed, torch.zeros_like(zeroed))
    again = pipe(storyboard, num_inference_steps=2, latents=noise, output_type="latent").frames
    torch.testing.assert_close(again, pipe(storyboard, num_inference_steps=2, latents=noise.clone(),
                                           output_type="latent").frames)


def test_dpm_scheduler_swap_runs_many_segments():
    pipe = make_pipeline()
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    frames = generate(pipe, story(["a", "b", "c", "d"], scene_starts=[2]), num_inference_steps=3)
    assert frames.shape == (1, 8 * 4 + 1, HEIGHT, WIDTH, 3) and np.isfinite(frames).all()


def test_fps_is_stored_in_the_config():
    components = tiny_components()
    transformer = CogVideoXTTTTransformer3DModel.from_base(
        components.pop("transformer"), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT)
    assert TTTVideoPipeline(transformer=transformer, **components, fps=8).config.fps == 8.0


def test_the_default_guidance_scale_is_the_pipelines_own(tmp_path):
    """guidance_scale is stored in the config, saved and loaded with it, and used by a call that gives none."""
    components = tiny_components()
    transformer = CogVideoXTTTTransformer3DModel.from_base(
        components.pop("transformer"), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT)
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number >= 0, got -1"):
        TTTVideoPipeline(transformer=transformer, **components, guidance_scale=-1)
    TTTVideoPipeline(transformer=transformer, **components, guidance_scale=2.5).save_pretrained(tmp_path / "pipe")
    pipe = TTTVideoPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.guidance_scale == 2.5
    storyboard = story(["a red ball rolls", "a blue box"])
    default = generate(pipe, storyboard, output_type="latent")
    assert pipe.guidance_scale == 2.5
    torch.testing.assert_close(default, generate(pipe, storyboard, output_type="latent", guidance_scale=2.5),
                               rtol=0, atol=0)
    assert not torch.allclose(default, generate(pipe, storyboard, output_type="latent", guidance_scale=6.0))


def test_guidance_per_segment(pipe):
    """guidance_scale as one number per segment scales each segment's frames by its own: after one DDIM step (an
    elementwise update of the first prediction, which no scale changes) each segment equals a whole-video call at
    its scale; one scale for every segment is the plain call; the list is checked before any work."""
    storyboard = story(["a red ball rolls", "a blue box", "a green cone"], scene_starts=[2])
    one_step = {"num_inference_steps": 1, "output_type": "latent"}
    mixed = generate(pipe, storyboard, guidance_scale=[4.0, 1.0, 2.5], **one_step)
    segments = [slice(0, FRAMES_FIRST), slice(FRAMES_FIRST, FRAMES_FIRST + FRAMES_PER_SEGMENT),
                slice(FRAMES_FIRST + FRAMES_PER_SEGMENT, None)]
    for frames, scale in zip(segments, (4.0, 1.0, 2.5)):
        whole = generate(pipe, storyboard, guidance_scale=scale, **one_step)
        torch.testing.assert_close(mixed[:, frames], whole[:, frames], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(mixed, whole)
    for dynamic in (False, True):
        torch.testing.assert_close(generate(pipe, storyboard, guidance_scale=[3.0] * 3, use_dynamic_cfg=dynamic),
                                   generate(pipe, storyboard, guidance_scale=3.0, use_dynamic_cfg=dynamic),
                                   rtol=1e-5, atol=1e-6)
    for scale, message in (([2.0, 2.0], r"guidance_scale: expected a number or one per segment \(3\), got 2 numbers"),
                           ([2.0, -1.0, 2.0], r"guidance_scale\[1\] \(segment 2\): expected a finite number >= 0"),
                           ("6", "guidance_scale: expected a number or one per segment, got '6'")):
        with pytest.raises(ValueError, match=message):
            generate(pipe, storyboard, guidance_scale=scale)


def local_attention_copy(pipe: TTTVideoPipeline) -> TTTVideoPipeline:
    """The same pipeline with every block's TTT layer removed (ttt None: local attention only), by hand."""
    transformer = copy.deepcopy(pipe.transformer)
    for block in transformer.transformer_blocks:
        block.ttt = None
    local = TTTVideoPipeline(transformer=transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                             tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)
    local.set_progress_bar_config(disable=True)
    return local


def test_ttt_skipped_is_local_attention_and_restores(pipe):
    """Inside `ttt_skipped()` the transformer computes what it computes with its TTT layers removed; on leaving
    (also by an exception) the TTT layers run again."""
    transformer, local = pipe.transformer, local_attention_copy(pipe).transformer
    generator = torch.Generator().manual_seed(3)
    frames = FRAMES_FIRST + FRAMES_PER_SEGMENT
    inputs = {"hidden_states": torch.randn(1, frames, LATENT_CHANNELS, HEIGHT // 8, WIDTH // 8, generator=generator),
              "encoder_hidden_states": torch.randn(1, 2, TEXT_LEN, transformer.config.text_embed_dim,
                                                   generator=generator),
              "timestep": torch.tensor([500]), "return_dict": False}
    with torch.no_grad():
        with_ttt = transformer(**inputs)[0]
        with transformer.ttt_skipped():
            skipped = transformer(**inputs)[0]
        without_ttt = local(**inputs)[0]
        torch.testing.assert_close(skipped, without_ttt, rtol=0, atol=0)
        assert (with_ttt - skipped).abs().max() > 1e-4  # the gates are open: TTT changes the prediction
        with pytest.raises(RuntimeError, match="inside"), transformer.ttt_skipped():
            raise RuntimeError("inside")
        torch.testing.assert_close(transformer(**inputs)[0], with_ttt, rtol=0, atol=0)
    assert transformer.has_ttt and not local.has_ttt


def test_memory_guidance_adds_the_ttt_difference(pipe):
    """memory_guidance_scale m with memory_guidance_baseline "no_ttt" adds m x (conditional prediction - the same
    without TTT) to the guided prediction. After one DDIM step (affine in the prediction, the same noise) the latents
    are those of the guided call plus m x (the unguided call's - the TTT-less copy's unguided call's); per segment,
    each segment's frames follow its own m; m = 0 is the plain call exactly."""
    storyboard = story(["a red ball rolls", "a blue box", "a green cone"], scene_starts=[2])
    one_step = {"num_inference_steps": 1, "output_type": "latent", "memory_guidance_baseline": "no_ttt"}
    guided = generate(pipe, storyboard, guidance_scale=3.0, **one_step)
    conditional = generate(pipe, storyboard, guidance_scale=1.0, **one_step)
    local = generate(local_attention_copy(pipe), storyboard, guidance_scale=1.0, **one_step)
    assert (conditional - local).abs().max() > 1e-4
    for m in (0.5, 2.0):
        expected = guided + m * (conditional - local)
        torch.testing.assert_close(generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=m,
                                            **one_step), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(generate(pipe, storyboard, guidance_scale=1.0, memory_guidance_scale=2.0, **one_step),
                               conditional + 2.0 * (conditional - local), rtol=1e-4, atol=1e-5)
    assert torch.equal(generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=0.0, **one_step), guided)
    mixed = generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=[2.0, 0.0, 0.5], **one_step)
    segments = [slice(0, FRAMES_FIRST), slice(FRAMES_FIRST, FRAMES_FIRST + FRAMES_PER_SEGMENT),
                slice(FRAMES_FIRST + FRAMES_PER_SEGMENT, None)]
    for frames, m in zip(segments, (2.0, 0.0, 0.5)):
        expected = guided + m * (conditional - local)
        torch.testing.assert_close(mixed[:, frames], expected[:, frames], rtol=1e-4, atol=1e-5)
    assert pipe.transformer.has_ttt and not any(block.ttt_skipped for block in pipe.transformer.transformer_blocks)


def test_memory_guidance_from_the_segments_apart(pipe, tmp_path):
    """The default baseline, "segments_apart": m x (conditional prediction - the same with every segment's TTT
    apart, `ttt_segments_apart()`, tests/test_model.py) is added, after one DDIM step exactly as the latents show; it
    is not the "no_ttt" push; on the first segment of a one-segment story it is no push at all (alone is the whole);
    the pipeline's config keeps its baseline through save/load; a bad one is refused naming the argument."""
    storyboard = story(["a red ball rolls", "a blue box", "a green cone"], scene_starts=[2])
    one_step = {"num_inference_steps": 1, "output_type": "latent"}
    assert pipe.config.memory_guidance_baseline == "segments_apart"
    guided = generate(pipe, storyboard, guidance_scale=3.0, **one_step)
    conditional = generate(pipe, storyboard, guidance_scale=1.0, **one_step)
    with pipe.transformer.ttt_segments_apart():
        apart = generate(pipe, storyboard, guidance_scale=1.0, **one_step)
    assert (conditional - apart).abs().max() > 1e-4
    pushed = generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=2.0, **one_step)
    torch.testing.assert_close(pushed, guided + 2.0 * (conditional - apart), rtol=1e-4, atol=1e-5)
    assert torch.equal(pushed, generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=2.0,
                                        memory_guidance_baseline="segments_apart", **one_step))
    no_ttt = generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=2.0,
                      memory_guidance_baseline="no_ttt", **one_step)
    assert (pushed - no_ttt).abs().max() > 1e-4
    single = story(["a red ball rolls"])
    torch.testing.assert_close(generate(pipe, single, guidance_scale=3.0, memory_guidance_scale=2.0, **one_step),
                               generate(pipe, single, guidance_scale=3.0, **one_step), rtol=1e-5, atol=1e-6)
    assert not any(block.ttt_segments_apart for block in pipe.transformer.transformer_blocks)

    own = TTTVideoPipeline(**pipe.components, memory_guidance_scale=2.0, memory_guidance_baseline="no_ttt")
    own.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["memory_guidance_baseline"] == "no_ttt"
    loaded = TTTVideoPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(loaded, storyboard, guidance_scale=3.0, **one_step), no_ttt,
                               rtol=1e-5, atol=1e-6)  # reloaded weights: the same up to float rounding
    with pytest.raises(ValueError, match="memory_guidance_baseline: expected one of segments_apart, no_ttt, got 'x'"):
        generate(pipe, storyboard, memory_guidance_scale=1.0, memory_guidance_baseline="x")
    with pytest.raises(ValueError, match="memory_guidance_baseline: expected one of segments_apart, no_ttt, got 'x'"):
        TTTVideoPipeline(**pipe.components, memory_guidance_baseline="x")


def test_memory_guidance_errors(pipe):
    storyboard = story(["a red ball rolls", "a blue box"])
    for scale, message in ((-1.0, "memory_guidance_scale: expected a finite number >= 0, got -1.0"),
                           ([1.0], r"memory_guidance_scale: expected a number or one per segment \(2\), got 1"),
                           ([1.0, float("nan")], r"memory_guidance_scale\[1\] \(segment 2\): expected a finite")):
        with pytest.raises(ValueError, match=message):
            generate(pipe, storyboard, memory_guidance_scale=scale)
    with pytest.raises(ValueError, match="memory_guidance_scale: this transformer has no TTT layers"):
        generate(local_attention_copy(pipe), storyboard, memory_guidance_scale=1.0)
    cached = make_pipeline()  # hooks with one state for every call (those with one per call: test_cache_hooks.py)
    set_cache(cached, "pab")
    with pytest.raises(ValueError, match="memory_guidance_scale: not combined with PyramidAttentionBroadcastConfig"):
        generate(cached, storyboard, memory_guidance_scale=1.0)


def test_segment_parts_guide_a_segment_by_the_sum_of_its_parts():
    """segment_parts [base, part_1, part_2] on one segment: its frames are guided by (eps_base - eps_u) +
    sum_k (eps_k - eps_base), each eps the conditional prediction with that text in the segment's place (the other
    segments keep theirs); the other segments' frames are the plain call's. After one DDIM step (affine in the
    prediction, the same noise) each eps is read off a call with that text in place at guidance 1, and eps_u off the
    plain call at guidance 3 and 1. In float64, since the calls run on different batch sizes, whose float32 sums differ
    by CPU; they agree to float32's rounding (3e-8 measured), as the pipeline takes each prediction in float32."""
    pipe = make_pipeline(scene_embedding=True).to(torch.float64)
    texts = ["a red ball rolls", "a box and a cone", "a yellow star"]
    base, parts = "a white room", ["a blue box", "a green cone"]
    one_step = {"num_inference_steps": 1, "output_type": "latent"}

    def with_segment_1(text: str, scale: float) -> torch.Tensor:
        return generate(pipe, story([texts[0], text, texts[2]], scene_starts=[2]), guidance_scale=scale, **one_step)

    composed = generate(pipe, story(texts, scene_starts=[2]), guidance_scale=3.0,
                        segment_parts=[None, [base, *parts], None], **one_step)
    plain = with_segment_1(texts[1], 3.0)
    unconditional = (plain - 3.0 * with_segment_1(texts[1], 1.0)) / (1 - 3.0)
    base_latents = with_segment_1(base, 1.0)
    expected = unconditional + 3.0 * (base_latents - unconditional
                                      + sum(with_segment_1(part, 1.0) - base_latents for part in parts))
    segment_1 = slice(FRAMES_FIRST, FRAMES_FIRST + FRAMES_PER_SEGMENT)
    torch.testing.assert_close(composed[:, segment_1], expected[:, segment_1], rtol=1e-6, atol=1e-6)
    assert (composed[:, segment_1] - plain[:, segment_1]).abs().max() > 1e-3
    others = torch.ones(composed.shape[1], dtype=torch.bool)
    others[segment_1] = False
    torch.testing.assert_close(composed[:, others], plain[:, others], rtol=1e-6, atol=1e-6)
    assert torch.equal(generate(pipe, story(texts, scene_starts=[2]), guidance_scale=3.0,
                                segment_parts=[None] * 3, **one_step), plain)


def test_segment_parts_errors(pipe):
    storyboard = story(["a red ball rolls", "a blue box"])
    for parts, message in (([["", "a"]], r"segment_parts: expected one entry per storyboard segment \(2\)"),
                           ("ab", r"segment_parts: expected one entry per storyboard segment"),
                           ([None, ["a blue box"]], r"segment_parts\[1\] \(segment 2\): expected None or \[base, "),
                           ([None, ["", " "]], r"segment_parts\[1\] \(segment 2\): expected None or \[base, "),
                           ([None, "a blue box"], r"segment_parts\[1\] \(segment 2\): expected None or \[base, ")):
        with pytest.raises(ValueError, match=message):
            generate(pipe, storyboard, guidance_scale=3.0, segment_parts=parts)
    with pytest.raises(ValueError, match=r"segment_parts: needs classifier-free guidance \(guidance_scale > 1\)"):
        generate(pipe, storyboard, guidance_scale=1.0, segment_parts=[None, ["", "a", "b"]])
    cached = make_pipeline()
    set_cache(cached, "pab")
    with pytest.raises(ValueError, match="segment_parts: not combined with PyramidAttentionBroadcastConfig"):
        generate(cached, storyboard, guidance_scale=3.0, segment_parts=[None, ["", "a", "b"]])


def test_memory_guidance_on_the_segments_that_continue_a_scene(pipe, tmp_path):
    """memory_guidance_segments "continuing" puts one scale on every segment but the first and each scene's first
    (the call with that list, exactly); the pipeline's own scale and place, saved in its config, are what a call that
    gives none uses; a list is taken as it is; bad values are refused naming the argument."""
    storyboard = story(["a red ball rolls", "the ball stops", "a blue box", "the box spins"], scene_starts=[2])
    assert storyboard.continues_scene == [False, True, False, True]
    one_step = {"num_inference_steps": 1, "output_type": "latent"}
    continuing = generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=2.0,
                          memory_guidance_segments="continuing", **one_step)
    listed = generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=[0.0, 2.0, 0.0, 2.0], **one_step)
    assert torch.equal(continuing, listed)
    everywhere = generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=2.0, **one_step)
    assert not torch.allclose(continuing, everywhere)
    assert pipe.config.memory_guidance_scale == 0.0 and pipe.config.memory_guidance_segments == "all"
    plain = generate(pipe, storyboard, guidance_scale=3.0, **one_step)
    assert torch.equal(plain, generate(pipe, storyboard, guidance_scale=3.0, memory_guidance_scale=0.0, **one_step))

    own = TTTVideoPipeline(**pipe.components, memory_guidance_scale=2.0, memory_guidance_segments="continuing")
    own.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["memory_guidance_scale"] == 2.0 and index["memory_guidance_segments"] == "continuing"
    loaded = TTTVideoPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    own_default = generate(loaded, storyboard, guidance_scale=3.0, **one_step)
    for kwargs in ({"memory_guidance_scale": 2.0, "memory_guidance_segments": "continuing"},
                   {"memory_guidance_scale": [0.0, 2.0, 0.0, 2.0]}):
        assert torch.equal(own_default, generate(loaded, storyboard, guidance_scale=3.0, **kwargs, **one_step))
    for kwargs in ({"memory_guidance_scale": 0.0}, {"memory_guidance_segments": "all"}):
        assert not torch.allclose(own_default, generate(loaded, storyboard, guidance_scale=3.0, **kwargs, **one_step))
    assert torch.equal(generate(loaded, storyboard, guidance_scale=3.0, memory_guidance_segments="all", **one_step),
                       generate(loaded, storyboard, guidance_scale=3.0, memory_guidance_scale=[2.0] * 4, **one_step))

    with pytest.raises(ValueError, match="memory_guidance_segments: expected one of all, continuing, got 'named'"):
        generate(pipe, storyboard, memory_guidance_scale=1.0, memory_guidance_segments="named")
    with pytest.raises(ValueError, match="memory_guidance_segments: expected one of all, continuing, got 'later'"):
        TTTVideoPipeline(**pipe.components, memory_guidance_segments="later")
    with pytest.raises(ValueError, match="memory_guidance_scale: expected a finite number >= 0, got -2"):
        TTTVideoPipeline(**pipe.components, memory_guidance_scale=-2)
    local = local_attention_copy(pipe)
    with pytest.raises(ValueError, match="memory_guidance_scale: this transformer has no TTT layers"):
        TTTVideoPipeline(**local.components, memory_guidance_scale=1.0)


def test_memory_guidance_in_a_timestep_interval(pipe):
    """memory_guidance_timesteps (low, high): memory guidance only on the steps with low <= t < high; an interval over
    every step is the call without one, an interval over none the plain call, exactly; one over the first step only
    is neither; a bad interval is refused."""
    storyboard = story(["a red ball rolls", "the ball stops"])
    two_steps = {"num_inference_steps": 2, "output_type": "latent", "guidance_scale": 3.0}
    plain = generate(pipe, storyboard, **two_steps)
    guided = generate(pipe, storyboard, memory_guidance_scale=2.0, **two_steps)
    first, second = pipe.scheduler.timesteps.tolist()
    assert first > second
    assert torch.equal(generate(pipe, storyboard, memory_guidance_scale=2.0, memory_guidance_timesteps=(0, 1000),
                                **two_steps), guided)
    assert torch.equal(generate(pipe, storyboard, memory_guidance_scale=2.0,
                                memory_guidance_timesteps=(first + 1, first + 2), **two_steps), plain)
    early = generate(pipe, storyboard, memory_guidance_scale=2.0, memory_guidance_timesteps=(second + 1, first + 1),
                     **two_steps)
    assert not torch.allclose(early, plain) and not torch.allclose(early, guided)
    for interval in ((5, 5), (-1, 10), (3,)):
        with pytest.raises(ValueError, match=r"memory_guidance_timesteps: expected \(low, high\) with 0 <= low"):
            generate(pipe, storyboard, memory_guidance_scale=1.0, memory_guidance_timesteps=interval)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"cfg_mode": "fast"}, ValueError, "cfg_mode must be one of ('batched', 'sequential'), got 'fast'"),
    ({"output_type": "gif"}, ValueError, "output_type must be one of ('np', 'pil', 'pt', 'latent'), got 'gif'"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be >= 1, got 0"),
    ({"decode_window": 0}, ValueError, "decode_window must be >= 1 latent frame, got 0"),
    ({"height": 36}, ValueError, "height and width must be positive multiples of 8, got 36 and 32"),
    ({"latents": torch.zeros(1, 4, 4, 4, 4)}, ValueError, "latents: expected shape (1, 3, 4, 4, 4) for 1 segments"),
    ({"negative_text": "a dark and cold place and a very long night too", "strict_text": True}, StoryboardError,
     "argument: negative_text has 13 tokens, over the text encoder's budget of 8 (shorten it)"),
    ({"num_inference_steps": 1001}, ValueError,
     "num_inference_steps must be at most the scheduler's 1000 training timesteps, got 1001"),
    ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "callback_on_step_end_tensor_inputs must be in"),
    ({"max_segments": 0}, StoryboardError, "storyboard has 1 segments (3 s); the maximum is 0"),
], ids=["cfg-mode", "output-type", "steps", "window", "height", "latents", "negative-budget", "too-many-steps",
        "callback", "max"])
def test_bad_arguments_are_clear_errors(pipe, kwargs, error, message):
    with pytest.raises(error) as info:
        pipe(story(["a red ball"]), **{"num_inference_steps": 1, **kwargs})
    assert message in str(info.value)


def test_over_budget_segment_text_is_reported_before_any_work_with_strict_text(pipe):
    with pytest.raises(StoryboardError, match=r"scenes\[0\]\.segments\[1\]: text has 11 tokens, over the text "
                                              r"encoder's budget of 8"):
        pipe({"scenes": [{"segments": [{"text": "ok"}, {"text": "one two three four five six seven eight nine"}]}]},
             strict_text=True)


def test_the_original_releases_long_texts_render_truncated_with_a_warning(pipe):
    path = Path(__file__).parent / "data" / "long_texts_legacy.json"  # texts of 44 to 61 tokens; the budget is 8
    with pytest.warns(UserWarning, match=r"long_texts_legacy\.json: \[1\]: text has 44 tokens, over the text "
                                         r"encoder's budget of 8; truncated, dropping 'small hop and then"):
        frames = generate(pipe, path, num_inference_steps=1, guidance_scale=1.0)
    assert frames.shape == (1, 3 * 8 + 1, HEIGHT, WIDTH, 3)
    # what the encoder saw: the texts cut to the budget, as diffusers' pipelines cut them
    cut = [pipe.tokenizer.decode(pipe.tokenizer(t, truncation=True, max_length=TEXT_LEN)["input_ids"],
                                 skip_special_tokens=True) for t in load_storyboard(path).texts]
    np.testing.assert_array_equal(generate(pipe, story(cut, scene_starts=[2]), num_inference_steps=1,
                                           guidance_scale=1.0), frames)


# video files


def test_video_inputs_convert_alike():
    frames = np.random.default_rng(0).random((5, 16, 24, 3), dtype=np.float32)
    expected = (frames * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(to_uint8_frames(frames), expected)
    np.testing.assert_array_equal(to_uint8_frames(torch.from_numpy(frames).permute(0, 3, 1, 2)), expected)
    np.testing.assert_array_equal(to_uint8_frames([PIL.Image.fromarray(f) for f in expected]), expected)
    np.testing.assert_array_equal(to_uint8_frames(expected), expected)


def test_written_video_keeps_colours_and_size(tmp_path):
    colours = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230]], dtype=np.uint8)  # red, green, blue frames
    frames = np.repeat(colours[:, None, None, :], 16, axis=1).repeat(24, axis=2)  # (3, 16, 24, 3)
    decoded, fps = read_video(write_video(frames, tmp_path / "rgb.mp4", 16))
    assert decoded.shape == (3, 16, 24, 3) and fps == 16
    assert np.abs(decoded.astype(int) - frames).max() <= 6  # lossy H.264, but no channel swap


@pytest.mark.parametrize("frames, fps, message", [
    (np.zeros((2, 15, 16, 3)), 8, "height and width must be even for H.264 (yuv420p), got 15x16"),
    (np.zeros((0, 16, 16, 3)), 8, "frames: expected at least one frame"),
    (np.zeros((2, 16, 16)), 8, "frames: expected (F, H, W, 3), got shape (2, 16, 16)"),
    (np.zeros((2, 16, 16, 3)), 0, "fps: expected a positive number, got 0"),
], ids=["odd-size", "empty", "shape", "fps"])
def test_bad_video_input_writes_nothing(tmp_path, frames, fps, message):
    with pytest.raises(ValueError) as info:
        write_video(frames, tmp_path / "v.mp4", fps)
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_existing_video(tmp_path, monkeypatch):
    import av

    path = write_video(np.zeros((2, 16, 16, 3)), tmp_path / "v.mp4", 8)
    before = path.read_bytes()
    real_frame = av.VideoFrame
    calls = []

    class FailingFrame:  # fails on frame 51, after the encoder's lookahead has sent packets to the file
        @staticmethod
        def from_ndarray(*args, **kwargs):
            calls.append(1)
            if len(calls) > 50:
                raise OSError("No space left on device")
            return real_frame.from_ndarray(*args, **kwargs)

    monkeypatch.setattr(av, "VideoFrame", FailingFrame)
    with pytest.raises(OSError, match="No space left on device"):
        write_video(np.random.default_rng(0).random((60, 16, 16, 3)), path, 8)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


@pytest.mark.gpu
def test_model_cpu_offload_gives_the_same_video():
    pipe = make_pipeline(scene_embedding=True)
    storyboard = story(["a red ball", "a box"], scene_starts=[1])
    expected = generate(pipe.to("cuda"), storyboard, output_type="pt")
    pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    torch.testing.assert_close(generate(pipe, storyboard, output_type="pt"), expected, rtol=1e-4, atol=1e-4)
