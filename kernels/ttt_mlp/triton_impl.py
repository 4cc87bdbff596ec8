"""TTT-MLP as fused Triton kernels: a forward and a hand-derived backward, one program per (batch, head).

Design: shared/DESIGN.md, "The TTT op contract"; docs/kernels.md, "Triton kernels".

Per (batch, head) the fp32 state W1 (D, F), b1 (F,), W2 (F, D), b2 (D,) stays in registers over the whole
sequence. Mini-batch t takes rows [t M, t M + M) of Q, K, V (M, D) and eta (M,), T = V - K; rows past L are
zeros with eta = 0 and are never stored. One step (LN notation as in kernels/triton_common.py):

    Z1 = K W1 + b1 (M, F)    X2 = gelu(Z1) (M, F)    Z2 = X2 W2 + b2 (M, D)
    dZ2 = loss_grad(Z2, T, eta) (M, D)               the gradient of sum_i eta_i/2 ||LN(Z2_i) - T_i||^2
    dX2 = dZ2 W2^T (M, F)    dZ1 = dX2 * gelu'(Z1) (M, F)
    W1' = W1 - K^T dZ1    b1' = b1 - sum_rows dZ1    W2' = W2 - X2^T dZ2    b2' = b2 - sum_rows dZ2
    out = Q + LN(gelu(Q W1' + b1') W2' + b2')        (M, D)

The forward stores the state at the start of every group of `checkpoint_group` mini-batches,
checkpoints (B, H, num_groups, ...). The backward walks the groups in reverse: it replays a group from its
checkpoint, writing the state before each step to a scratch buffer (B, H, checkpoint_group, ...), then walks
the group's steps in reverse, carrying G = dL/d(state after the step) (gW1 (D, F), gb1, gW2 (F, D), gb2) to
dL/d(state before the step). With Zq1 = Q W1' + b1', Xq2 = gelu(Zq1), Zq2 = Xq2 W2' + b2', xq = LN(Zq2)
without affine, and dO = dL/dout (M, D):

  readout:  dgamma += sum_rows dO xq,  dbeta += sum_rows dO,  dZq2 = layer_norm_backward(gamma dO)   (M, D)
            gW2 += Xq2^T dZq2,  gb2 += sum_rows dZq2,  dZq1 = (dZq2 W2'^T) * gelu'(Zq1)             (M, F)
            gW1 += Q^T dZq1,  gb1 += sum_rows dZq1,  dQ = dO + dZq1 W1'^T                             (M, D)
  update (G now holds dL/d(W1', b1', W2', b2'); the identity part carries over to the old state):
            dK  = -dZ1 gW1^T                                   (K in W1' = W1 - K^T dZ1)
            A   = dL/d(dZ1) = -(K gW1 + gb1)                   (M, F)
            C   = dL/d(dZ2) = -(X2 gW2 + gb2)                  (M, D)
            dX2t = -dZ2 gW2^T                                  (M, F), X2 in W2' = W2 - X2^T dZ2
  dZ1 = dX2 * gelu'(Z1):   dL/d(dX2) = A * gelu'(Z1),  dZ1t = A * dX2 * gelu''(Z1)                  (M, F)
  dX2 = dZ2 W2^T:          C += dL/d(dX2) W2,  gW2 += dL/d(dX2)^T dZ2
  dZ2 = loss_grad(Z2, T, eta):  loss_grad_backward(C) -> dZ2t (M, D), dE (M, D), deta (M,), dgamma, dbeta;
                                T = V - K gives dV = -dE, dK += dE
  Z2 = X2 W2 + b2:         dX2t += dZ2t W2^T,  gW2 += X2^T dZ2t,  gb2 += sum_rows dZ2t
  Z1 = K W1 + b1:          dZ1t += dX2t * gelu'(Z1),  gW1 += K^T dZ1t,  gb1 += sum_rows dZ1t,  dK += dZ1t W1^T

After the first mini-batch G is the gradient of the initial state; dgamma, dbeta are kept per (batch, head),
(B, H, D), and summed over the batch on the host. The maths is checked against autograd in float64 by a
plain-PyTorch mirror in tests/test_kernels_triton.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import (
    TritonOp,
    apply_triton_op,
    gelu_tanh,
    layer_norm,
    load_matrix,
    load_row_scalars,
    load_rows,
    load_vector,
    loss_grad,
    loss_grad_backward,
    readout_backward,
    store_matrix,
    store_row_scalars,
    store_rows,
    store_vector,
)


@triton.jit
def _inner_step(w1, b1, w2, b2, k, target, eta, gamma, beta, D: tl.constexpr, PRECISION: tl.constexpr):
    """One mini-batch's gradient step; returns the new state and the intermediates the backward needs."""
    z1 = tl.dot(k, w1, input_precision=PRECISION) + b1[None, :]  # (M, F)
    x2, gp, gpp = gelu_tanh(z1)
    z2 = tl.dot(x2, w2, input_precision=PRECISION) + b2[None, :]  # (M, D)
    xh, r, e, dy, g, dz2 = loss_grad(z2, target, eta, gamma, beta, D)
    dx2 = tl.dot(dz2, tl.trans(w2), input_precision=PRECISION)  # (M, F)
    dz1 = dx2 * gp
    w1n = w1 - tl.dot(tl.trans(k), dz1, input_precision=PRECISION)
    b1n = b1 - tl.sum(dz1, axis=0)
    w2n = w2 - tl.dot(tl.trans(x2), dz2, input_precision=PRECISION)
    b2n = b2 - tl.sum(dz2, axis=0)
    return w1n, b1n, w2n, b2n, x2, gp, gpp, xh, r, e, dy, g, dz2, dx2, dz1


