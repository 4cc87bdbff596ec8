"""The torch backend's shared machinery: the mini-batch scan with activation checkpointing, and the LayerNorm
maths of the inner loss (forward, backward and the backward of that backward).

Every tensor here is flattened over (batch, head) into N = B * H, so one batched matmul serves all heads.
Step s of the scan reads the rows [q of mini-batch s-1; k of mini-batch s]: both use the same state W_{s-1}
(the read-out of mini-batch s-1 and the inner gradient of mini-batch s), so one matmul over 2m rows does both.
The steps write into preallocated scratch tensors (`Workspace`): a fresh allocation of this size costs page
faults on every step, which measured as much as the arithmetic on CPU.
Design: shared/DESIGN.md, "The TTT op contract".
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from .common import LN_EPS, check_qkv_eta, compute_dtype, expand_state

State = tuple[torch.Tensor, ...]


class Workspace:
    """Named scratch tensors, allocated on first use and reused by every later step."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape:
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf


def ln_forward(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim without affine, in place. z: (N, R, D) -> x_hat (z itself), rstd (N, R, 1)."""
    z.sub_(z.mean(-1, keepdim=True))
    rstd = torch.linalg.vector_norm(z, dim=-1, keepdim=True).square_().div_(z.shape[-1]).add_(LN_EPS).rsqrt_()
    return z.mul_(rstd), rstd


def ln_backward(g: torch.Tensor, x_hat: torch.Tensor, rstd: torch.Tensor, out: torch.Tensor,
                tmp: torch.Tensor) -> torch.Tensor:
    """Gradient through x_hat = LN(z) without affine: rstd * (g - mean(g) - x_hat * mean(g * x_hat)).

    g, x_hat, out (may be g), tmp (scratch): (N, R, D); rstd (N, R, 1). Returns out.
    """
    proj = torch.mul(g, x_hat, out=tmp).mean(-1, keepdim=True)
    return torch.sub(g, g.mean(-1, keepdim=True), out=out).addcmul_(x_hat, proj, value=-1).mul_(rstd)


class InnerLossGrad:
    """The inner loss's gradient at the LN output, for the gradient rows of one step, and its backward.

    Forward: y = x_hat * lnw + lnb, dy = eta * (y - target), dz = LN-backward(dy * lnw): the gradient that the
    inner model's output receives. `backward` differentiates dz (given its cotangent) with respect to the
    pre-norm input, target, eta, lnw and lnb. Shapes: (N, M, D); eta, rstd (N, M, 1); lnw (N, 1, D).
    """

    def __init__(self, x_hat, rstd, y, target, eta, lnw, ws: Workspace):
        shape = x_hat.shape
        self.x_hat, self.rstd, self.eta, self.lnw = x_hat, rstd, eta, lnw
        self.err = torch.sub(y, target, out=ws("loss.err", shape, y))
        self.dy = torch.mul(self.err, eta, out=ws("loss.dy", shape, y))
        self.dxh = torch.mul(self.dy, lnw, out=ws("loss.dxh", shape, y))
        self.dz = ln_backward(self.dxh, x_hat, rstd, out=ws("loss.dz", shape, y), tmp=ws("loss.tmp", shape, y))

    def backward(self, g_dz: torch.Tensor, g_z: torch.Tensor, ws: Workspace) -> tuple[torch.Tensor, ...]:
        """g_dz (N, M, D); writes g_z (N, M, D); returns (g_target (N, M, D), g_eta (N, M, 1), g_lnw (N, D),
        g_lnb (N, D)), the first in `ws` scratch."""
        x_hat, rstd, shape = self.x_hat, self.rstd, g_dz.shape
        tmp = ws("loss.tmp", shape, g_dz)
        g_dy = ln_backward(g_dz, x_hat, rstd, out=ws("loss.g_dy", shape, g_dz), tmp=tmp)  # the dxh cotangent...
        g_lnw = torch.mul(g_dy, self.dy, out=tmp).sum(1)
        g_dy.mul_(self.lnw)  # ...made dy's
        g_eta = torch.mul(g_dy, self.err, out=tmp).sum(-1, keepdim=True)
        g_y = g_dy.mul_(self.eta)
        # dz depends on x_hat (through mean(dxh * x_hat)) and on rstd, besides through y
        c = torch.mul(self.dxh, x_hat, out=tmp).mean(-1, keepdim=True)
        e = torch.mul(g_dz, x_hat, out=tmp).mean(-1, keepdim=True)
        r = torch.mul(g_dz, self.dz, out=tmp).mean(-1, keepdim=True).mul_(rstd)
        g_xhat = torch.mul(g_dz, c, out=g_z).addcmul_(self.dxh, e).mul_(rstd).neg_().addcmul_(g_y, self.lnw)
        ln_backward(g_xhat, x_hat, rstd, out=g_z, tmp=tmp).addcmul_(x_hat, r, value=-1)
        g_lnw += torch.mul(g_y, x_hat, out=tmp).sum(1)
        return torch.neg(g_y, out=ws("loss.g_target", shape, g_dz)), g_eta, g_lnw, g_y.sum(1)


class InnerStep(Protocol):
    """One scan step of an inner model (what differs between TTT-MLP and TTT-Linear).

    forward(state, x, nq, target, eta, lnw, lnb, ws, save): x (N, R, D) holds nq read-out rows then R - nq
    gradient rows (target (N, R - nq, D), eta (N, R - nq, 1), both None when R == nq); lnw, lnb (N, 1, D).
    Returns (y_q (N, nq, D) = LN(f_W(q)) with affine, the updated state, what backward needs or None).
    Without save the state is updated in place; with save, the new state and everything saved live in `ws`,
    so each step kept for backward needs its own workspace.
    backward(saved, g_yq, g_state, ws): adds the step's contribution to the state cotangent g_state in place
    (on entry that of the state after the step, on return that of the state before it) and returns
    (g_x (N, R, D), g_target, g_eta, g_lnw (N, D), g_lnb (N, D)), the tensors possibly in `ws`.
    """

    def forward(self, state: State, x: torch.Tensor, nq: int, target: torch.Tensor | None,
                eta: torch.Tensor | None, lnw: torch.Tensor, lnb: torch.Tensor, ws: Workspace, save: bool): ...

    def backward(self, saved, g_yq: torch.Tensor | None, g_state: State, ws: Workspace): ...


def _layout(q, k, v, eta, m: int):
    """(N, L, D) inputs -> pairs (N, T+1, 2m, D) with [q_{s-1}; k_s] in step s, k and v as (N, T, m, D) and eta
    as (N, T, m, 1), zero-padded to T = ceil(L / m) mini-batches (padding has eta 0, so it never updates)."""
    N, L, D = q.shape
    T = math.ceil(L / m)
    pad = T * m - L
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        eta = torch.nn.functional.pad(eta, (0, pad))
    # the first half of step 0 and the second half of step T are never read
    pairs = torch.empty(N, T + 1, 2 * m, D, dtype=q.dtype, device=q.device)
    pairs[:, 1:, :m] = q.view(N, T, m, D)
    pairs[:, :T, m:] = k.view(N, T, m, D)
    return pairs, k.view(N, T, m, D), v.view(N, T, m, D), eta.view(N, T, m, 1)


def _step_inputs(pairs, k, v, etas, s: int, m: int, ws: Workspace):
    """Rows, read-out count, target v - k (in `ws`) and eta of step s (step 0 has no read-out, step T no
    gradient rows)."""
    T = k.shape[1]
    lo, hi = (m if s == 0 else 0), (m if s == T else 2 * m)
    target, eta = None, None
    if s < T:
        target, eta = torch.sub(v[:, s], k[:, s], out=ws("target", k[:, s].shape, k)), etas[:, s]
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
        pairs, k_mb, v_mb, etas = _layout(q, k, v, eta, m)
        T = k_mb.shape[1]
        n_groups = math.ceil((T + 1) / group)
        starts = tuple(torch.empty(n_groups, *s.shape, dtype=s.dtype, device=s.device) for s in state)
        out = torch.empty(N, T, m, D, dtype=q.dtype, device=q.device)
        state = tuple(s.clone() for s in state)
        lnw_n, lnb_n = _per_row(lnw, N), _per_row(lnb, N)
        ws = Workspace()
        for s in range(T + 1):
            if s % group == 0:
                for buf, t in zip(starts, state):
                    buf[s // group].copy_(t)
            x, nq, target, eta_s = _step_inputs(pairs, k_mb, v_mb, etas, s, m, ws)
            y_q, state, _ = step.forward(state, x, nq, target, eta_s, lnw_n, lnb_n, ws, save=False)
            if nq:
                torch.add(x[:, :nq], y_q, out=out[:, s - 1])
        ctx.step, ctx.m, ctx.group = step, m, group
        ctx.save_for_backward(q, k, v, eta, lnw, lnb, *starts)
        return (out.view(N, T * m, D), *state)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, *g_final):
        q, k, v, eta, lnw, lnb, *starts = ctx.saved_tensors
        step, m, group = ctx.step, ctx.m, ctx.group
        N, L, D = q.shape
        pairs, k_mb, v_mb, etas = _layout(q, k, v, eta, m)
        T = k_mb.shape[1]
        g_out = g_out.reshape(N, T, m, D)
        # every slot that is read back below is written by exactly one step
        g_pairs = torch.empty_like(pairs)
        g_targets = torch.empty_like(k_mb)
        g_etas = torch.empty_like(etas)
        g_lnw = lnw.new_zeros(N, D)
        g_lnb = lnw.new_zeros(N, D)
        lnw_n, lnb_n = _per_row(lnw, N), _per_row(lnb, N)
        g_state = tuple(g.clone(memory_format=torch.contiguous_format) for g in g_final)
        step_ws = [Workspace() for _ in range(min(group, T + 1))]
        back_ws = Workspace()
        for first in reversed(range(0, T + 1, group)):
            steps = range(first, min(first + group, T + 1))
            state = tuple(buf[first // group] for buf in starts)
            saved = []
            for s, ws in zip(steps, step_ws):
                x, nq, target, eta_s = _step_inputs(pairs, k_mb, v_mb, etas, s, m, back_ws)
                _, state, sv = step.forward(state, x, nq, target, eta_s, lnw_n, lnb_n, ws, save=True)
                saved.append(sv)
            for s in reversed(steps):
                nq = 0 if s == 0 else m
                g_x, g_t, g_e, g_w, g_b = step.backward(saved.pop(), g_out[:, s - 1] if nq else None, g_state,
                                                        back_ws)
                g_pairs[:, s, m - nq:m - nq + g_x.shape[1]] = g_x
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
        return (None, None, None, g_q, g_k, g_v, g_eta, g_lnw.view(-1, H, D).sum(0), g_lnb.view(-1, H, D).sum(0),
                *g_state)


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
