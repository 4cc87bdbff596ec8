"""TTT-MLP, torch backend: batched matmuls over (batch, head), a scan over mini-batches, a hand-written backward
and activation checkpointing (kernels/torch_scan.py). Runs on any device torch supports.

Design: shared/DESIGN.md, "The TTT op contract".
"""

from __future__ import annotations

import math

import torch

from ..torch_scan import InnerLossGrad, State, ln_backward, ln_forward, run_scan

# gelu_tanh(z) = z * sigmoid(u) with u = 2 sqrt(2/pi) (z + 0.044715 z^3), since 0.5 (1 + tanh(w)) = sigmoid(2w);
# torch's CPU sigmoid is several times faster than its tanh.
_C1 = 2 * math.sqrt(2 / math.pi)
_C3 = _C1 * 0.044715


def _gelu(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns gelu_tanh(z), sigmoid(u) and z^2 (the last two are reused by the derivatives)."""
    z2 = z.square()
    sig = torch.sigmoid((z2 * _C3).add_(_C1).mul_(z))
    return z * sig, sig, z2


def _gelu_grad(z: torch.Tensor, sig: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """gelu_tanh'(z) = s + z s (1 - s) u'(z), with u' = C1 + 3 C3 z^2."""
    du = (z2 * (3 * _C3)).add_(_C1)
    return (sig * (1 - sig)).mul_(du).mul_(z).add_(sig)


def _gelu_grad2(z: torch.Tensor, sig: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """gelu_tanh''(z) = s (1 - s) (2 u' + z (1 - 2 s) u'^2 + 6 C3 z^2)."""
    du = (z2 * (3 * _C3)).add_(_C1)
    inner = (1 - 2 * sig).mul_(z).mul_(du).add_(2).mul_(du).add_(z2 * (6 * _C3))
    return (sig * (1 - sig)).mul_(inner)


class MLPStep:
    """One scan step of TTT-MLP (see torch_scan.InnerStep). State: w1 (N, D, F), b1 (N, 1, F), w2 (N, F, D),
    b2 (N, 1, D)."""

    def forward(self, state: State, x, nq, target, eta, lnw, lnb, save):
        w1, b1, w2, b2 = state
        z1 = torch.baddbmm(b1, x, w1)  # (N, R, F)
        x2, sig, z1sq = _gelu(z1)
        x_hat, rstd = ln_forward(torch.baddbmm(b2, x2, w2))  # (N, R, D)
        y = x_hat * lnw + lnb
        y_q = y[:, :nq]
        saved = [x, nq, state, x2, z1, sig, z1sq, x_hat, rstd, lnw, None]
        if target is None:
            return y_q, state, saved if save else None
        loss = InnerLossGrad(x_hat[:, nq:], rstd[:, nq:], y[:, nq:], target, eta, lnw)
        dz2 = loss.dz  # (N, M, D): gradient of the eta-weighted inner loss at f's output
        x2_k, x_k = x2[:, nq:], x[:, nq:]
        dx2 = torch.bmm(dz2, w2.transpose(1, 2))  # (N, M, F)
        dz1 = dx2 * _gelu_grad(z1[:, nq:], sig[:, nq:], z1sq[:, nq:])
        if save:
            saved[-1] = (loss, dx2, dz1)
            new = (torch.baddbmm(w1, x_k.transpose(1, 2), dz1, alpha=-1), b1 - dz1.sum(1, keepdim=True),
                   torch.baddbmm(w2, x2_k.transpose(1, 2), dz2, alpha=-1), b2 - dz2.sum(1, keepdim=True))
            return y_q, new, saved
        # no backward will look at this step's state: update in place
        w2.baddbmm_(x2_k.transpose(1, 2), dz2, alpha=-1)
        b2.sub_(dz2.sum(1, keepdim=True))
        w1.baddbmm_(x_k.transpose(1, 2), dz1, alpha=-1)
        b1.sub_(dz1.sum(1, keepdim=True))
        return y_q, state, None

    def backward(self, saved, g_yq, g_state: State):
        x, nq, (w1, b1, w2, b2), x2, z1, sig, z1sq, x_hat, rstd, lnw, k_part = saved
        g_w1, g_b1, g_w2, g_b2 = g_state
        N, R, D = x.shape
        g_z2 = torch.empty_like(x)
        g_lnw = x.new_zeros(N, D)
        g_lnb = x.new_zeros(N, D)
        g_eta = g_target = None
        if nq:
            g_lnw += (g_yq * x_hat[:, :nq]).sum(1)
            g_lnb += g_yq.sum(1)
            g_z2[:, :nq] = ln_backward(g_yq * lnw, x_hat[:, :nq], rstd[:, :nq])
        if k_part is not None:
            loss, dx2, dz1 = k_part
            x_k, x2_k, z1_k = x[:, nq:], x2[:, nq:], z1[:, nq:]
            # the new state is W - dW: the cotangent of each update dW is minus the new state's
            a_w1, a_b1, a_w2, a_b2 = (-g for g in g_state)
            g_dz1 = torch.baddbmm(a_b1, x_k, a_w1)  # dW1 = k^T dz1, db1 = sum dz1
            g_xk = torch.bmm(dz1, a_w1.transpose(1, 2))
            g_dx2 = g_dz1 * _gelu_grad(z1_k, sig[:, nq:], z1sq[:, nq:])
            g_z1_k = g_dz1.mul_(dx2).mul_(_gelu_grad2(z1_k, sig[:, nq:], z1sq[:, nq:]))
            g_dz2 = torch.baddbmm(a_b2, x2_k, a_w2).baddbmm_(g_dx2, w2)  # dW2 = x2^T dz2, dx2 = dz2 W2^T
            g_w2 = torch.baddbmm(g_w2, g_dx2.transpose(1, 2), loss.dz)
            g_x2_k = torch.bmm(loss.dz, a_w2.transpose(1, 2))
            g_z2[:, nq:], g_target, g_eta, g_w, g_b = loss.backward(g_dz2)
            g_lnw += g_w
            g_lnb += g_b
        g_w2 = torch.baddbmm(g_w2, x2.transpose(1, 2), g_z2)
        g_b2 = g_b2 + g_z2.sum(1, keepdim=True)
        g_x2 = torch.bmm(g_z2, w2.transpose(1, 2))  # (N, R, F)
        if k_part is not None:
            g_x2[:, nq:] += g_x2_k
        g_z1 = g_x2.mul_(_gelu_grad(z1, sig, z1sq))
        if k_part is not None:
            g_z1[:, nq:] += g_z1_k
        g_w1 = torch.baddbmm(g_w1, x.transpose(1, 2), g_z1)
        g_b1 = g_b1 + g_z1.sum(1, keepdim=True)
        g_x = torch.bmm(g_z1, w1.transpose(1, 2))  # (N, R, D)
        if k_part is not None:
            g_x[:, nq:] += g_xk
        return (g_w1, g_b1, g_w2, g_b2), g_x, g_target, g_eta, g_lnw, g_lnb


def ttt_mlp_torch(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias, *, mini_batch_size=64, initial_state=None,
                  return_state=False, checkpoint_group=4):
    """TTT-MLP with the torch backend; the arguments and results are those of `kernels.ttt_mlp`.

    q, k, v: (B, H, L, D); eta: (B, H, L); w1 (H, D, F), b1 (H, F), w2 (H, F, D), b2 (H, D), each optionally with
    a leading B; ln_weight, ln_bias (H, D); initial_state, if given, replaces (w1, b1, w2, b2) (leading B).
    Returns out (B, H, L, D) in q's dtype and, with return_state, the final (w1, b1, w2, b2) (leading B, float32,
    or float64 for float64 inputs).
    """
    state = tuple(initial_state) if initial_state is not None else (w1, b1, w2, b2)
    return run_scan(MLPStep(), q, k, v, eta, state, (3, 2, 3, 2), ln_weight, ln_bias, mini_batch_size,
                    checkpoint_group, return_state)