@triton.jit
def _readout(w1, b1, w2, b2, q, gamma, beta, D: tl.constexpr, PRECISION: tl.constexpr):
    """LN(f(Q)) with the updated state; returns (Xq2 (M, F), gelu'(Zq1), xq (M, D), rq (M, 1), LN output)."""
    zq1 = tl.dot(q, w1, input_precision=PRECISION) + b1[None, :]
    xq2, gpq, _ = gelu_tanh(zq1)
    xq, rq, y = layer_norm(tl.dot(xq2, w2, input_precision=PRECISION) + b2[None, :], gamma, beta, D)
    return xq2, gpq, xq, rq, y


@triton.jit
def _store_state(w1_ptr, b1_ptr, w2_ptr, b2_ptr, index, w1, b1, w2, b2, D: tl.constexpr, F: tl.constexpr):
    """Writes the state into slot `index` of (n, D, F), (n, F), (n, F, D), (n, D) buffers."""
    store_matrix(w1_ptr + index * D * F, w1, D, F)
    store_vector(b1_ptr + index * F, b1, F)
    store_matrix(w2_ptr + index * F * D, w2, F, D)
    store_vector(b2_ptr + index * D, b2, D)


@triton.jit
def _load_state(w1_ptr, b1_ptr, w2_ptr, b2_ptr, index, D: tl.constexpr, F: tl.constexpr, ACC: tl.constexpr):
    w1 = load_matrix(w1_ptr + index * D * F, D, F, ACC)
    b1 = load_vector(b1_ptr + index * F, F, ACC)
    w2 = load_matrix(w2_ptr + index * F * D, F, D, ACC)
    b2 = load_vector(b2_ptr + index * D, D, ACC)
    return w1, b1, w2, b2


@triton.jit
def _mlp_forward_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, ln_w_ptr, ln_b_ptr,
                        w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                        out_ptr, w1_final_ptr, b1_final_ptr, w2_final_ptr, b2_final_ptr,
                        w1_ckpt_ptr, b1_ckpt_ptr, w2_ckpt_ptr, b2_ckpt_ptr,
                        H, L, num_groups, group_size,
                        D: tl.constexpr, F: tl.constexpr, M: tl.constexpr, STORE_CHECKPOINTS: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    h = bh % H
    gamma = load_vector(ln_w_ptr + h * D, D, ACC)
    beta = load_vector(ln_b_ptr + h * D, D, ACC)
    w1, b1, w2, b2 = _load_state(w1_ptr, b1_ptr, w2_ptr, b2_ptr, bh, D, F, ACC)
    seq = bh * L * D
    for t in range(0, tl.cdiv(L, M)):
        if STORE_CHECKPOINTS:
            if t % group_size == 0:
                _store_state(w1_ckpt_ptr, b1_ckpt_ptr, w2_ckpt_ptr, b2_ckpt_ptr, bh * num_groups + t // group_size,
                             w1, b1, w2, b2, D, F)
        row0 = t * M
        k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
        v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
        eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
        w1, b1, w2, b2, _, _, _, _, _, _, _, _, _, _, _ = _inner_step(w1, b1, w2, b2, k, v - k, eta, gamma, beta,
                                                                      D, PRECISION)
        q = load_rows(q_ptr + seq, row0, L, M, D, ACC)
        _, _, _, _, y = _readout(w1, b1, w2, b2, q, gamma, beta, D, PRECISION)
        store_rows(out_ptr + seq, row0, L, q + y, M, D)
    _store_state(w1_final_ptr, b1_final_ptr, w2_final_ptr, b2_final_ptr, bh, w1, b1, w2, b2, D, F)


