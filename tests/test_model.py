"""The TTT-augmented CogVideoX against stock diffusers CogVideoX (docs/design.md, "One transformer block with TTT")."""

import copy
import tempfile

import pytest
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed, get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from peft import LoraConfig
from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, LATENT_CHANNELS, TEXT_LEN, tiny_transformer, tiny_transformer_config

from models import CogVideoXTTTTransformer3DModel, segment_layout

GRID = 2  # 4x4 latents, patch 2


def ttt_model(base, **config) -> CogVideoXTTTTransformer3DModel:
    config = {"latent_frames_first": FRAMES_FIRST, "latent_frames_per_segment": FRAMES_PER_SEGMENT,
              "ttt_mini_batch_size": 16, "ttt_backend": "torch", **config}
    return CogVideoXTTTTransformer3DModel.from_base(base, **config)


def inputs(num_segments: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = FRAMES_FIRST + (num_segments - 1) * FRAMES_PER_SEGMENT
    latents = torch.randn(batch, frames, LATENT_CHANNELS, 4, 4, generator=g)
    text = torch.randn(batch, num_segments, TEXT_LEN, 16, generator=g)
    return latents, text, torch.tensor([999, 17][:batch])


def stock_rope(frames: int):
    """RoPE exactly as diffusers' CogVideoXPipeline prepares it for `frames` latent frames."""
    crops = get_resize_crop_region_for_grid((GRID, GRID), GRID, GRID)
    return get_3d_rotary_pos_embed(16, crops, (GRID, GRID), frames)


def segment_frames(num_segments: int) -> list[slice]:
    bounds = [0] + [FRAMES_FIRST + i * FRAMES_PER_SEGMENT for i in range(num_segments)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.fixture(scope="module")
def base():
    return tiny_transformer(seed=0)


@pytest.mark.parametrize("ttt_type", ["mlp", "linear"])
def test_gates_zero_one_segment_equals_stock_cogvideox(base, ttt_type):
    model = ttt_model(base, ttt_type=ttt_type, gate_init=0.0)
    latents, text, t = inputs(1)
    with torch.no_grad():
        expected = base(latents, text[:, 0], t, image_rotary_emb=stock_rope(FRAMES_FIRST)).sample
        got = model(latents, text, t).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def assert_stock_per_segment(base, model, timestep):
    """model's output on 4 segments equals stock CogVideoX run on each segment alone (its text, its frames and its
    level: timestep (B,) or per segment (B, n))."""
    latents, text, _ = inputs(4)
    with torch.no_grad():
        got = model(latents, text, timestep).sample
        for i, frames in enumerate(segment_frames(4)):
            expected = base(latents[:, frames], text[:, i], timestep if timestep.dim() == 1 else timestep[:, i],
                            image_rotary_emb=stock_rope(frames.stop - frames.start)).sample
            torch.testing.assert_close(got[:, frames], expected, atol=1e-5, rtol=0)


def test_gates_zero_segments_without_overlap_equal_stock_per_segment(base):
    assert_stock_per_segment(base, ttt_model(base, gate_init=0.0, overlap_frames=0), inputs(4)[2])


@pytest.mark.parametrize("overlap", [0, 1])
def test_ttt_is_the_only_long_range_path(base, overlap):
    latents, text, t = inputs(4)
    changed = text.clone()
    changed[:, 0] += 1.0
    last = segment_frames(4)[-1]
    for gate, expect_change in [(0.5, True), (0.0, False)]:
        model = ttt_model(base, gate_init=gate, overlap_frames=overlap)
        with torch.no_grad():
            a, b = model(latents, text, t).sample[:, last], model(latents, changed, t).sample[:, last]
        diff = (a - b).abs().max().item()
        assert (diff > 1e-4) if expect_change else (diff == 0.0), (gate, diff)


def test_ttt_segments_apart_is_every_segment_alone(base):
    """Inside `ttt_segments_apart()` each segment's output is the model's output on that segment alone (its frames,
    its text): TTT works within a segment and carries nothing between them (no overlap frame: windows share none).
    Checked in float64 on a model whose
    segments all have the same frame count and whose TTT RoPE is spatial, so a segment alone is the same sequence;
    on the default layout (first segment longer, global RoPE) for the first segment. Restored on exit."""
    g = torch.Generator().manual_seed(5)
    n, frames = 3, FRAMES_PER_SEGMENT
    latents = torch.randn(2, n * frames, LATENT_CHANNELS, 4, 4, generator=g, dtype=torch.float64)
    text = torch.randn(2, n, TEXT_LEN, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 17])
    model = ttt_model(base, gate_init=0.5, latent_frames_first=frames, ttt_rope="spatial", overlap_frames=0).double()
    with torch.no_grad():
        whole = model(latents, text, t).sample
        with model.ttt_segments_apart():
            apart = model(latents, text, t).sample
            changed = text.clone()
            changed[:, 0] += 1.0
            assert torch.equal(model(latents, changed, t).sample[:, frames:], apart[:, frames:])
        for i in range(n):
            part = slice(i * frames, (i + 1) * frames)
            alone = model(latents[:, part], text[:, i:i + 1], t).sample
            torch.testing.assert_close(apart[:, part], alone, rtol=0, atol=1e-10)
            assert (whole[:, part] - apart[:, part]).abs().max() > 1e-4  # the whole sequence is not that
        assert not any(block.ttt_segments_apart for block in model.transformer_blocks)

        default = ttt_model(base, gate_init=0.5, overlap_frames=0).double()
        latents, text = latents[:, :FRAMES_FIRST + FRAMES_PER_SEGMENT], text[:, :2]
        with default.ttt_segments_apart():
            first = default(latents, text, t).sample[:, :FRAMES_FIRST]
        alone = default(latents[:, :FRAMES_FIRST], text[:, :1], t).sample
        torch.testing.assert_close(first, alone, rtol=0, atol=1e-10)


def test_all_windows_run_in_one_attention_call(base):
    model = ttt_model(base)
    calls = []
    model.transformer_blocks[0].attn1.register_forward_hook(lambda m, args, out: calls.append(out[0].shape))
    latents, text, t = inputs(5, batch=2)
    with torch.no_grad():
        model(latents, text, t)
    assert len(calls) == 1 and calls[0][0] == 2 * 5  # batch x segments folded into one batch


@pytest.mark.parametrize("overlap", [0, 1])
def test_layout_maps(overlap):
    n, text_len, hw = 3, 4, GRID * GRID
    layout = segment_layout(n, FRAMES_FIRST, FRAMES_PER_SEGMENT, overlap, text_len, (GRID, GRID), (GRID, GRID), 16, 16)
    total = n * text_len + layout.num_frames * hw
    for order in (layout.forward, layout.reverse):
        assert torch.equal(order.index[order.inverse], torch.arange(total))
        assert torch.equal(order.inverse[order.index], torch.arange(total))
    # forward: text_i then the frames of segment i in order; reverse: text_n first, frames reversed, raster kept
    def tokens(i: int, frames) -> list[int]:  # text of segment i, then the given frames in raster order
        video = [n * text_len + f * hw + j for f in frames for j in range(hw)]
        return list(range(i * text_len, (i + 1) * text_len)) + video

    segments = [range(s.start, s.stop) for s in segment_frames(n)]
    expected_forward = [x for i in range(n) for x in tokens(i, segments[i])]
    expected_reverse = [x for i in reversed(range(n)) for x in tokens(i, reversed(segments[i]))]
    assert layout.forward.index.tolist() == expected_forward
    assert layout.reverse.index.tolist() == expected_reverse
    x = torch.randn(2, layout.num_frames * hw, 3)
    torch.testing.assert_close(layout.from_windows(layout.to_windows(x)), x)


def rope_at_global(frame: int, y: int, x: int, head_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) each (head_dim,) of one video token: diffusers' 1-D RoPE at its global frame, row and column, on
    D/4, 3D/8 and 3D/8 channels (the split of get_3d_rotary_pos_embed)."""
    parts = [get_1d_rotary_pos_embed(dim, torch.tensor([float(pos)]), use_real=True)
             for dim, pos in ((head_dim // 4, frame), (head_dim // 8 * 3, y), (head_dim // 8 * 3, x))]
    return torch.cat([cos[0] for cos, _ in parts]), torch.cat([sin[0] for _, sin in parts])


@pytest.mark.parametrize("ttt_rope", ["global", "spatial"])
def test_ttt_rope_tables_in_forward_and_reverse_order(ttt_rope):
    """Every token of the TTT orders gets the RoPE of its global latent frame (not its place in a window or in the
    order), text tokens none; frames written out: 3 segments of 3, 2, 2 latent frames on a 2 x 3 grid. "spatial"
    keeps the row and column and puts every frame at temporal position 0."""
    text_len, (h, w) = 2, (2, 3)
    layout = segment_layout(3, 3, 2, 1, text_len, (h, w), (h, w), None, 16, ttt_rope=ttt_rope)
    rope_at = (lambda frame, y, x: rope_at_global(0, y, x)) if ttt_rope == "spatial" else rope_at_global
    forward = [[0, 1, 2], [3, 4], [5, 6]]  # the frames of segments 1, 2, 3
    reverse = [[6, 5], [4, 3], [2, 1, 0]]  # segments 3, 2, 1, frames reversed
    text = (torch.ones(16), torch.zeros(16))  # the identity rotation
    for order, (cos, sin) in ((forward, layout.forward.rope), (reverse, layout.reverse.rope)):
        # each segment's text, then its frames in raster order
        rows = [row for frames in order
                for row in [text] * text_len + [rope_at(f, y, x) for f in frames for y in range(h) for x in range(w)]]
        torch.testing.assert_close(cos, torch.stack([c for c, _ in rows]))
        torch.testing.assert_close(sin, torch.stack([s for _, s in rows]))


def test_ttt_rope_none_and_the_model_config_reach_the_layout(base):
    """ttt_rope="none" leaves TTT without a RoPE table; the model's config picks the table, survives save/load, and an
    unknown value is refused by name."""
    assert segment_layout(3, 3, 2, 1, 2, (2, 2), (2, 2), None, 16, ttt_rope="none").forward.rope is None
    model = ttt_model(base, ttt_rope="spatial")
    cos, _ = model.segment_layout(3, 4, 4, "cpu").forward.rope
    text_len = model.config.max_text_seq_length
    hw = (4 // model.config.patch_size) ** 2
    first, later = cos[text_len:text_len + hw], cos[-hw:]  # segment 1's first frame, the last segment's last frame
    torch.testing.assert_close(first, later)  # frame 0's rotation everywhere
    assert not torch.equal(ttt_model(base).segment_layout(3, 4, 4, "cpu").forward.rope[0][-hw:], first)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        assert CogVideoXTTTTransformer3DModel.from_pretrained(d).config.ttt_rope == "spatial"
    with pytest.raises(ValueError, match="ttt_rope must be one of"):
        ttt_model(base, ttt_rope="time")


def test_ttt_conv_starts_as_the_model_without_it_and_is_an_added_weight(base, tmp_path):
    """ttt_conv=3 (TTTLayer.neighbours, checked token by token in test_ttt_layer.py): with the same TTT weights and
    its zero init the model's output equals the model without it; once the convolution is not zero it changes the
    output; it is one of the added weights (trained by mode "ttt", saved in the adapter), the config survives
    save/load and an even size is refused by name."""
    plain = ttt_model(base, gate_init=0.5)
    model = ttt_model(base, gate_init=0.5, ttt_conv=3)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    blocks = range(len(model.transformer_blocks))
    assert not unexpected and sorted(missing) == sorted(
        f"transformer_blocks.{i}.ttt.conv.{p}" for i in blocks for p in ("weight", "bias"))
    latents, text, t = inputs(3)
    with torch.no_grad():
        expected = plain(latents, text, t).sample
        torch.testing.assert_close(model(latents, text, t).sample, expected, atol=0, rtol=0)
        for block in model.transformer_blocks:
            block.ttt.conv.weight.normal_(std=0.3)
        assert (model(latents, text, t).sample - expected).abs().max() > 1e-3
    assert "transformer_blocks.0.ttt.conv.weight" in model.set_trainable("ttt")
    model.save_adapter(tmp_path / "conv.safetensors")
    rebuilt = ttt_model(base, gate_init=0.5, ttt_conv=3)
    rebuilt.load_adapter(tmp_path / "conv.safetensors")
    torch.testing.assert_close(rebuilt.transformer_blocks[1].ttt.conv.weight,
                               model.transformer_blocks[1].ttt.conv.weight, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "ttt")
    assert CogVideoXTTTTransformer3DModel.from_pretrained(tmp_path / "ttt").config.ttt_conv == 3
    with pytest.raises(ValueError, match="ttt_conv must be 0"):
        ttt_model(base, ttt_conv=4)


@pytest.mark.parametrize("overlap, frame_values", [
    # value 100 * sample + 10 * window + slot + 1 (sample 0 here); windows hold frames [0, 1, 2], [2, 3, 4], [4, 5, 6]
    (1, [1, 2, (3 + 11) / 2, 12, (13 + 21) / 2, 22, 23]),
    (0, [1, 2, 3, 11, 12, 21, 22]),  # [0, 1, 2], [3, 4, pad], [5, 6, pad]
])
def test_overlap_frame_averages_the_two_windows_that_hold_it(base, overlap, frame_values):
    """The block's attention output, hand-built per window and slot, reaches the TTT layer in canonical frames: the
    last frame of segment i-1 is the average of its slot in window i-1 and slot 0 of window i."""
    model = ttt_model(base, overlap_frames=overlap)
    block, n, batch = model.transformer_blocks[0], 3, 2
    hw = GRID * GRID

    def hand_built(module, args, kwargs, out):
        video, text = out  # (B*n, Fw*hw, W): row b*n + i is window i of sample b
        row = torch.arange(video.shape[0])[:, None, None]
        slot = torch.arange(video.shape[1])[None, :, None] // hw
        return (100 * (row // n) + 10 * (row % n) + slot + 1).to(video.dtype).expand_as(video), torch.zeros_like(text)

    seen = []
    block.attn1.register_forward_hook(hand_built, with_kwargs=True)
    block.ttt.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    latents, text, t = inputs(n, batch=batch)
    with torch.no_grad():
        model(latents, text, t)
    layout = model.segment_layout(n, 4, 4, "cpu")
    canonical = seen[0].index_select(1, layout.forward.inverse)  # the first TTT call sees the attention output
    video = canonical[:, n * TEXT_LEN:].unflatten(1, (len(frame_values), hw))  # (B, T, hw, W)
    expected = torch.tensor(frame_values)[None, :] + 100 * torch.arange(batch)[:, None]  # (B, T)
    expected = expected[:, :, None, None].to(video.dtype).expand_as(video)
    torch.testing.assert_close(video, expected)


def test_save_load_round_trip(base, tmp_path):
    model = ttt_model(base, gate_init=0.3)
    latents, text, t = inputs(2)
    model.save_pretrained(tmp_path / "ttt")
    loaded = CogVideoXTTTTransformer3DModel.from_pretrained(tmp_path / "ttt")
    assert loaded.config.latent_frames_per_segment == FRAMES_PER_SEGMENT and loaded.config.ttt_type == "mlp"
    with torch.no_grad():
        torch.testing.assert_close(loaded(latents, text, t).sample, model(latents, text, t).sample, atol=0, rtol=0)


def test_from_base_directory_and_adapter(base, tmp_path):
    base.save_pretrained(tmp_path / "base" / "transformer")
    model = ttt_model(copy.deepcopy(base), gate_init=0.3)  # from_base shares the base's tensors
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # also moves base weights: the adapter must carry only TTT ones
    model.save_adapter(tmp_path / "ttt.safetensors")
    rebuilt = CogVideoXTTTTransformer3DModel.from_base(
        tmp_path / "base", subfolder="transformer", adapter=tmp_path / "ttt.safetensors",
        **{k: model.config[k] for k in ("latent_frames_first", "latent_frames_per_segment", "ttt_mini_batch_size")})
    params = dict(rebuilt.named_parameters())
    added = set(model.added_parameter_names())
    for name, p in model.named_parameters():
        if name in added:
            torch.testing.assert_close(params[name], p, atol=0, rtol=0)
        else:
            torch.testing.assert_close(params[name], dict(base.named_parameters())[name], atol=0, rtol=0)


def test_from_base_object_shares_storage_and_loads_nothing_twice(base):
    model = ttt_model(base)
    assert model.proj_out.weight.data_ptr() == base.proj_out.weight.data_ptr()


def test_adapter_mismatch_is_a_clear_error(base, tmp_path):
    ttt_model(base, ttt_type="linear").save_adapter(tmp_path / "linear.safetensors")
    with pytest.raises(ValueError, match="adapter does not fit"):
        ttt_model(base, ttt_type="mlp").load_adapter(tmp_path / "linear.safetensors")


def test_an_adapter_save_killed_before_its_rename_keeps_the_old_file(base, tmp_path, monkeypatch):
    path = tmp_path / "new" / "folder" / "ttt.safetensors"  # made as it is written
    ttt_model(base, ttt_type="linear").save_adapter(path)
    before = path.read_bytes()

    def killed(*args):  # stands in for a kill between the write and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ttt_model(base, ttt_type="linear", gate_init=0.7).save_adapter(path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["ttt.safetensors"]


def test_bf16_close_to_fp32(base):
    model = ttt_model(base, gate_init=0.5)
    latents, text, t = inputs(3)
    with torch.no_grad():
        ref = model(latents, text, t).sample
        got = model.to(torch.bfloat16)(latents.bfloat16(), text.bfloat16(), t).sample.float()
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("mode", ["ttt", "ttt+attn", "full", "lora"])
def test_gradients_reach_exactly_the_trained_parameters(base, mode):
    model = ttt_model(base, gate_init=0.5, ttt_conv=3 if mode == "ttt" else 0)  # a zero convolution gets gradients
    if mode == "lora":
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    trainable = set(model.set_trainable(mode))
    latents, text, t = inputs(2)
    mask = torch.ones(2, 2, TEXT_LEN)
    mask[:, :, -2:] = 0
    out = model(latents, text, t, encoder_attention_mask=mask, scene_start=torch.tensor([[True, True]] * 2)).sample
    out.square().mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # the last block's text tokens after its reverse TTT feed nothing but the discarded text output
    unused = {f"transformer_blocks.{len(model.transformer_blocks) - 1}.gate_reverse_text"}
    assert got == trainable - unused
    if mode == "ttt":
        assert trainable == set(model.added_parameter_names())
    if mode == "ttt+attn":
        assert any("attn1.to_q" in n for n in trainable) and not any(".ff." in n for n in trainable)


def test_gradient_checkpointing_gives_the_same_gradients(base):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same TTT init for both models
        model = ttt_model(base, gate_init=0.5, checkpoint_ttt=checkpointing)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        latents, text, t = inputs(2)
        model(latents, text, t).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_bad_shapes_and_configs_are_clear_errors(base):
    model = ttt_model(base)
    latents, text, t = inputs(2)
    with pytest.raises(ValueError, match="2 segments need 5 latent frames"):
        model(latents[:, :4], text, t)
    with pytest.raises(ValueError, match="max_text_seq_length"):
        model(latents, text[:, :, :4], t)
    with pytest.raises(ValueError, match="patch_size_t"):
        CogVideoXTTTTransformer3DModel(**tiny_transformer_config(patch_size_t=2))
    with pytest.raises(ValueError, match="unknown TTT config keys"):
        CogVideoXTTTTransformer3DModel.from_base(base, ttt_tpye="mlp")
    with pytest.raises(ValueError, match="multiple of 16"):
        ttt_model(base, ttt_head_dim=8)


def test_from_base_refuses_a_model_that_has_ttt_already(base, tmp_path):
    ttt_model(base).save_pretrained(tmp_path / "ttt")
    with pytest.raises(ValueError, match="already has TTT"):
        CogVideoXTTTTransformer3DModel.from_base(CogVideoXTTTTransformer3DModel.from_pretrained(tmp_path / "ttt"))


def test_baselines_local_attention_only_and_full_attention(base):
    latents, text, t = inputs(3)
    changed = text.clone()
    changed[:, 0] += 1.0
    last = segment_frames(3)[-1]
    local = ttt_model(base, ttt_type="none", overlap_frames=0)
    assert local.added_parameter_names() == ["scene_embedding"]
    full = ttt_model(base, ttt_type="none", attention_window="full")
    with torch.no_grad():
        for i, frames in enumerate(segment_frames(3)):  # local only: each segment is the stock model alone
            expected = base(latents[:, frames], text[:, i], t, image_rotary_emb=stock_rope(frames.stop - frames.start))
            torch.testing.assert_close(local(latents, text, t).sample[:, frames], expected.sample, atol=1e-5, rtol=0)
        assert (local(latents, text, t).sample[:, last] == local(latents, changed, t).sample[:, last]).all()
        assert (full(latents, text, t).sample[:, last] - full(latents, changed, t).sample[:, last]).abs().max() > 1e-4
        one = inputs(1)
        torch.testing.assert_close(full(*one).sample, base(one[0], one[1][:, 0], one[2],
                                                           image_rotary_emb=stock_rope(FRAMES_FIRST)).sample,
                                   atol=1e-5, rtol=0)


# per-segment noise levels (docs/model.md, "Per-segment noise levels")

LEVELS = torch.tensor([[999, 0, 500, 17], [3, 999, 999, 0]])  # (B, n): one level per segment


@pytest.mark.parametrize("overlap, window", [(1, "segment"), (0, "segment"), (1, "full")])
def test_equal_per_segment_levels_equal_one_level(base, overlap, window):
    model = ttt_model(base, gate_init=0.5, overlap_frames=overlap, attention_window=window)
    latents, text, t = inputs(4)
    with torch.no_grad():
        expected = model(latents, text, t).sample
        got = model(latents, text, t[:, None].expand(-1, 4)).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_per_segment_levels_at_gates_zero_equal_stock_cogvideox_per_segment(base):
    assert_stock_per_segment(base, ttt_model(base, gate_init=0.0, overlap_frames=0), LEVELS)


def test_frame_segment_puts_the_overlap_frame_in_its_own_segment():
    layout = segment_layout(3, FRAMES_FIRST, FRAMES_PER_SEGMENT, 1, 4, (GRID, GRID), (GRID, GRID), 16, 16)
    expected = [i for i, frames in enumerate(segment_frames(3)) for _ in range(frames.stop - frames.start)]
    assert layout.frame_segment.tolist() == expected


def test_per_segment_levels_with_gradient_checkpointing(base):
    grads, built = [], ttt_model(copy.deepcopy(base), gate_init=0.5)
    for checkpointing in (False, True):
        model = copy.deepcopy(built)
        if checkpointing:
            model.enable_gradient_checkpointing()
        latents, text, _ = inputs(4)
        model(latents, text, LEVELS).sample.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[1].keys() == grads[0].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_per_segment_timestep_of_the_wrong_shape_is_a_clear_error(base):
    latents, text, _ = inputs(4)
    with pytest.raises(ValueError, match=r"per-segment timestep must be \(B, n_segments\) = \(2, 4\)"):
        ttt_model(base)(latents, text, LEVELS[:, :3])
