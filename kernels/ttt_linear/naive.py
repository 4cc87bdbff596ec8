"""Plain-autograd reference of TTT-Linear: the spec that every fast backend is tested against.

Design: docs/design.md, "The TTT op contract".
"""

from __future__ import annotations

import torch

from ..common import compute_dtype, expand_state, inner_gradient_step, per_head_layer_norm, qkv_shape


def linear(x: torch.Tensor, w, b) -> torch.Tensor:
    """f(x) = x W + b. x: (B, H, M, D); w (B, H, D, D); b (B, H, D)."""
    return x @ w + b.unsqueeze(-2)


def ttt_linear_naive(q, k, v, eta, w, b, ln_weight, ln_bias, *, mini_batch_size=16, initial_state=None,
                     return_state=False):
    """Reference TTT-Linear.

    q, k, v: (B, H, L, D); eta: (B, H, L); w (H, D, D), b (H, D), each optionally with a leading B;
    ln_weight, ln_bias (H, D); initial_state, if given, replaces (w, b).
    Returns out (B, H, L, D) in q's dtype and, with return_state, the final (w, b) (leading B, fp32).
    """
    B, H, L, D = qkv_shape(q, k, v, eta)
    dt = compute_dtype(q)
    state = expand_state(tuple(initial_state) if initial_state is not None else (w, b), B, (3, 2), dt)
    qf, kf, vf, etaf = q.to(dt), k.to(dt), v.to(dt), eta.to(dt)
    lnw, lnb = ln_weight.to(dt), ln_bias.to(dt)
    outs = []
    for start in range(0, L, mini_batch_size):
        sl = slice(start, min(start + mini_batch_size, L))
        q_t, k_t = qf[:, :, sl], kf[:, :, sl]
        state = inner_gradient_step(linear, state, k_t, vf[:, :, sl] - k_t, etaf[:, :, sl], lnw, lnb)
        outs.append(q_t + per_head_layer_norm(linear(q_t, *state), lnw, lnb))
    out = torch.cat(outs, dim=2).to(q.dtype)
    return (out, state) if return_state else out