@triton.jit
def _mlp_backward_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, ln_w_ptr, ln_b_ptr,
                         w1_ckpt_ptr, b1_ckpt_ptr, w2_ckpt_ptr, b2_ckpt_ptr,
                         dout_ptr, dw1_final_ptr, db1_final_ptr, dw2_final_ptr, db2_final_ptr,
                         w1_scratch_ptr, b1_scratch_ptr, w2_scratch_ptr, b2_scratch_ptr,
                         dq_ptr, dk_ptr, dv_ptr, deta_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, dln_w_ptr, dln_b_ptr,
                         H, L, num_groups, group_size,
                         D: tl.constexpr, F: tl.constexpr, M: tl.constexpr,
                         ACC: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    h = bh % H
    gamma = load_vector(ln_w_ptr + h * D, D, ACC)
    beta = load_vector(ln_b_ptr + h * D, D, ACC)
    gw1, gb1, gw2, gb2 = _load_state(dw1_final_ptr, db1_final_ptr, dw2_final_ptr, db2_final_ptr, bh, D, F, ACC)
    dgamma = tl.zeros([D], dtype=ACC)
    dbeta = tl.zeros([D], dtype=ACC)
    seq = bh * L * D
    num_steps = tl.cdiv(L, M)
    for i in range(0, num_groups):
        group = num_groups - 1 - i
        t0 = group * group_size
        n = tl.minimum(group_size, num_steps - t0)
        w1, b1, w2, b2 = _load_state(w1_ckpt_ptr, b1_ckpt_ptr, w2_ckpt_ptr, b2_ckpt_ptr, bh * num_groups + group,
                                     D, F, ACC)
        # replay the group, keeping the state before each step (the last step's result is not needed)
        for j in range(0, n - 1):
            _store_state(w1_scratch_ptr, b1_scratch_ptr, w2_scratch_ptr, b2_scratch_ptr, bh * group_size + j,
                         w1, b1, w2, b2, D, F)
            row0 = (t0 + j) * M
            k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
            v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
            eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
            w1, b1, w2, b2, _, _, _, _, _, _, _, _, _, _, _ = _inner_step(w1, b1, w2, b2, k, v - k, eta, gamma,
                                                                          beta, D, PRECISION)
        _store_state(w1_scratch_ptr, b1_scratch_ptr, w2_scratch_ptr, b2_scratch_ptr, bh * group_size + n - 1,
                     w1, b1, w2, b2, D, F)
        # other threads of this program read what was just written
        tl.debug_barrier()
        for j in range(0, n):
            jj = n - 1 - j
            row0 = (t0 + jj) * M
            w1, b1, w2, b2 = _load_state(w1_scratch_ptr, b1_scratch_ptr, w2_scratch_ptr, b2_scratch_ptr,
                                         bh * group_size + jj, D, F, ACC)
            q = load_rows(q_ptr + seq, row0, L, M, D, ACC)
            k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
            v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
            eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
            dout = load_rows(dout_ptr + seq, row0, L, M, D, ACC)
            w1n, b1n, w2n, b2n, x2, gp, gpp, xh, r, e, dy, g, dz2, dx2, dz1 = _inner_step(
                w1, b1, w2, b2, k, v - k, eta, gamma, beta, D, PRECISION)
            xq2, gpq, xq, rq, _ = _readout(w1n, b1n, w2n, b2n, q, gamma, beta, D, PRECISION)

            dzq2, dgamma_out, dbeta_out = readout_backward(dout, xq, rq, gamma, D)
            gw2 += tl.dot(tl.trans(xq2), dzq2, input_precision=PRECISION)
            gb2 += tl.sum(dzq2, axis=0)
            dzq1 = tl.dot(dzq2, tl.trans(w2n), input_precision=PRECISION) * gpq  # (M, F)
            gw1 += tl.dot(tl.trans(q), dzq1, input_precision=PRECISION)
            gb1 += tl.sum(dzq1, axis=0)
            dq = dout + tl.dot(dzq1, tl.trans(w1n), input_precision=PRECISION)

            dk = -tl.dot(dz1, tl.trans(gw1), input_precision=PRECISION)
            a = -(tl.dot(k, gw1, input_precision=PRECISION) + gb1[None, :])  # dL/d(dZ1) (M, F)
            c = -(tl.dot(x2, gw2, input_precision=PRECISION) + gb2[None, :])  # dL/d(dZ2) (M, D)
            dx2_total = -tl.dot(dz2, tl.trans(gw2), input_precision=PRECISION)  # (M, F)
            ddx2 = a * gp
            dz1_total = a * dx2 * gpp
            c += tl.dot(ddx2, w2, input_precision=PRECISION)
            gw2 += tl.dot(tl.trans(ddx2), dz2, input_precision=PRECISION)
            dz2_total, de, deta, dgamma_loss, dbeta_loss = loss_grad_backward(c, xh, r, e, dy, g, dz2, eta, gamma, D)
            dk += de
            dx2_total += tl.dot(dz2_total, tl.trans(w2), input_precision=PRECISION)
            gw2 += tl.dot(tl.trans(x2), dz2_total, input_precision=PRECISION)
            gb2 += tl.sum(dz2_total, axis=0)
            dz1_total += dx2_total * gp
            gw1 += tl.dot(tl.trans(k), dz1_total, input_precision=PRECISION)
            gb1 += tl.sum(dz1_total, axis=0)
            dk += tl.dot(dz1_total, tl.trans(w1), input_precision=PRECISION)
            dgamma += dgamma_out + dgamma_loss
            dbeta += dbeta_out + dbeta_loss

            store_rows(dq_ptr + seq, row0, L, dq, M, D)
            store_rows(dk_ptr + seq, row0, L, dk, M, D)
            store_rows(dv_ptr + seq, row0, L, -de, M, D)
            store_row_scalars(deta_ptr + bh * L, row0, L, deta, M)
        # the next group's replay overwrites the scratch slots read above
        tl.debug_barrier()
    _store_state(dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, bh, gw1, gb1, gw2, gb2, D, F)
    store_vector(dln_w_ptr + bh * D, dgamma, D)
    store_vector(dln_b_ptr + bh * D, dbeta, D)


