"""TTT-MLP, torch backend: batched matmuls over (batch, head), a scan over mini-batches, a hand-written backward
and activation checkpointing (kernels/torch_scan.py). Runs on any device torch supports.

Design: docs/design.md, "The TTT op contract".
"""

from __future__ import annotations

import functools
import math

import torch

from ..torch_scan import InnerLossGrad, State, Workspace, ln_forward, readout_backward, run_scan

# gelu_tanh(z) = z * sigmoid(u) with u = 2 sqrt(2/pi) (z + 0.044715 z^3), since 0.5 (1 + tanh(w)) = sigmoid(2w);
# torch's CPU sigmoid is several times faster than its tanh.
_C1 = 2 * math.sqrt(2 / math.pi)
_C3 = _C1 * 0.044715


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor, made once per dtype and device: lets addcmul compute c + a * b in one pass."""
    return _const_cached(value, like.dtype, like.device)


@functools.cache
def _const_cached(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def _gelu(z: torch.Tensor, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns gelu_tanh(z) and s = sigmoid(u(z)) (reused by the derivatives), both in `ws`."""
    sig = torch.addcmul(_const(_C1, z), z, z, value=_C3, out=ws("sig", z.shape, z)).mul_(z).sigmoid_()
    return torch.mul(z, sig, out=ws("x2", z.shape, z)), sig


def _gelu_grad(z: torch.Tensor, sig: torch.Tensor, gelu: torch.Tensor, out: torch.Tensor,
               tmp: torch.Tensor) -> torch.Tensor:
    """gelu_tanh'(z) = s + z s (1 - s) u'(z), with u' = C1 + 3 C3 z^2 and z s = gelu_tanh(z). Returns out."""
    du = torch.addcmul(_const(_C1, z), z, z, value=3 * _C3, out=tmp)
    return torch.sub(_const(1.0, z), sig, out=out).mul_(gelu).mul_(du).add_(sig)


