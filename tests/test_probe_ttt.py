"""benchmarks/probe_ttt.py on the bundled default model (a real toy-world pipeline, no mocks): the hooks capture the
TTT contribution the blocks really add, and the probe can fit separable features."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import probe_ttt  # noqa: E402

from pipeline.toyworld.dataset import generate  # noqa: E402

HELD_OUT_SEED = 1000


def test_capture_matches_a_recomputation_of_the_ttt_path(tmp_path):
    from pipeline import TTTVideoPipeline

    folder = tmp_path / "heldout"
    generate(folder, stories=3, min_segments=4, max_segments=4, seed=HELD_OUT_SEED, progress=False)
    pipe = TTTVideoPipeline.from_pretrained(str(ROOT / "models" / "default"))
    transformer = pipe.transformer
    ids = [f"story_{i:05d}" for i in range(3)]
    samples, raw = probe_ttt.extract(pipe, folder, ids, timestep=500, seed=0, progress=False, keep_inputs=True)

    blocks, width = len(transformer.transformer_blocks), transformer.config.num_attention_heads * \
        transformer.config.attention_head_dim
    inputs, layout = raw["inputs"], raw["layout"]
    n_video = layout.num_frames * layout.tokens_per_frame
    assert set(raw["features"]) == {(b, k) for b in range(blocks) for k in probe_ttt.FEATURES}
    for value in raw["features"].values():
        assert value.shape == (1, n_video, width)
    for s in samples:  # every probed segment is a later one with a known character
        assert s["segment"] > 0 and set(s["features"]) == set(raw["features"])
        assert all(v.shape == (width,) for v in s["features"].values())
    assert raw["means"][(0, "ttt")].shape == (layout.num_segments, width)

    # the TTT path by hand, on the sequence each pass got
    embeds_mask = inputs["encoder_attention_mask"].reshape(1, -1).bool()
    token_mask = torch.cat([embeds_mask, torch.ones(1, n_video, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        for index, block in enumerate(transformer.transformer_blocks):
            for kind, order, gate in (("ttt_fwd", layout.forward, block.gate_forward_video),
                                      ("ttt_rev", layout.reverse, block.gate_reverse_video)):
                x = raw["ttt_inputs"][(index, kind)]
                y = order.scatter(block.ttt(order.gather(x), order.gather(token_mask), order.rope))
                expected = torch.tanh(gate) * y[:, order.num_text:]
                torch.testing.assert_close(raw["features"][(index, kind)], expected, atol=1e-5, rtol=0)
                assert expected.abs().max() > 1e-3  # not trivially zero
            # what the forward pass added is what the reverse pass got on top of the forward pass's input
            added = raw["ttt_inputs"][(index, "ttt_rev")] - raw["ttt_inputs"][(index, "ttt_fwd")]
            torch.testing.assert_close(raw["features"][(index, "ttt_fwd")], added[:, layout.forward.num_text:],
                                       atol=1e-5, rtol=0)
    # a segment mean is the mean over that segment's own latent frames
    segment = 2
    frames = (layout.frame_segment == segment).nonzero().flatten()
    tokens = raw["features"][(1, "input")][0].reshape(layout.num_frames, layout.tokens_per_frame, width)
    torch.testing.assert_close(raw["means"][(1, "input")][segment], tokens[frames].mean((0, 1)), atol=1e-5, rtol=0)


def test_text_pooling_probes_what_ttt_adds_to_each_segments_text(tmp_path):
    """--pool text: the TTT contribution on the text tokens (text gate, recomputed by hand from the pass's input) and
    each segment's mean over its real text tokens, padding left out."""
    from pipeline import TTTVideoPipeline

    folder = tmp_path / "heldout"
    generate(folder, stories=2, min_segments=4, max_segments=4, seed=HELD_OUT_SEED, progress=False)
    pipe = TTTVideoPipeline.from_pretrained(str(ROOT / "models" / "default"))
    transformer = pipe.transformer
    ids = ["story_00000", "story_00001"]
    samples, raw = probe_ttt.extract(pipe, folder, ids, timestep=500, seed=0, progress=False, keep_inputs=True,
                                     pool="text")
    inputs, layout = raw["inputs"], raw["layout"]
    text_mask = inputs["encoder_attention_mask"].bool()  # (1, n, Lt)
    n_text, width = text_mask.numel(), transformer.config.num_attention_heads * transformer.config.attention_head_dim
    token_mask = torch.cat([text_mask.reshape(1, -1),
                            torch.ones(1, layout.num_frames * layout.tokens_per_frame, dtype=torch.bool)], dim=1)
    assert samples and all(v.shape == (width,) for s in samples for v in s["features"].values())
    with torch.no_grad():
        block = transformer.transformer_blocks[1]
        x = raw["ttt_inputs"][(1, "ttt_fwd")]
        order = layout.forward
        y = order.scatter(block.ttt(order.gather(x), order.gather(token_mask), order.rope))
        expected = torch.tanh(block.gate_forward_text) * y[:, :n_text]
    torch.testing.assert_close(raw["text_features"][(1, "ttt_fwd")], expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1e-4
    segment = 2
    tokens = raw["text_features"][(1, "ttt")][0].reshape(layout.num_segments, -1, width)[segment]
    real = text_mask[0, segment]
    assert 0 < real.sum() < real.numel()  # some padding to leave out
    torch.testing.assert_close(raw["means"][(1, "ttt")][segment], tokens[real].mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw["means"][(1, "input")][segment],
                               raw["text_features"][(1, "input")][0].reshape(layout.num_segments, -1, width)[
                                   segment][real].mean(0), atol=1e-5, rtol=0)


def test_probe_fits_separable_features():
    generator = torch.Generator().manual_seed(0)
    classes, per_class, dim = 8, 10, 16
    centres = 5 * torch.randn(classes, dim, generator=generator)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = centres[y] + 0.1 * torch.randn(len(y), dim, generator=generator)
    predict = probe_ttt.fit_probe(x, y, classes)
    assert (predict(x) == y).all()


def test_context_inputs_give_segment_one_clean(tmp_path):
    """--context: segment 1's latents enter as they are at timestep 0, the later segments noised at --timestep."""
    from pipeline import TTTVideoPipeline

    folder = tmp_path / "heldout"
    generate(folder, stories=1, min_segments=3, max_segments=3, seed=HELD_OUT_SEED, progress=False)
    pipe = TTTVideoPipeline.from_pretrained(str(ROOT / "models" / "default"))
    video, board = folder / "story_00000.mp4", folder / "story_00000.storyboard.json"
    plain = probe_ttt.story_inputs(pipe, video, board, timestep=700, seed=0)
    given = probe_ttt.story_inputs(pipe, video, board, timestep=700, seed=0, context=True)
    first = pipe.transformer.config.latent_frames_first
    assert given["timestep"].tolist() == [[0, 700, 700]] and plain["timestep"].tolist() == [700]
    assert torch.equal(given["hidden_states"][:, first:], plain["hidden_states"][:, first:])
    assert not torch.allclose(given["hidden_states"][:, :first], plain["hidden_states"][:, :first])
    from pipeline.video_io import read_video

    config, scale = pipe.transformer.config, pipe.vae_scale_factor_spatial
    latents = pipe.encode_video(read_video(video)[0], config.sample_height * scale, config.sample_width * scale, "v")
    torch.testing.assert_close(given["hidden_states"][:, :first], latents[:, :first], atol=1e-6, rtol=0)


def test_character_pooling_weights_each_token_by_the_characters_share_of_its_pixels(tmp_path):
    """--pool character: a token's weight is the mean mask value over the pixels it encodes (its 16 x 16 block of the
    pixel frames its latent frame stands for), in the transformer's token order; the pooled feature is the weighted
    mean of the segment's tokens. Checked against plain loops over the rendered mask."""
    import numpy as np

    from pipeline import TTTVideoPipeline
    from pipeline.toyworld.dataset import load_truth
    from pipeline.toyworld.render import render_story_mask

    folder = tmp_path / "heldout"
    generate(folder, stories=1, min_segments=3, max_segments=3, seed=HELD_OUT_SEED, progress=False)
    pipe = TTTVideoPipeline.from_pretrained(str(ROOT / "models" / "default"))
    samples, raw = probe_ttt.extract(pipe, folder, ["story_00000"], timestep=500, seed=0, progress=False,
                                     pool="character")
    layout, weights = raw["layout"], raw["token_weights"]
    story = load_truth(folder / "story_00000.truth.json")
    mask = render_story_mask(story, 64).astype(np.float64) / 255.0  # (1 + 24 n, 64, 64)
    side, pixels = 4, 16  # tokens per row; pixels per token side
    expected = np.zeros((layout.num_frames, side, side))
    for frame in range(layout.num_frames):
        first, last = (0, 0) if frame == 0 else (4 * (frame - 1) + 1, 4 * frame)
        for row in range(side):
            for col in range(side):
                block = mask[first:last + 1, row * pixels:(row + 1) * pixels, col * pixels:(col + 1) * pixels]
                expected[frame, row, col] = block.mean()
    assert weights.shape == (layout.num_frames * layout.tokens_per_frame,)
    np.testing.assert_allclose(weights.numpy(), expected.reshape(-1), atol=1e-6)
    assert 0 < (weights > 0).float().mean() < 0.5  # the characters cover some tokens, not most

    width = raw["features"][(2, "ttt")].shape[-1]
    tokens = raw["features"][(2, "ttt")][0].double()
    for s in samples:
        frames = (layout.frame_segment == s["segment"]).nonzero().flatten()
        w = torch.from_numpy(expected[frames.numpy()].reshape(-1))
        x = tokens.reshape(layout.num_frames, layout.tokens_per_frame, width)[frames].reshape(-1, width)
        torch.testing.assert_close(s["features"][(2, "ttt")].double(), (w[:, None] * x).sum(0) / w.sum(),
                                   atol=1e-5, rtol=1e-4)
    assert samples, "the story has no probed segment"

    # --pool grid --radius r reaches the pooling: (2 r + 1)^2 tokens' features per segment, the same forward pass
    for radius in (0, 1):
        grids, _ = probe_ttt.extract(pipe, folder, ["story_00000"], timestep=500, seed=0, progress=False,
                                     pool="grid", radius=radius)
        expected = probe_ttt.segment_grids(raw["features"][(2, "ttt")], layout, weights,
                                           (layout.tokens_per_frame // side, side), radius)[0].float()
        assert grids[0]["features"][(2, "ttt")].shape == ((2 * radius + 1) ** 2 * width,)
        for s in grids:
            torch.testing.assert_close(s["features"][(2, "ttt")], expected[s["segment"]])


def test_grid_pooling_keeps_the_tokens_around_the_characters_centre():
    """--pool grid: per frame the 3 x 3 tokens around the most covered token (zeros past the edge), averaged over the
    segment's frames that show the character; checked against plain loops on random tokens and weights, on a grid
    that is not square (3 rows of 5 tokens), so rows and columns cannot be swapped unnoticed."""
    generator = torch.Generator().manual_seed(0)
    rows, cols, per_frame = 3, 5, 15

    class Layout:  # what segment_grids reads: 3 segments of 2 latent frames each
        num_frames, num_segments = 6, 3
        frame_segment = torch.tensor([0, 0, 1, 1, 2, 2])

    width = 5
    tokens = torch.randn(1, 6 * per_frame, width, generator=generator, dtype=torch.float64)
    weights = torch.rand(6 * per_frame, generator=generator, dtype=torch.float64)
    weights = weights * (torch.rand(6 * per_frame, generator=generator) > 0.7)
    weights[4 * per_frame:5 * per_frame] = 0  # frame 4 shows no character: segment 2 averages frame 5 alone
    weights[0 * per_frame + 0] = 5.0  # frame 0's centre in the corner: the window runs off the grid
    weights[1 * per_frame + 9] = 5.0  # frame 1's centre at row 1, column 4: the right edge
    got = probe_ttt.segment_grids(tokens, Layout, weights, (rows, cols))
    assert got.shape == (1, 3, 9 * width)
    grid = tokens[0].reshape(6, rows, cols, width)
    for segment, frames in enumerate(([0, 1], [2, 3], [4, 5])):
        windows = []
        for frame in frames:
            w = weights[frame * per_frame:(frame + 1) * per_frame]
            if w.max() <= 0:
                continue
            row, col = divmod(int(w.argmax()), cols)
            window = torch.zeros(3, 3, width, dtype=torch.float64)
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= row + dr < rows and 0 <= col + dc < cols:
                        window[dr + 1, dc + 1] = grid[frame, row + dr, col + dc]
            windows.append(window.reshape(-1))
        torch.testing.assert_close(got[0, segment], torch.stack(windows).mean(0), rtol=0, atol=1e-12)
    # --radius 0: the most covered token alone, averaged over the same frames
    centre = probe_ttt.segment_grids(tokens, Layout, weights, (rows, cols), radius=0)
    assert centre.shape == (1, 3, width)
    for segment, frames in enumerate(([0, 1], [2, 3], [4, 5])):
        picked = []
        for frame in frames:
            w = weights[frame * per_frame:(frame + 1) * per_frame]
            if w.max() > 0:
                row, col = divmod(int(w.argmax()), cols)
                picked.append(grid[frame, row, col])
        torch.testing.assert_close(centre[0, segment], torch.stack(picked).mean(0), rtol=0, atol=1e-12)
