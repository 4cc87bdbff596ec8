"""The TTT layer (docs/design.md, "The TTT layer"): its assembly against a hand-written forward, masking, RoPE,
gradients, state carry."""

import pytest
import torch
import torch.nn.functional as F

from kernels.ttt_linear.naive import ttt_linear_naive
from kernels.ttt_mlp.naive import ttt_mlp_naive
from models import TTTLayer
from models.layout import segment_layout


def layer(ttt_type: str, seed: int = 0) -> TTTLayer:
    torch.manual_seed(seed)
    module = TTTLayer(width=24, num_heads=2, head_dim=16, ttt_type=ttt_type, mini_batch_size=8, backend="torch")
    with torch.no_grad():  # larger inner weights than the 0.02 init, so that every path carries signal
        for p in module.inner_weights:
            p.normal_(std=0.3)
    return module


def rope_for(length: int):
    lay = segment_layout(2, 3, 2, 0, 4, (2, 2), (2, 2), None, 16)  # 28 tokens: text + video
    cos, sin = lay.forward.rope
    return cos[:length], sin[:length]


def hand_written_forward(module: TTTLayer, x: torch.Tensor, mask: torch.Tensor, rope) -> torch.Tensor:
    """The layer as the design states it, step by step, around the naive op. x (B, L, W); mask (B, L)."""
    B, L, _ = x.shape
    H, D, m = module.num_heads, module.head_dim, module.mini_batch_size
    cos, sin = rope  # (L, D) each

    def heads(linear: torch.nn.Linear) -> torch.Tensor:  # (B, H, L, D)
        return (x @ linear.weight.T + linear.bias).reshape(B, L, H, D).transpose(1, 2)

    def rotate(t: torch.Tensor) -> torch.Tensor:  # RoPE on interleaved pairs (t0, t1) -> (t0, t1) e^{i theta}
        pairs = t.unflatten(-1, (D // 2, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return t * cos + rotated * sin

    def ln_h(t: torch.Tensor) -> torch.Tensor:  # per-head LayerNorm with the op's affine
        return torch.stack([F.layer_norm(t[:, h], (D,), module.ln_weight[h], module.ln_bias[h], eps=1e-6)
                            for h in range(H)], dim=1)

    q, k, v = heads(module.wq), heads(module.wk), heads(module.wv)
    q, k = rotate(q / q.norm(dim=-1, keepdim=True)), rotate(k / k.norm(dim=-1, keepdim=True))
    target = ln_h(v - k) + k
    base_lr = {"mlp": 0.1, "linear": 1.0}[module.ttt_type]
    eta = base_lr * torch.sigmoid(x @ module.lr_weight.T + module.lr_bias) / (D * m) * mask[..., None]  # (B, L, H)
    op = ttt_mlp_naive if module.ttt_type == "mlp" else ttt_linear_naive
    out = op(q, k, target, eta.transpose(1, 2), *module.inner_weights, module.ln_weight, module.ln_bias,
             mini_batch_size=m)
    out = F.layer_norm(out.transpose(1, 2).reshape(B, L, H * D), (H * D,), module.post_norm.weight,
                       module.post_norm.bias, eps=1e-6)
    return out @ module.wo.weight.T + module.wo.bias


def random_case(ttt_type: str, seed: int) -> tuple[TTTLayer, torch.Tensor, torch.Tensor, tuple, torch.Generator]:
    """A float64 layer with every parameter random (so that no term vanishes), 2 x 28 random tokens, a random mask
    (a quarter masked), the RoPE rows of 28 tokens, and the generator for anything more."""
    module = layer(ttt_type).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    x = torch.randn(2, 28, 24, generator=generator, dtype=torch.float64)
    mask = torch.rand(2, 28, generator=generator) > 0.25
    return module, x, mask, rope_for(28), generator


@pytest.mark.parametrize("ttt_type", ["mlp", "linear"])
def test_layer_assembles_the_design_around_the_op(ttt_type):
    """L2 norm of q, k per head -> RoPE -> target LN_h(v - k) + k -> eta -> op -> post-norm -> wo, in float64 with
    every parameter random (so that no term vanishes), masked tokens, text and video RoPE and a short last
    mini-batch (28 tokens, m = 8). The layer rounds q, k and eta through float32 (RoPE, sigmoid): ~3e-7 apart."""
    module, x, mask, rope, _ = random_case(ttt_type, seed=1)
    with torch.no_grad():
        expected = hand_written_forward(module, x, mask, tuple(t.double() for t in rope))
        got = module(x, mask, rope)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ttt_type", ["mlp", "linear"])
def test_masked_token_changes_no_other_output(ttt_type):
    module = layer(ttt_type)
    x = torch.randn(2, 16, 24)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, 3] = False
    changed = x.clone()
    changed[:, 3] += 5.0
    with torch.no_grad():
        a, b = module(x, mask, rope_for(16)), module(changed, mask, rope_for(16))
        others = [i for i in range(16) if i != 3]
        torch.testing.assert_close(a[:, others], b[:, others], atol=1e-6, rtol=0)
        assert (a[:, 3] - b[:, 3]).abs().max() > 1e-3  # its own read-out still sees it
        unmasked = module(changed, None, rope_for(16))
        assert (unmasked[:, 10] - a[:, 10]).abs().max() > 1e-5  # without the mask it would leak


@pytest.mark.parametrize("ttt_type", ["mlp", "linear"])
def test_gradients_reach_every_parameter(ttt_type):
    module = layer(ttt_type)
    x = torch.randn(2, 20, 24, requires_grad=True)
    module(x, None, rope_for(20)).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_state_carries_across_calls():
    module = layer("mlp")
    x = torch.randn(1, 32, 24)
    with torch.no_grad():
        whole = module(x)
        first, state = module(x[:, :16], return_state=True)
        second = module(x[:, 16:], initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=1e-5)


def test_inner_lr_follows_the_design():
    module = layer("linear")
    x = torch.randn(1, 5, 24)
    mask = torch.tensor([[True, True, False, True, True]])
    eta = module.inner_lr(x, mask)  # (B, H, L)
    expected = module.base_lr * torch.sigmoid(x @ module.lr_weight.T + module.lr_bias) / (16 * 8)
    torch.testing.assert_close(eta[0].T[[0, 1, 3, 4]], expected[0, [0, 1, 3, 4]])
    assert (eta[:, :, 2] == 0).all()


def test_bad_type_is_a_clear_error():
    with pytest.raises(ValueError, match="ttt_type must be one of"):
        TTTLayer(8, 1, 16, ttt_type="conv")


def test_conv_adds_each_frames_neighbours_to_its_video_tokens():
    """conv=3: every video token of x (text first, then whole frames in raster order) + the depthwise 3 x 3
    convolution of its frame with zero padding, written out token by token in float64; text tokens as they are. A
    new layer's convolution is zero (the layer reads token by token, as without it); sizes must be odd."""
    torch.manual_seed(0)
    module = TTTLayer(width=4, num_heads=1, head_dim=16, conv=3).double()
    num_text, (h, w), frames = 3, (3, 4), 2
    x = torch.randn(2, num_text + frames * h * w, 4, dtype=torch.float64)
    assert torch.equal(module.neighbours(x, num_text, (h, w)), x)
    with torch.no_grad():
        module.conv.weight.normal_()
        module.conv.bias.normal_()
    weight, bias = module.conv.weight[:, 0], module.conv.bias  # (W, 3, 3), (W,)
    expected = x.clone()
    video = x[:, num_text:].reshape(2, frames, h, w, 4)
    for b in range(2):
        for f in range(frames):
            for y in range(h):
                for c in range(w):
                    token = num_text + (f * h + y) * w + c
                    expected[b, token] += bias
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            if 0 <= y + dy < h and 0 <= c + dx < w:
                                expected[b, token] += weight[:, dy + 1, dx + 1] * video[b, f, y + dy, c + dx]
    torch.testing.assert_close(module.neighbours(x, num_text, (h, w)), expected, atol=1e-12, rtol=0)
    assert torch.equal(TTTLayer(width=4, num_heads=1, head_dim=16).neighbours(x, num_text, (h, w)), x)
    for bad in (2, -1):
        with pytest.raises(ValueError, match="ttt_conv must be 0"):
            TTTLayer(width=4, num_heads=1, head_dim=16, conv=bad)


@pytest.mark.parametrize("ttt_type", ["mlp", "linear"])
def test_runs_read_apart_equal_each_run_alone(ttt_type):
    """`forward_apart` (the runs of one length scanned as one batch) against `forward` on each run by itself, in
    float64 with random parameters, masked tokens, RoPE rows and runs of uneven lengths (two of 9 tokens, a short
    last mini-batch in each): outputs and every gradient. Each run alone is not the whole sequence read through."""
    module, x, mask, rope, generator = random_case(ttt_type, seed=3)
    runs = [slice(0, 10), slice(10, 19), slice(19, 28)]
    weights = torch.randn(2, 28, 24, generator=generator, dtype=torch.float64)

    def outputs_and_gradients(read):
        xi = x.clone().requires_grad_(True)
        out = read(xi)
        grads = torch.autograd.grad((out * weights).sum(), [xi, *module.parameters()])
        return out.detach(), grads

    def alone(xi: torch.Tensor) -> torch.Tensor:
        return torch.cat([module(xi[:, run], mask[:, run], (rope[0][run], rope[1][run])) for run in runs], dim=1)

    got, got_grads = outputs_and_gradients(lambda xi: module.forward_apart(xi, runs, mask, rope))
    expected, expected_grads = outputs_and_gradients(alone)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for name, g, e in zip(["x", *(n for n, _ in module.named_parameters())], got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=name)
    with torch.no_grad():
        assert (module(x, mask, rope)[:, 10:] - got[:, 10:]).abs().max() > 1e-3


def test_runs_that_do_not_tile_the_sequence_are_refused():
    """A gap, an overlap or a short last run would leave tokens unwritten (forward_apart fills an empty tensor)."""
    module, x, mask, rope, _ = random_case("linear", seed=3)
    for runs in ([slice(0, 10), slice(12, 28)], [slice(0, 10), slice(8, 28)], [slice(0, 10), slice(10, 20)]):
        with pytest.raises(AssertionError, match=r"runs must tile \[0, 28\) in order"):
            module.forward_apart(x, runs, mask, rope)
