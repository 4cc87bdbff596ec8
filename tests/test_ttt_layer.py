"""The TTT layer (docs/design.md, "The TTT layer"): masking, RoPE, gradients, state carry."""

import pytest
import torch

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
