"""Shared pieces of the TTT op backends: the per-head LayerNorm maths, the state's dtype and batch dim, and the
reference's inner step. Inputs are validated once, in kernels/dispatch.py; here they are only asserted.

Design: docs/design.md, "The TTT op contract".
"""

from __future__ import annotations

import torch

LN_EPS = 1e-6


def per_head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim with a per-head affine.

    x: (B, H, L, D); weight, bias: (H, D). Returns (B, H, L, D).
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    x_hat = (x - mean) * torch.rsqrt(var + LN_EPS)
    return x_hat * weight[None, :, None, :] + bias[None, :, None, :]


def qkv_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, H, L, D) of inputs that kernels/dispatch.py has validated; the backends only assert the contract."""
    assert q.dim() == 4 and k.shape == q.shape and v.shape == q.shape and eta.shape == q.shape[:3], \
        "TTT inputs reach a backend unchecked: call kernels.ttt_mlp / kernels.ttt_linear"
    return tuple(q.shape)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the state and the inner maths run in: float32 whatever the input, float64 kept (for tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand_state(tensors: tuple[torch.Tensor, ...], batch: int, shared_dims: tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Gives every state tensor a leading batch dim, in `dtype`.

    tensors[i] has either shared_dims[i] dims (shared by the batch) or one more (per-sample state).
    """
    out = []
    for t, nd in zip(tensors, shared_dims):
        assert t.dim() == nd or (t.dim() == nd + 1 and t.shape[0] == batch), (tuple(t.shape), nd, batch)
        if t.dim() == nd:
            t = t.unsqueeze(0).expand(batch, *t.shape)
        out.append(t.to(dtype))
    return tuple(out)


def inner_gradient_step(f, state: tuple[torch.Tensor, ...], k: torch.Tensor, target: torch.Tensor, eta: torch.Tensor,
                        ln_weight: torch.Tensor, ln_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One mini-batch of the contract: W_t = W_{t-1} - sum_i eta_i grad_W l_i(W_{t-1}), by autograd.

    f(x, *state) is the inner model; k, target: (B, H, M, D) with target = v - k; eta: (B, H, M).
    The step is built with create_graph when grad mode is on, so the result stays differentiable in
    every input (this is the reference, used by tests; fast backends never call it).
    """
    outer_grad = torch.is_grad_enabled()
    with torch.enable_grad():
        # without outer grad, tensors may be no-grad views of parameters: detach them to start a fresh graph
        leaves = [s if outer_grad and s.requires_grad else s.detach().requires_grad_(True) for s in state]
        pred = per_head_layer_norm(f(k, *leaves), ln_weight, ln_bias)
        # sum_i eta_i * l_i: its gradient is sum_i eta_i * grad l_i
        loss = (0.5 * eta.unsqueeze(-1) * (pred - target) ** 2).sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=outer_grad)
    return tuple(s - g for s, g in zip(state, grads))