def _num_warps(D: int, F: int) -> int:
    # the state (2 D F floats) lives in registers: spread it over more threads when it is large
    return 4 if D * F <= 64 * 64 else 8


def _forward(q, k, v, eta, ln_w, ln_b, state, options, store_checkpoints):
    B, H, L, D = q.shape
    F = state[0].shape[-1]
    out = torch.empty_like(q)
    final = tuple(torch.empty_like(s) for s in state)
    num_groups = options.num_groups(L)
    checkpoints = tuple(s.new_empty(B, H, num_groups, *s.shape[2:]) for s in state) if store_checkpoints else ()
    _mlp_forward_kernel[(B * H,)](
        q, k, v, eta, ln_w, ln_b, *state, out, *final, *(checkpoints or final),
        H, L, num_groups, options.checkpoint_group,
        D=D, F=F, STORE_CHECKPOINTS=store_checkpoints, num_warps=_num_warps(D, F), **options.constexprs())
    return out, final, checkpoints


def _backward(q, k, v, eta, ln_w, ln_b, checkpoints, dout, dfinal, options):
    B, H, L, D = q.shape
    F = checkpoints[0].shape[-1]
    scratch = tuple(c.new_empty(B, H, options.checkpoint_group, *c.shape[3:]) for c in checkpoints)
    dq, dk, dv, deta = (torch.empty_like(x) for x in (q, k, v, eta))
    dstate = tuple(torch.empty_like(d) for d in dfinal)
    dln_w = ln_w.new_empty(B, H, D)
    dln_b = ln_w.new_empty(B, H, D)
    _mlp_backward_kernel[(B * H,)](
        q, k, v, eta, ln_w, ln_b, *checkpoints, dout, *dfinal, *scratch,
        dq, dk, dv, deta, *dstate, dln_w, dln_b,
        H, L, options.num_groups(L), options.checkpoint_group,
        D=D, F=F, num_warps=_num_warps(D, F), **options.constexprs())
    return dq, dk, dv, deta, dstate, dln_w, dln_b


_TTT_MLP = TritonOp(
    state_names=("w1", "b1", "w2", "b2"),
    state_shapes=lambda H, D, F: ((H, D, F), (H, F), (H, F, D), (H, D)),
    forward=_forward,
    backward=_backward,
    kernels=(_mlp_forward_kernel, _mlp_backward_kernel),
)


def ttt_mlp_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                   w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   ln_weight: torch.Tensor, ln_bias: torch.Tensor, *, mini_batch_size: int = 64,
                   initial_state: tuple[torch.Tensor, ...] | None = None, return_state: bool = False,
                   checkpoint_group: int = 4):
    """TTT-MLP with fused Triton forward and backward kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    q, k, v: (B, H, L, D); eta: (B, H, L); w1 (H, D, F), b1 (H, F), w2 (H, F, D), b2 (H, D), each optionally
    with a leading B; ln_weight, ln_bias (H, D); initial_state, if given, replaces (w1, b1, w2, b2) (each
    tensor (H, ...) or (B, H, ...)). D, F and mini_batch_size must be powers of two >= 16. checkpoint_group:
    mini-batches per stored state (memory (B, H, ceil(L / m / group)) states against one replay per group).
    Returns out (B, H, L, D) in q's dtype and, with return_state, the final (w1, b1, w2, b2) (B, H, ...) in
    float32 (float64 for float64 inputs). Differentiable in every tensor input.
    """
    state = tuple(initial_state) if initial_state is not None else (w1, b1, w2, b2)
    out, *final = apply_triton_op(_TTT_MLP, q, k, v, eta, ln_weight, ln_bias, state, mini_batch_size,
                                  checkpoint_group)
    return (out, tuple(final)) if return_state else out
