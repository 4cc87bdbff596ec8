"""The torch backend's shared machinery: the mini-batch scan with activation checkpointing, and the LayerNorm
maths of the inner loss (forward, backward and the backward of that backward).

Every tensor here is flattened over (batch, head) into N = B * H, so one batched matmul serves all heads.
Step s of the scan reads the rows [q of mini-batch s-1; k of mini-batch s]: both use the same state W_{s-1}
(the read-out of mini-batch s-1 and the inner gradient of mini-batch s), so one matmul over 2m rows does both.
Design: shared/DESIGN.md, "The TTT op contract".
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from .common import LN_EPS, check_qkv_eta, compute_dtype, expand_state

State = tuple[torch.Tensor, ...]


def ln_forward(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim without affine. z: (N, R, D) -> x_hat (N, R, D), rstd (N, R, 1)."""
    mean = z.mean(-1, keepdim=True)
    centred = z - mean
    rstd = centred.square().mean(-1, keepdim=True).add_(LN_EPS).rsqrt_()
    return centred.mul_(rstd), rstd


def ln_backward(g: torch.Tensor, x_hat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Gradient through x_hat = LN(z) (no affine): rstd * (g - mean(g) - x_hat * mean(g * x_hat)). (N, R, D)."""
    proj = (g * x_hat).mean(-1, keepdim=True)
    return (g - g.mean(-1, keepdim=True)).sub_(x_hat * proj).mul_(rstd)


class InnerLossGrad:
    """The inner loss's gradient at the LN output, for the k rows of one mini-batch, and its backward.

    Forward: y = x_hat * lnw + lnb, dy = eta * (y - target), dz = LN-backward(dy * lnw) (the gradient that the
    inner model's last layer receives). `backward` differentiates dz (given its cotangent) with respect to
    x_hat's pre-norm input, target, eta, lnw and lnb. Shapes: (N, M, D); eta (N, M, 1); rstd (N, M, 1).
    """

    def __init__(self, x_hat: torch.Tensor, rstd: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                 eta: torch.Tensor, lnw: torch.Tensor):
        self.x_hat, self.rstd, self.eta, self.lnw = x_hat, rstd, eta, lnw
        self.err = y - target
        self.dy = self.err * eta
        self.dxh = self.dy * lnw
        self.dz = ln_backward(self.dxh, x_hat, rstd)

    def backward(self, g_dz: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """g_dz (N, M, D) -> (g_z, g_target, g_eta (N, M, 1), g_lnw (N, D), g_lnb (N, D))."""
        x_hat, rstd = self.x_hat, self.rstd
        g_dxh = ln_backward(g_dz, x_hat, rstd)
        g_dy = g_dxh * self.lnw
        g_eta = (g_dy * self.err).sum(-1, keepdim=True)
        g_y = g_dy.mul_(self.eta)
        # dz depends on x_hat (through the mean(dxh * x_hat) term) and on rstd, besides through y
        c = (self.dxh * x_hat).mean(-1, keepdim=True)
        e = (g_dz * x_hat).mean(-1, keepdim=True)
        g_xhat = g_y * self.lnw - rstd * (g_dz * c + self.dxh * e)
        g_z = ln_backward(g_xhat, x_hat, rstd).sub_(x_hat * (rstd * (g_dz * self.dz).mean(-1, keepdim=True)))
        g_lnw = (g_dxh * self.dy).sum(1) + (g_y * x_hat).sum(1)
        return g_z, g_y.neg(), g_eta, g_lnw, g_y.sum(1)


class InnerStep(Protocol):
    """One scan step of an inner model (what differs between TTT-MLP and TTT-Linear).

    forward(state, x, nq, target, eta, lnw, lnb, save): x (N, R, D) holds nq read-out rows then R - nq
    gradient rows (target (N, R - nq, D), eta (N, R - nq, 1)); returns (y_q (N, nq, D) = LN(f_W(q)) with
    affine, the updated state, and what backward needs when save is set, else None). The state passed in
    may be updated in place when save is unset.
    backward(saved, g_yq, g_state) -> (g_state_before, g_x (N, R, D), g_target, g_eta, g_lnw (N, D), g_lnb (N, D)).
    """

    def forward(self, state: State, x: torch.Tensor, nq: int, target: torch.Tensor | None,
                eta: torch.Tensor | None, lnw: torch.Tensor, lnb: torch.Tensor, save: bool): ...

    def backward(self, saved, g_yq: torch.Tensor | None, g_state: State): ...


def _layout(q, k, v, eta, m: int):
    """(N, L, D) inputs -> pairs (N, T+1, 2m, D) with [q_{s-1}; k_s] in step s, targets (N, T, m, D) = v - k and
    eta (N, T, m, 1), zero-padded to T = ceil(L / m) mini-batches (padding has eta 0, so it never updates)."""
    N, L, D = q.shape
    T = math.ceil(L / m)
    pad = T * m - L
    if pad:
        q, k, v, eta = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v, eta.unsqueeze(-1)))
        eta = eta.squeeze(-1)
    pairs = q.new_zeros(N, T + 1, 2 * m, D)
    pairs[:, 1:, :m] = q.view(N, T, m, D)
    pairs[:, :T, m:] = k.view(N, T, m, D)
    return pairs, (v - k).view(N, T, m, D), eta.view(N, T, m, 1)


def _step_inputs(pairs, targets, etas, s: int, m: int):
    """Rows, read-out count, target and eta of step s (step 0 has no read-out, step T no gradient rows)."""
    T = targets.shape[1]
    lo, hi = (m if s == 0 else 0), (m if s == T else 2 * m)
    target, eta = (targets[:, s], etas[:, s]) if s < T else (None, None)
    return pairs[:, s, lo:hi], m - lo, target, eta


def _per_row(p: torch.Tensor, N: int) -> torch.Tensor:
    """A per-head (H, D) LayerNorm parameter as (N, 1, D) for N = B * H rows ordered (batch, head)."""
    H, D = p.shape
    return p.expand(N // H, H, D).reshape(N, 1, D)


class CheckpointedScan(torch.autograd.Function):
    """The whole sequence as one autograd node: a no-grad scan forward that keeps only the state at the start
    of every group of G steps; backward recomputes one group at a time and runs the steps' hand-written
    backward in reverse, so saved memory grows with L / (m * G) states, not with L."""

    @staticmethod
    def forward(ctx, step: InnerStep, m: int, group: int, q, k, v, eta, lnw, lnb, *state):
        N, L, D = q.shape
        pairs, targets, etas = _layout(q, k, v, eta, m)
        T = targets.shape[1]
        n_groups = math.ceil((T + 1) / group)
        starts = tuple(torch.empty(n_groups, *s.shape, dtype=s.dtype, device=s.device) for s in state)
        out = torch.empty(N, T, m, D, dtype=q.dtype, device=q.device)
        state = tuple(s.clone() for s in state)
        lnw_n, lnb_n = _per_row(lnw, N), _per_row(lnb, N)
        for s in range(T + 1):
            if s % group == 0:
                for buf, t in zip(starts, state):
                    buf[s // group].copy_(t)
            x, nq, target, eta_s = _step_inputs(pairs, targets, etas, s, m)
            y_q, state, _ = step.forward(state, x, nq, target, eta_s, lnw_n, lnb_n, save=False)
            if nq:
                torch.add(x[:, :nq], y_q, out=out[:, s - 1])
        ctx.step, ctx.m, ctx.group = step, m, group
        ctx.save_for_backward(q, k, v, eta, lnw, lnb, *starts)
        return (out.view(N, T * m, D), *state)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, *g_state):
        q, k, v, eta, lnw, lnb, *starts = ctx.saved_tensors
        step, m, group = ctx.step, ctx.m, ctx.group
        N, L, D = q.shape
        pairs, targets, etas = _layout(q, k, v, eta, m)
        T = targets.shape[1]
        g_out = g_out.reshape(N, T, m, D)
        g_pairs = torch.zeros_like(pairs)
        g_targets = torch.zeros_like(targets)
        g_etas = torch.zeros_like(etas)
        g_lnw = lnw.new_zeros(N, D)
        g_lnb = lnw.new_zeros(N, D)
        lnw_n, lnb_n = _per_row(lnw, N), _per_row(lnb, N)
        for first in reversed(range(0, T + 1, group)):
            state = tuple(buf[first // group] for buf in starts)
            saved = []
            for s in range(first, min(first + group, T + 1)):
                x, nq, target, eta_s = _step_inputs(pairs, targets, etas, s, m)
                _, state, sv = step.forward(state, x, nq, target, eta_s, lnw_n, lnb_n, save=True)
                saved.append(sv)
            for s in reversed(range(first, min(first + group, T + 1))):
                nq = 0 if s == 0 else m
                g_yq = g_out[:, s - 1] if nq else None
                g_state, g_x, g_t, g_e, g_w, g_b = step.backward(saved.pop(), g_yq, g_state)
                lo = m - nq
                g_pairs[:, s, lo:lo + g_x.shape[1]] = g_x
                if s < T:
                    g_targets[:, s] = g_t
                    g_etas[:, s] = g_e
                g_lnw += g_w
                g_lnb += g_b
        g_pairs[:, 1:, :m] += g_out
        g_q = g_pairs[:, 1:, :m].reshape(N, T * m, D)[:, :L]
        g_k = (g_pairs[:, :T, m:] - g_targets).reshape(N, T * m, D)[:, :L]
        g_v = g_targets.reshape(N, T * m, D)[:, :L]
        g_eta = g_etas.reshape(N, T * m)[:, :L]
        H = lnw.shape[0]
        g_lnw = g_lnw.view(-1, H, D).sum(0)
        g_lnb = g_lnb.view(-1, H, D).sum(0)
        return (None, None, None, g_q, g_k, g_v, g_eta, g_lnw, g_lnb, *g_state)


def run_scan(step: InnerStep, q, k, v, eta, state: State, state_dims: tuple[int, ...], ln_weight, ln_bias,
             mini_batch_size: int, checkpoint_group: int, return_state: bool):
    """Shared body of the torch backends: casts to the compute dtype, flattens (B, H) into N rows, runs the
    checkpointed scan and restores the public shapes. Shapes as in `kernels.ttt_mlp` / `kernels.ttt_linear`;
    state_dims: each state tensor's dim count without the batch dim (biases are carried as (N, 1, X))."""
    B, H, L, D = check_qkv_eta(q, k, v, eta)
    dt = compute_dtype(q)
    state = expand_state(state, B, state_dims, dt)
    N = B * H
    flat = [s.reshape(N, *s.shape[2:]) for s in state]
    flat = [s.unsqueeze(1) if nd == 2 else s for s, nd in zip(flat, state_dims)]
    out, *final = CheckpointedScan.apply(
        step, mini_batch_size, checkpoint_group, q.reshape(N, L, D).to(dt), k.reshape(N, L, D).to(dt),
        v.reshape(N, L, D).to(dt), eta.reshape(N, L).to(dt), ln_weight.to(dt), ln_bias.to(dt), *flat)
    out = out[:, :L].reshape(B, H, L, D).to(q.dtype)
    if not return_state:
        return out
    return out, tuple(s.reshape(B, *s_in.shape[1:]) for s, s_in in zip(final, state))
