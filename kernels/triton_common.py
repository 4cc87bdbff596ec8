"""Pieces shared by the Triton TTT kernels: tile I/O, GELU, the LayerNorm + L2 inner-loss gradient and its
backward (device side), and the autograd plumbing (host side).

Design: docs/design.md, "The TTT op contract"; docs/kernels.md, "Triton kernels".

Device-side notation, for one (batch, head) and one mini-batch of M rows (rows past the sequence end are
loaded as zeros and carry eta = 0, so they contribute nothing):
    Z (M, D)  the inner model's output on the keys,  T = V - K (M, D) the target,  eta (M,)
    xh = (Z - mean(Z)) * r,  r = 1 / sqrt(var(Z) + eps)          per row, r (M, 1)
    E = gamma * xh + beta - T                                   (M, D), the LN output's residual
    dY = eta * E,  g = gamma * dY                               (M, D)
    dZ = (r / D) * (D g - sum(g) - xh * sum(g * xh))            (M, D)
dZ is the gradient of sum_i eta_i / 2 ||LN(Z_i) - T_i||^2 with respect to Z, from which every inner-weight
gradient follows by the chain rule. `loss_grad_backward` is the reverse-mode derivative of the map
(Z, T, eta, gamma, beta) -> dZ, given an upstream gradient C = dL/d(dZ); its maths is written there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import common
from .common import qkv_shape

# globals read inside @triton.jit functions must be constexpr
LN_EPS = tl.constexpr(common.LN_EPS)
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
GELU_C = tl.constexpr(0.044715)


@triton.jit
def load_rows(base, row0, L, M: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr):
    """Rows [row0, row0 + M) of a contiguous (L, D) matrix as (M, D) in ACC; rows >= L read as 0."""
    rows = row0 + tl.arange(0, M)
    cols = tl.arange(0, D)
    x = tl.load(base + rows[:, None] * D + cols[None, :], mask=(rows < L)[:, None], other=0.0)
    return x.to(ACC)


@triton.jit
def store_rows(base, row0, L, x, M: tl.constexpr, D: tl.constexpr):
    """Stores x (M, D) into rows [row0, row0 + M) of a contiguous (L, D) matrix, skipping rows >= L."""
    rows = row0 + tl.arange(0, M)
    cols = tl.arange(0, D)
    tl.store(base + rows[:, None] * D + cols[None, :], x.to(base.dtype.element_ty), mask=(rows < L)[:, None])


@triton.jit
def load_row_scalars(base, row0, L, M: tl.constexpr, ACC: tl.constexpr):
    """Entries [row0, row0 + M) of a length-L vector as (M,) in ACC; entries >= L read as 0."""
    rows = row0 + tl.arange(0, M)
    return tl.load(base + rows, mask=rows < L, other=0.0).to(ACC)


@triton.jit
def store_row_scalars(base, row0, L, x, M: tl.constexpr):
    rows = row0 + tl.arange(0, M)
    tl.store(base + rows, x.to(base.dtype.element_ty), mask=rows < L)


@triton.jit
def load_block(base, row0, col0, stride, R: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr):
    """Rows [row0, row0 + R) x columns [col0, col0 + C) of a row-major matrix with row stride `stride`."""
    r = row0 + tl.arange(0, R)
    c = col0 + tl.arange(0, C)
    return tl.load(base + r[:, None] * stride + c[None, :]).to(ACC)


@triton.jit
def store_block(base, row0, col0, stride, x, R: tl.constexpr, C: tl.constexpr):
    r = row0 + tl.arange(0, R)
    c = col0 + tl.arange(0, C)
    tl.store(base + r[:, None] * stride + c[None, :], x.to(base.dtype.element_ty))


@triton.jit
def load_vector(base, N: tl.constexpr, ACC: tl.constexpr):
    return tl.load(base + tl.arange(0, N)).to(ACC)


@triton.jit
def store_vector(base, x, N: tl.constexpr):
    tl.store(base + tl.arange(0, N), x.to(base.dtype.element_ty))


@triton.jit
def gelu_tanh_grads(x):
    """gelu_tanh(x) = x/2 (1 + tanh(u)), u = s (x + c x^3); returns (gelu, gelu', gelu'').

    With t = tanh(u), u' = s (1 + 3 c x^2), u'' = 6 s c x:
    gelu' = (1 + t)/2 + x/2 (1 - t^2) u',   gelu'' = (1 - t^2) (u' - x t u'^2 + x u''/2).
    tanh is written through the sigmoid (tl has no tanh that runs everywhere, interpreter included).
    """
    u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x)
    t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
    sech2 = 1.0 - t * t
    y = 0.5 * x * (1.0 + t)
    d1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du
    d2 = sech2 * (du - x * t * du * du + 3.0 * SQRT_2_OVER_PI * GELU_C * x * x)
    return y, d1, d2


@triton.jit
def gelu_tanh(x):
    u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x)
    return x * tl.sigmoid(2.0 * u)  # = x/2 (1 + tanh(u))


@triton.jit
def layer_norm_stats(z, D: tl.constexpr):
    """Row LayerNorm of z (M, D) without affine: returns (xh (M, D), r (M, 1) = 1 / sqrt(var + eps))."""
    mean = tl.sum(z, axis=1) / D
    zc = z - mean[:, None]
    r = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + LN_EPS)
    return zc * r[:, None], r[:, None]


@triton.jit
def layer_norm(z, gamma, beta, D: tl.constexpr):
    """Row LayerNorm of z (M, D) with the per-head affine gamma, beta (D,)."""
    xh, r = layer_norm_stats(z, D)
    return xh * gamma[None, :] + beta[None, :]


@triton.jit
def layer_norm_backward(xh, r, dxh, D: tl.constexpr):
    """dL/dz from dL/dxh for xh = LN(z) without affine: (r / D) (D dxh - sum(dxh) - xh sum(dxh xh)), per row.

    The same linear map, symmetric in its argument, turns g = gamma dY into dZ (see the module docstring).
    """
    s1 = tl.sum(dxh, axis=1)[:, None]
    s2 = tl.sum(dxh * xh, axis=1)[:, None]
    return (r / D) * (D * dxh - s1 - xh * s2)


@triton.jit
def loss_grad_parts(z, target, eta, gamma, beta, D: tl.constexpr):
    """The inner loss's gradient with respect to z (M, D), plus what its backward needs.

    Returns (xh (M, D), r (M, 1), E (M, D), dY (M, D), g (M, D), dZ (M, D)) as in the module docstring.
    """
    xh, r = layer_norm_stats(z, D)
    e = xh * gamma[None, :] + beta[None, :] - target
    dy = eta[:, None] * e
    g = gamma[None, :] * dy
    return xh, r, e, dy, g, layer_norm_backward(xh, r, g, D)


@triton.jit
def loss_grad(z, target, eta, gamma, beta, D: tl.constexpr):
    """dZ (M, D) alone (see `loss_grad_parts`)."""
    xh, r = layer_norm_stats(z, D)
    g = gamma[None, :] * eta[:, None] * (xh * gamma[None, :] + beta[None, :] - target)
    return layer_norm_backward(xh, r, g, D)


@triton.jit
def loss_grad_backward(c, xh, r, e, dy, g, dz, eta, gamma, D: tl.constexpr):
    """Reverse mode of (Z, T, eta, gamma, beta) -> dZ (see `loss_grad_parts`), given C = dL/d(dZ) (M, D).

    dZ = r P(g) with P(g) = (1/D)(D g - sum(g) - xh sum(g xh)), so, per row, with s = sum(g xh), cx = sum(C xh):
      dL/dg  = r P(C)                                          (P is symmetric)
      dL/dxh = -(r/D)(C s + g cx)      (xh inside P)   + gamma * eta * dL/dE   (xh inside E)
      dL/dr  = sum(C dZ) / r,  and dr/dZ = -r^2 xh / D   ->  adds -(r/D) sum(C dZ) xh to dL/dZ
      g = gamma dY:  dL/d(dY) = gamma dL/dg,  dL/dgamma += sum_rows(dL/dg * dY)
      dY = eta E:    dL/deta = sum(dL/d(dY) * E),  dL/dE = eta dL/d(dY)
      E = gamma xh + beta - T:  dL/dgamma += sum_rows(dL/dE xh), dL/dbeta = sum_rows(dL/dE), dL/dT = -dL/dE
      xh = LN(Z):  dL/dZ = layer_norm_backward(dL/dxh) + the r term above.
    Returns (dL/dZ (M, D), dL/dE (M, D) (= -dL/dT), dL/deta (M,), dL/dgamma (D,), dL/dbeta (D,)).
    """
    s = tl.sum(g * xh, axis=1)[:, None]
    cx = tl.sum(c * xh, axis=1)[:, None]
    dg = layer_norm_backward(xh, r, c, D)
    ddy = gamma[None, :] * dg
    deta = tl.sum(ddy * e, axis=1)
    de = eta[:, None] * ddy
    dgamma = tl.sum(dg * dy + de * xh, axis=0)
    dbeta = tl.sum(de, axis=0)
    dxh = gamma[None, :] * de - (r / D) * (c * s + g * cx)
    dz_total = layer_norm_backward(xh, r, dxh, D) - (r / D) * tl.sum(c * dz, axis=1)[:, None] * xh
    return dz_total, de, deta, dgamma, dbeta


@triton.jit
def readout_backward(dout, xq, rq, gamma, D: tl.constexpr):
    """Backward of out = q + gamma * xq + beta, xq = LN(Zq) without affine: returns (dZq, dgamma, dbeta)."""
    dzq = layer_norm_backward(xq, rq, gamma[None, :] * dout, D)
    return dzq, tl.sum(dout * xq, axis=0), tl.sum(dout, axis=0)


def check_power_of_two(name: str, value: int) -> None:
    # tl.dot needs every dimension >= 16, and block shapes are powers of two
    if value < 16 or value & (value - 1):
        raise ValueError(f"triton backend: {name} must be a power of two >= 16, got {value}")


@dataclass(frozen=True)
class Options:
    """Per-call settings shared by the forward and backward launches."""

    mini_batch_size: int
    checkpoint_group: int
    acc: torch.dtype  # float32, or float64 for float64 inputs (tests)
    dot_precision: str  # see apply_triton_op

    def num_groups(self, seq_len: int) -> int:
        return triton.cdiv(triton.cdiv(seq_len, self.mini_batch_size), self.checkpoint_group)

    def constexprs(self) -> dict:
        return dict(M=self.mini_batch_size, ACC=tl.float64 if self.acc == torch.float64 else tl.float32,
                    PRECISION=self.dot_precision)


@dataclass(frozen=True)
class TritonOp:
    """What differs between the Triton TTT ops; the validation and autograd plumbing below are shared.

    state_shapes(H, D, F): per-sample shape of each state tensor, (H, ...).
    forward(q, k, v, eta, ln_weight, ln_bias, state, options, store_checkpoints) -> (out, final, checkpoints),
      state/final (B, H, ...) in options.acc, checkpoints (B, H, num_groups, ...) or () when not stored.
    backward(q, k, v, eta, ln_weight, ln_bias, checkpoints, dout, dfinal, options)
      -> (dq, dk, dv, deta, d initial state (B, H, ...), dln_weight (B, H, D), dln_bias (B, H, D)).
    """

    state_names: tuple[str, ...]
    state_shapes: Callable[[int, int, int], tuple[tuple[int, ...], ...]]
    forward: Callable
    backward: Callable
    kernels: tuple  # the Triton kernels, for the interpreter check


class _TTTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: TritonOp, options: Options, store_checkpoints: bool, q, k, v, eta, ln_weight, ln_bias,
                *state):
        B, H, _, D = q.shape
        shapes = op.state_shapes(H, D, state[0].shape[-1])
        # shared (H, ...) state is copied per sample: the kernels index state by (batch, head)
        state32 = tuple(s.to(options.acc).expand(B, *shape).contiguous() for s, shape in zip(state, shapes))
        q, k, v, eta = q.contiguous(), k.contiguous(), v.contiguous(), eta.contiguous()
        ln_w, ln_b = ln_weight.to(options.acc).contiguous(), ln_bias.to(options.acc).contiguous()
        out, final, checkpoints = op.forward(q, k, v, eta, ln_w, ln_b, state32, options, store_checkpoints)
        ctx.op, ctx.options = op, options
        ctx.meta = (ln_weight.dtype, ln_bias.dtype, tuple((s.dim(), s.dtype) for s in state))
        ctx.save_for_backward(q, k, v, eta, ln_w, ln_b, *checkpoints)
        return (out, *final)

    @staticmethod
    def backward(ctx, dout, *dfinal):
        q, k, v, eta, ln_w, ln_b, *checkpoints = ctx.saved_tensors
        ln_w_dtype, ln_b_dtype, state_meta = ctx.meta
        dfinal = tuple(c.new_zeros(c.shape[:2] + c.shape[3:]) if d is None else d.to(c.dtype).contiguous()
                       for d, c in zip(dfinal, checkpoints))
        dout = torch.zeros_like(q) if dout is None else dout.contiguous()
        dq, dk, dv, deta, dstate, dln_w, dln_b = ctx.op.backward(q, k, v, eta, ln_w, ln_b, tuple(checkpoints),
                                                                 dout, dfinal, ctx.options)
        # a state tensor shared by the batch gets the sum of its per-sample gradients
        dstate = tuple((g.sum(0) if dim == g.dim() - 1 else g).to(dtype) for g, (dim, dtype) in zip(dstate, state_meta))
        return (None, None, None, dq, dk, dv, deta, dln_w.sum(0).to(ln_w_dtype), dln_b.sum(0).to(ln_b_dtype), *dstate)


def apply_triton_op(op: TritonOp, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                    ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: tuple[torch.Tensor, ...],
                    mini_batch_size: int, checkpoint_group: int) -> tuple[torch.Tensor, ...]:
    """Checks the kernels' own limits (the contract was validated by kernels/dispatch.py and is only asserted
    here), then runs the op.

    q, k, v: (B, H, L, D); eta: (B, H, L); ln_weight, ln_bias: (H, D); state: tensors of shape
    op.state_shapes(H, D, F), each optionally with a leading B. Returns (out (B, H, L, D), *final state (B, H, ...)).
    """
    B, H, L, D = qkv_shape(q, k, v, eta)
    F = state[0].shape[-1]
    assert len(state) == len(op.state_names) and all(
        tuple(s.shape) in (shape, (B, *shape)) for s, shape in zip(state, op.state_shapes(H, D, F)))
    assert ln_weight.shape == ln_bias.shape == (H, D) and checkpoint_group >= 1
    tensors = (q, k, v, eta, ln_weight, ln_bias, *state)
    assert all(t.device == q.device for t in tensors)
    check_power_of_two("head dim D", D)
    check_power_of_two("inner width F", F)
    check_power_of_two("mini_batch_size", mini_batch_size)
    if q.device.type != "cuda" and not all(isinstance(kern, InterpretedFunction) for kern in op.kernels):
        raise ValueError(f"triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"triton backend: q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # fp32 inputs: three TF32 products per product (tensor cores, close to fp32 accuracy); bf16/fp16 inputs: one,
    # their own rounding is already coarser; fp64 (tests): exact
    precision = {torch.float32: "tf32x3", torch.float64: "ieee"}.get(q.dtype, "tf32")
    options = Options(mini_batch_size, checkpoint_group, acc, precision)
    store_checkpoints = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _TTTFunction.apply(op, options, store_checkpoints, q, k, v, eta, ln_weight, ln_bias, *state)
