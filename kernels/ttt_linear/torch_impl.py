"""TTT-Linear, torch backend: batched matmuls over (batch, head), a scan over mini-batches, a hand-written
backward and activation checkpointing (kernels/torch_scan.py). Runs on any device torch supports.

Design: docs/design.md, "The TTT op contract".
"""

from __future__ import annotations

import torch

from ..torch_scan import InnerLossGrad, State, Workspace, ln_forward, readout_backward, run_scan


class LinearStep:
    """One scan step of TTT-Linear (see torch_scan.InnerStep). State: w (N, D, D), b (N, 1, D)."""

    def forward(self, state: State, x, nq, target, eta, lnw, lnb, ws: Workspace, save: bool):
        w, b = state
        N, R, D = x.shape
        x_hat, rstd = ln_forward(torch.baddbmm(b, x, w, out=ws("x_hat", (N, R, D), x)))
        y = torch.addcmul(lnb, x_hat, lnw, out=ws("y", (N, R, D), x))
        saved = [x, nq, w, x_hat, rstd, lnw, None] if save else None
        if target is None:
            return y[:, :nq], state, saved
        loss = InnerLossGrad(x_hat[:, nq:], rstd[:, nq:], y[:, nq:], target, eta, lnw, ws)
        x_k = x[:, nq:]
        if not save:
            # no backward will look at this step's state: update in place
            w.baddbmm_(x_k.transpose(1, 2), loss.dz, alpha=-1)
            b.sub_(loss.dz.sum(1, keepdim=True))
            return y[:, :nq], state, None
        saved[-1] = loss
        new = (torch.baddbmm(w, x_k.transpose(1, 2), loss.dz, alpha=-1, out=ws("w", w.shape, w)),
               torch.sub(b, loss.dz.sum(1, keepdim=True), out=ws("b", b.shape, b)))
        return y[:, :nq], new, saved

    def backward(self, saved, g_yq, g_state: State, ws: Workspace):
        x, nq, w, x_hat, rstd, lnw, loss = saved
        g_w, g_b = g_state
        N, R, D = x.shape
        g_z = ws("g_z", (N, R, D), x)
        g_lnw, g_lnb = readout_backward(g_yq, x_hat, rstd, lnw, g_z, tmp=ws("tmp", (N, R, D), x))
        g_eta = g_target = None
        if loss is not None:
            x_k = x[:, nq:]
            # the new state is W - dW with dW = k^T dz, db = sum dz: dW's cotangent is minus the new state's
            g_dz = torch.baddbmm(g_b, x_k, g_w, beta=-1, alpha=-1, out=ws("g_dz", (N, R - nq, D), x))
            g_target, g_eta, g_w_ln, g_b_ln = loss.backward(g_dz, g_z[:, nq:], ws)
            g_lnw += g_w_ln
            g_lnb += g_b_ln
        g_x = torch.bmm(g_z, w.transpose(1, 2), out=ws("g_x", (N, R, D), x))
        if loss is not None:
            # (a batched matmul into a row slice falls back to one matmul per batch entry: go through scratch)
            g_x[:, nq:].sub_(torch.bmm(loss.dz, g_w.transpose(1, 2), out=ws("tmp_d", (N, R - nq, D), x)))
        g_w.baddbmm_(x.transpose(1, 2), g_z)
        g_b += g_z.sum(1, keepdim=True)
        return g_x, g_target, g_eta, g_lnw, g_lnb


def ttt_linear_torch(q, k, v, eta, w, b, ln_weight, ln_bias, *, mini_batch_size=16, initial_state=None,
                     return_state=False, checkpoint_group=4):
    """TTT-Linear with the torch backend; the arguments and results are those of `kernels.ttt_linear`.

    q, k, v: (B, H, L, D); eta: (B, H, L); w (H, D, D), b (H, D), each optionally with a leading B;
    ln_weight, ln_bias (H, D); initial_state, if given, replaces (w, b) (leading B).
    Returns out (B, H, L, D) in q's dtype and, with return_state, the final (w, b) (leading B, float32, or
    float64 for float64 inputs).
    """
    state = tuple(initial_state) if initial_state is not None else (w, b)
    return run_scan(LinearStep(), q, k, v, eta, state, (3, 2), ln_weight, ln_bias, mini_batch_size,
                    checkpoint_group, return_state)
