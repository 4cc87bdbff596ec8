"""The torch backend's shared machinery: the mini-batch scan with activation checkpointing, and the LayerNorm
maths of the inner loss (forward, backward and the backward of that backward).

Every tensor here is flattened over (batch, head) into N = B * H, so one batched matmul serves all heads.
Step s of the scan reads the rows [q of mini-batch s-1; k of mini-batch s]: both use the same state W_{s-1}
(the read-out of mini-batch s-1 and the inner gradient of mini-batch s), so one matmul over 2m rows does both.
The steps write into preallocated scratch tensors (`Workspace`): a fresh allocation of this size costs page
faults on every step, which measured as much as the arithmetic on CPU.
Design: docs/design.md, "The TTT op contract".
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from .common import LN_EPS, compute_dtype, expand_state, qkv_shape

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


def readout_backward(g_yq: torch.Tensor | None, x_hat: torch.Tensor, rstd: torch.Tensor, lnw: torch.Tensor,
                     g_z: torch.Tensor, tmp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of a step's read-out rows y_q = x_hat_q * lnw + lnb, x_hat_q = LN(z_q) without affine.

    g_yq (N, nq, D), or None for a step without read-out rows; x_hat, g_z, tmp (scratch): (N, R, D) and rstd
    (N, R, 1), whose first nq rows are the read-out's; lnw (N, 1, D). Writes z_q's cotangent into g_z[:, :nq] and
    returns the affine's (g_lnw, g_lnb), each (N, D) (zeros without read-out rows).
    """
    N, _, D = x_hat.shape
    if g_yq is None:
        return x_hat.new_zeros(N, D), x_hat.new_zeros(N, D)
    nq = g_yq.shape[1]
    g_lnw = torch.mul(g_yq, x_hat[:, :nq], out=tmp[:, :nq]).sum(1)
    g_zq = torch.mul(g_yq, lnw, out=g_z[:, :nq])
    ln_backward(g_zq, x_hat[:, :nq], rstd[:, :nq], out=g_zq, tmp=tmp[:, :nq])
    return g_lnw, g_yq.sum(1)


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


