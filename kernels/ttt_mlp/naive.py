"""Plain-autograd reference of TTT-MLP: the spec that every fast backend is tested against.

Each mini-batch takes one explicit gradient step, computed by autograd on the inner loss, then reads out
with the updated weights. Slow and memory-hungry on purpose: it states the maths, nothing else.
Design: docs/design.md, "The TTT op contract".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import compute_dtype, expand_state, inner_gradient_step, per_head_layer_norm, qkv_shape


def mlp(x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """f(x) = gelu_tanh(x W1 + b1) W2 + b2. x: (B, H, M, D); w1 (B, H, D, F); b1 (B, H, F); w2 (B, H, F, D)."""
    hidden = F.gelu(x @ w1 + b1.unsqueeze(-2), approximate="tanh")
    return hidden @ w2 + b2.unsqueeze(-2)


def ttt_mlp_naive(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias, *, mini_batch_size=64, initial_state=None,
                  return_state=False):
    """Reference TTT-MLP.

    q, k, v: (B, H, L, D); eta: (B, H, L); w1 (H, D, F), b1 (H, F), w2 (H, F, D), b2 (H, D), each optionally
    with a leading B; ln_weight, ln_bias (H, D); initial_state, if given, replaces (w1, b1, w2, b2).
    Returns out (B, H, L, D) in q's dtype and, with return_state, the final (w1, b1, w2, b2) (leading B, fp32).
    """
    B, H, L, D = qkv_shape(q, k, v, eta)
    dt = compute_dtype(q)
    state = expand_state(tuple(initial_state) if initial_state is not None else (w1, b1, w2, b2), B, (3, 2, 3, 2), dt)
    qf, kf, vf, etaf = q.to(dt), k.to(dt), v.to(dt), eta.to(dt)
    lnw, lnb = ln_weight.to(dt), ln_bias.to(dt)
    outs = []
    for start in range(0, L, mini_batch_size):
        sl = slice(start, min(start + mini_batch_size, L))
        q_t, k_t = qf[:, :, sl], kf[:, :, sl]
        state = inner_gradient_step(mlp, state, k_t, vf[:, :, sl] - k_t, etaf[:, :, sl], lnw, lnb)
        outs.append(q_t + per_head_layer_norm(mlp(q_t, *state), lnw, lnb))
    out = torch.cat(outs, dim=2).to(q.dtype)
    return (out, state) if return_state else out
