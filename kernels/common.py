"""Shared pieces of the TTT op: validation of the contract's shapes and the per-head LayerNorm maths.

Design: shared/DESIGN.md, "The TTT op contract".
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


def check_qkv_eta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor) -> tuple[int, int, int, int]:
    """Checks q, k, v (B, H, L, D) and eta (B, H, L); returns (B, H, L, D)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if eta.shape != q.shape[:3]:
        raise ValueError(f"eta must be (B, H, L) = {tuple(q.shape[:3])}, got {tuple(eta.shape)}")
    return tuple(q.shape)


def check_state(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], shapes: tuple[tuple[int, ...], ...],
                batch: int, per_sample_only: bool = False) -> None:
    """Checks that tensors[i] has shape shapes[i] (shared by the batch) or (batch, *shapes[i]) (per sample)."""
    if len(tensors) != len(names):
        raise ValueError(f"expected {len(names)} state tensors ({', '.join(names)}), got {len(tensors)}")
    for name, t, shape in zip(names, tensors, shapes):
        per_sample = (batch, *shape)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape {per_sample}, got {type(t).__name__}")
        if tuple(t.shape) == per_sample or (tuple(t.shape) == shape and not per_sample_only):
            continue
        want = str(per_sample) if per_sample_only else f"{shape} or {per_sample}"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


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
        if t.dim() == nd:
            t = t.unsqueeze(0).expand(batch, *t.shape)
        elif t.dim() != nd + 1 or t.shape[0] != batch:
            raise ValueError(f"state tensor of shape {tuple(t.shape)}: expected {nd} dims, "
                             f"or {nd + 1} with batch {batch}")
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