class _MiniBatches:
    """Step inputs read from the (N, L, X) sequences: step s has the rows [q of mini-batch s-1; k of mini-batch s],
    target v - k and eta of mini-batch s, copied into step-sized scratch and zero-padded past L (eta 0 there, so
    padding never updates). Step 0 has no read-out rows, step T = ceil(L / m) no gradient rows."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, m: int):
        self.q, self.k, self.v, self.eta, self.m = q, k, v, eta.unsqueeze(-1), m
        self.L = q.shape[1]
        self.T = math.ceil(self.L / m)

    def span(self, s: int) -> slice:
        """Token positions of mini-batch s."""
        return slice(s * self.m, min((s + 1) * self.m, self.L))

    def chunk(self, src: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
        """Mini-batch s of src (N, L, X) copied into out (N, m, X), zero past L. Returns out."""
        span = self.span(s)
        n = span.stop - span.start
        out[:, :n].copy_(src[:, span])
        if n < self.m:
            out[:, n:].zero_()
        return out

    def step(self, s: int, ws: Workspace):
        """(x (N, R, D), nq, target (N, m, D) or None, eta (N, m, 1) or None), all in `ws`."""
        m, q = self.m, self.q
        N, _, D = q.shape
        nq, nk = (0 if s == 0 else m), (0 if s == self.T else m)
        x = ws("x", (N, nq + nk, D), q)
        if nq:
            self.chunk(q, s - 1, x[:, :nq])
        if not nk:
            return x, nq, None, None
        k_s = self.chunk(self.k, s, x[:, nq:])
        target = self.chunk(self.v, s, ws("target", (N, m, D), q)).sub_(k_s)
        return x, nq, target, self.chunk(self.eta, s, ws("eta", (N, m, 1), q))


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
        # the state stays in the compute dtype even inside a caller's autocast region
        with torch.autocast(q.device.type, enabled=False):
            return CheckpointedScan._forward(ctx, step, m, group, q, k, v, eta, lnw, lnb, *state)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, *g_final):
        with torch.autocast(g_out.device.type, enabled=False):
            return CheckpointedScan._backward(ctx, g_out, *g_final)

    @staticmethod
    def _forward(ctx, step: InnerStep, m: int, group: int, q, k, v, eta, lnw, lnb, *state):
        N, L, D = q.shape
        seq = _MiniBatches(q, k, v, eta, m)
        n_groups = math.ceil((seq.T + 1) / group)
        starts = tuple(torch.empty(n_groups, *s.shape, dtype=s.dtype, device=s.device) for s in state)
        out = torch.empty(N, L, D, dtype=q.dtype, device=q.device)
        state = tuple(s.clone() for s in state)
        lnw_n, lnb_n = _per_row(lnw, N), _per_row(lnb, N)
        ws = Workspace()
        for s in range(seq.T + 1):
            if s % group == 0:
                for buf, t in zip(starts, state):
                    buf[s // group].copy_(t)
            x, nq, target, eta_s = seq.step(s, ws)
            y_q, state, _ = step.forward(state, x, nq, target, eta_s, lnw_n, lnb_n, ws, save=False)
            if nq:
                span = seq.span(s - 1)
                n = span.stop - span.start
                torch.add(x[:, :n], y_q[:, :n], out=out[:, span])
        ctx.step, ctx.m, ctx.group = step, m, group
        ctx.save_for_backward(q, k, v, eta, lnw, lnb, *starts)
        return (out, *state)

    @staticmethod
    def _backward(ctx, g_out, *g_final):
        q, k, v, eta, lnw, lnb, *starts = ctx.saved_tensors
        step, m, group = ctx.step, ctx.m, ctx.group
        N, L, D = q.shape
        seq = _MiniBatches(q, k, v, eta, m)
        T = seq.T
        # every position is written by exactly one step
        g_q, g_k, g_v, g_eta = (torch.empty_like(t) for t in (q, k, v, eta))
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
                x, nq, target, eta_s = seq.step(s, ws)
                _, state, sv = step.forward(state, x, nq, target, eta_s, lnw_n, lnb_n, ws, save=True)
                saved.append(sv)
            for s in reversed(steps):
                nq = 0 if s == 0 else m
                g_yq = seq.chunk(g_out, s - 1, back_ws("g_yq", (N, m, D), g_out)) if nq else None
                g_x, g_t, g_e, g_w, g_b = step.backward(saved.pop(), g_yq, g_state, back_ws)
                if nq:
                    span = seq.span(s - 1)
                    n = span.stop - span.start
                    torch.add(g_x[:, :n], g_yq[:, :n], out=g_q[:, span])
                if s < T:
                    span = seq.span(s)
                    n = span.stop - span.start
                    torch.sub(g_x[:, nq:nq + n], g_t[:, :n], out=g_k[:, span])
                    g_v[:, span] = g_t[:, :n]
                    g_eta[:, span] = g_e[:, :n, 0]
                g_lnw += g_w
                g_lnb += g_b
        H = lnw.shape[0]
        return (None, None, None, g_q, g_k, g_v, g_eta, g_lnw.view(-1, H, D).sum(0), g_lnb.view(-1, H, D).sum(0),
                *g_state)


def run_scan(step: InnerStep, q, k, v, eta, state: State, state_dims: tuple[int, ...], ln_weight, ln_bias,
             mini_batch_size: int, checkpoint_group: int, return_state: bool):
    """Shared body of the torch backends: casts to the compute dtype, flattens (B, H) into N rows, runs the
    checkpointed scan and restores the public shapes. Shapes as in `kernels.ttt_mlp` / `kernels.ttt_linear`;
    state_dims: each state tensor's dim count without the batch dim (biases are carried as (N, 1, X))."""
    B, H, L, D = qkv_shape(q, k, v, eta)
    dt = compute_dtype(q)
    state = expand_state(state, B, state_dims, dt)
    N = B * H
    flat = [s.reshape(N, *s.shape[2:]) for s in state]
    flat = [s.unsqueeze(1) if nd == 2 else s for s, nd in zip(flat, state_dims)]
    out, *final = CheckpointedScan.apply(
        step, mini_batch_size, checkpoint_group, q.reshape(N, L, D).to(dt), k.reshape(N, L, D).to(dt),
        v.reshape(N, L, D).to(dt), eta.reshape(N, L).to(dt), ln_weight.to(dt), ln_bias.to(dt), *flat)
    out = out.reshape(B, H, L, D).to(q.dtype)
    if not return_state:
        return out
    return out, tuple(s.reshape(B, *s_in.shape[1:]) for s, s_in in zip(final, state))