def _gelu_grad2(z: torch.Tensor, sig: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """gelu_tanh''(z) = s (1 - s) (2 u' + z (1 - 2 s) u'^2 + 6 C3 z^2). Returns out."""
    du = torch.addcmul(_const(_C1, z), z, z, value=3 * _C3, out=tmp)
    torch.sub(_const(1.0, z), sig, alpha=2, out=out).mul_(z).mul_(du).add_(2).mul_(du).addcmul_(z, z, value=6 * _C3)
    return out.mul_(sig).addcmul_(out, sig, value=-1)  # * s (1 - s)


class MLPStep:
    """One scan step of TTT-MLP (see torch_scan.InnerStep). State: w1 (N, D, F), b1 (N, 1, F), w2 (N, F, D),
    b2 (N, 1, D)."""

    def forward(self, state: State, x, nq, target, eta, lnw, lnb, ws: Workspace, save: bool):
        w1, b1, w2, b2 = state
        N, R, D = x.shape
        F = w1.shape[-1]
        z1 = torch.baddbmm(b1, x, w1, out=ws("z1", (N, R, F), x))
        x2, sig = _gelu(z1, ws)
        x_hat, rstd = ln_forward(torch.baddbmm(b2, x2, w2, out=ws("x_hat", (N, R, D), x)))
        y = torch.addcmul(lnb, x_hat, lnw, out=ws("y", (N, R, D), x))
        # backward needs gelu' on every row; the update only on the gradient rows
        rows = slice(0, R) if save else slice(nq, R)
        gelu_grad = _gelu_grad(z1[:, rows], sig[:, rows], x2[:, rows], out=ws("gelu_grad", (N, R - rows.start, F), x),
                               tmp=ws("tmp", (N, R - rows.start, F), x))
        saved = [x, nq, state, x2, z1, sig, gelu_grad, x_hat, rstd, lnw, None] if save else None
        if target is None:
            return y[:, :nq], state, saved
        M = R - nq
        loss = InnerLossGrad(x_hat[:, nq:], rstd[:, nq:], y[:, nq:], target, eta, lnw, ws)
        dz2 = loss.dz  # (N, M, D): gradient of the eta-weighted inner loss at f's output
        x2_k, x_k = x2[:, nq:], x[:, nq:]
        dx2 = torch.bmm(dz2, w2.transpose(1, 2), out=ws("dx2", (N, M, F), x))
        if not save:
            dz1 = dx2.mul_(gelu_grad)
            # no backward will look at this step's state: update in place
            w2.baddbmm_(x2_k.transpose(1, 2), dz2, alpha=-1)
            b2.sub_(dz2.sum(1, keepdim=True))
            w1.baddbmm_(x_k.transpose(1, 2), dz1, alpha=-1)
            b1.sub_(dz1.sum(1, keepdim=True))
            return y[:, :nq], state, None
        dz1 = torch.mul(dx2, gelu_grad[:, nq:], out=ws("dz1", (N, M, F), x))
        saved[-1] = (loss, dx2, dz1)
        new = (torch.baddbmm(w1, x_k.transpose(1, 2), dz1, alpha=-1, out=ws("w1", w1.shape, w1)),
               torch.sub(b1, dz1.sum(1, keepdim=True), out=ws("b1", b1.shape, b1)),
               torch.baddbmm(w2, x2_k.transpose(1, 2), dz2, alpha=-1, out=ws("w2", w2.shape, w2)),
               torch.sub(b2, dz2.sum(1, keepdim=True), out=ws("b2", b2.shape, b2)))
        return y[:, :nq], new, saved

    def backward(self, saved, g_yq, g_state: State, ws: Workspace):
        x, nq, (w1, b1, w2, b2), x2, z1, sig, gelu_grad, x_hat, rstd, lnw, k_part = saved
        g_w1, g_b1, g_w2, g_b2 = g_state
        N, R, D = x.shape
        F = w1.shape[-1]
        M = R - nq
        g_z2 = ws("g_z2", (N, R, D), x)
        g_lnw, g_lnb = readout_backward(g_yq, x_hat, rstd, lnw, g_z2, tmp=ws("tmp", (N, R, D), x))
        g_eta = g_target = None
        if k_part is not None:
            loss, dx2, dz1 = k_part
            x_k, x2_k = x[:, nq:], x2[:, nq:]
            # the new state is W - dW: the cotangent of each update dW is minus the new state's
            # dW1 = k^T dz1, db1 = sum dz1
            g_dz1 = torch.baddbmm(g_b1, x_k, g_w1, beta=-1, alpha=-1, out=ws("g_dz1", (N, M, F), x))
            g_dx2 = torch.mul(g_dz1, gelu_grad[:, nq:], out=ws("g_dx2", (N, M, F), x))
            g_z1_k = g_dz1.mul_(dx2).mul_(_gelu_grad2(z1[:, nq:], sig[:, nq:], out=ws("gelu_grad2", (N, M, F), x),
                                                      tmp=ws("tmp_f", (N, M, F), x)))
            # dW2 = x2^T dz2, db2 = sum dz2, dx2 = dz2 W2^T
            g_dz2 = torch.baddbmm(g_b2, x2_k, g_w2, beta=-1, alpha=-1, out=ws("g_dz2", (N, M, D), x))
            g_dz2.baddbmm_(g_dx2, w2)
            g_target, g_eta, g_w, g_b = loss.backward(g_dz2, g_z2[:, nq:], ws)
            g_lnw += g_w
            g_lnb += g_b
        g_x2 = torch.bmm(g_z2, w2.transpose(1, 2), out=ws("g_x2", (N, R, F), x))
        if k_part is not None:
            # (a batched matmul into a row slice falls back to one matmul per batch entry: go through scratch)
            g_x2[:, nq:].sub_(torch.bmm(loss.dz, g_w2.transpose(1, 2), out=ws("tmp_f", (N, M, F), x)))
            g_w2.baddbmm_(g_dx2.transpose(1, 2), loss.dz)
        g_w2.baddbmm_(x2.transpose(1, 2), g_z2)
        g_b2 += g_z2.sum(1, keepdim=True)
        g_z1 = g_x2.mul_(gelu_grad)
        if k_part is not None:
            g_z1[:, nq:] += g_z1_k
        g_x = torch.bmm(g_z1, w1.transpose(1, 2), out=ws("g_x", (N, R, D), x))
        if k_part is not None:
            g_x[:, nq:].sub_(torch.bmm(dz1, g_w1.transpose(1, 2), out=ws("tmp_d", (N, M, D), x)))
        g_w1.baddbmm_(x.transpose(1, 2), g_z1)
        g_b1 += g_z1.sum(1, keepdim=True)
        return g_x, g_target, g_eta, g_lnw, g_lnb


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
