"""TTT-Linear as fused Triton kernels: a forward and a hand-derived backward, one program per (batch, head).

Design: docs/design.md, "The TTT op contract"; docs/kernels.md, "Triton kernels".

Per (batch, head) the fp32 state W (D, D), b (D,) stays in registers over the whole sequence. Mini-batch t
takes rows [t M, t M + M) of Q, K, V (M, D) and eta (M,), T = V - K; rows past L are zeros with eta = 0 and
are never stored. One step (LN notation as in kernels/triton_common.py):

    Z = K W + b (M, D)    dZ = loss_grad(Z, T, eta) (M, D)    W' = W - K^T dZ    b' = b - sum_rows dZ
    out = Q + LN(Q W' + b')                                   (M, D)

Checkpoints and the backward's replay work as in kernels/ttt_mlp/triton_impl.py. The backward carries
gW (D, D), gb (D,) = dL/d(state after the step) to dL/d(state before it). With xq = LN(Q W' + b') without
affine and dO = dL/dout (M, D):

  readout:  dgamma += sum_rows dO xq,  dbeta += sum_rows dO,  dZq = layer_norm_backward(gamma dO)    (M, D)
            gW += Q^T dZq,  gb += sum_rows dZq,  dQ = dO + dZq W'^T
  update:   dK = -dZ gW^T,  C = dL/d(dZ) = -(K gW + gb)                                              (M, D)
            loss_grad_backward(C) -> dZt (M, D), dE (M, D), deta (M,), dgamma, dbeta;  dV = -dE,  dK += dE
  Z = K W + b:  gW += K^T dZt,  gb += sum_rows dZt,  dK += dZt W^T

The maths is checked against autograd in float64 by a plain-PyTorch mirror in tests/test_kernels_triton.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import (
    TritonOp,
    apply_triton_op,
    layer_norm,
    layer_norm_stats,
    load_block,
    load_row_scalars,
    load_rows,
    load_vector,
    loss_grad,
    loss_grad_backward,
    loss_grad_parts,
    readout_backward,
    store_block,
    store_row_scalars,
    store_rows,
    store_vector,
)


@triton.jit
def _linear_forward_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr,
                           out_ptr, w_final_ptr, b_final_ptr, w_ckpt_ptr, b_ckpt_ptr,
                           H, L, num_groups, group_size,
                           D: tl.constexpr, M: tl.constexpr, STORE_CHECKPOINTS: tl.constexpr,
                           ACC: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    h = bh % H
    gamma = load_vector(ln_w_ptr + h * D, D, ACC)
    beta = load_vector(ln_b_ptr + h * D, D, ACC)
    w = load_block(w_ptr + bh * D * D, 0, 0, D, D, D, ACC)
    b = load_vector(b_ptr + bh * D, D, ACC)
    seq = bh * L * D
    for t in range(0, tl.cdiv(L, M)):
        if STORE_CHECKPOINTS:
            if t % group_size == 0:
                ckpt = bh * num_groups + t // group_size
                store_block(w_ckpt_ptr + ckpt * D * D, 0, 0, D, w, D, D)
                store_vector(b_ckpt_ptr + ckpt * D, b, D)
        row0 = t * M
        k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
        v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
        eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
        dz = loss_grad(tl.dot(k, w, input_precision=PRECISION) + b[None, :], v - k, eta, gamma, beta, D)
        w -= tl.dot(tl.trans(k), dz, input_precision=PRECISION)
        b -= tl.sum(dz, axis=0)
        q = load_rows(q_ptr + seq, row0, L, M, D, ACC)
        y = layer_norm(tl.dot(q, w, input_precision=PRECISION) + b[None, :], gamma, beta, D)
        store_rows(out_ptr + seq, row0, L, q + y, M, D)
    store_block(w_final_ptr + bh * D * D, 0, 0, D, w, D, D)
    store_vector(b_final_ptr + bh * D, b, D)


@triton.jit
def _linear_backward_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, ln_w_ptr, ln_b_ptr, w_ckpt_ptr, b_ckpt_ptr,
                            dout_ptr, dw_final_ptr, db_final_ptr, w_scratch_ptr, b_scratch_ptr,
                            dq_ptr, dk_ptr, dv_ptr, deta_ptr, dw_ptr, db_ptr, dln_w_ptr, dln_b_ptr,
                            H, L, num_groups, group_size,
                            D: tl.constexpr, M: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    h = bh % H
    gamma = load_vector(ln_w_ptr + h * D, D, ACC)
    beta = load_vector(ln_b_ptr + h * D, D, ACC)
    gw = load_block(dw_final_ptr + bh * D * D, 0, 0, D, D, D, ACC)
    gb = load_vector(db_final_ptr + bh * D, D, ACC)
    dgamma = tl.zeros([D], dtype=ACC)
    dbeta = tl.zeros([D], dtype=ACC)
    seq = bh * L * D
    num_steps = tl.cdiv(L, M)
    for i in range(0, num_groups):
        group = num_groups - 1 - i
        t0 = group * group_size
        n = tl.minimum(group_size, num_steps - t0)
        w = load_block(w_ckpt_ptr + (bh * num_groups + group) * D * D, 0, 0, D, D, D, ACC)
        b = load_vector(b_ckpt_ptr + (bh * num_groups + group) * D, D, ACC)
        # replay the group, keeping the state before each step (the last step's result is not needed)
        for j in range(0, n - 1):
            store_block(w_scratch_ptr + (bh * group_size + j) * D * D, 0, 0, D, w, D, D)
            store_vector(b_scratch_ptr + (bh * group_size + j) * D, b, D)
            row0 = (t0 + j) * M
            k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
            v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
            eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
            dz = loss_grad(tl.dot(k, w, input_precision=PRECISION) + b[None, :], v - k, eta, gamma, beta, D)
            w -= tl.dot(tl.trans(k), dz, input_precision=PRECISION)
            b -= tl.sum(dz, axis=0)
        store_block(w_scratch_ptr + (bh * group_size + n - 1) * D * D, 0, 0, D, w, D, D)
        store_vector(b_scratch_ptr + (bh * group_size + n - 1) * D, b, D)
        # other threads of this program read what was just written
        tl.debug_barrier()
        for j in range(0, n):
            jj = n - 1 - j
            row0 = (t0 + jj) * M
            w = load_block(w_scratch_ptr + (bh * group_size + jj) * D * D, 0, 0, D, D, D, ACC)
            b = load_vector(b_scratch_ptr + (bh * group_size + jj) * D, D, ACC)
            q = load_rows(q_ptr + seq, row0, L, M, D, ACC)
            k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
            v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
            eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
            dout = load_rows(dout_ptr + seq, row0, L, M, D, ACC)
            xh, r, e, dy, g, dz = loss_grad_parts(tl.dot(k, w, input_precision=PRECISION) + b[None, :], v - k, eta,
                                                  gamma, beta, D)
            wn = w - tl.dot(tl.trans(k), dz, input_precision=PRECISION)
            bn = b - tl.sum(dz, axis=0)
            xq, rq = layer_norm_stats(tl.dot(q, wn, input_precision=PRECISION) + bn[None, :], D)

            dzq, dgamma_out, dbeta_out = readout_backward(dout, xq, rq, gamma, D)
            gw += tl.dot(tl.trans(q), dzq, input_precision=PRECISION)
            gb += tl.sum(dzq, axis=0)
            dq = dout + tl.dot(dzq, tl.trans(wn), input_precision=PRECISION)

            dk = -tl.dot(dz, tl.trans(gw), input_precision=PRECISION)
            c = -(tl.dot(k, gw, input_precision=PRECISION) + gb[None, :])  # dL/d(dZ) (M, D)
            dz_total, de, deta, dgamma_loss, dbeta_loss = loss_grad_backward(c, xh, r, e, dy, g, dz, eta, gamma, D)
            dk += de
            gw += tl.dot(tl.trans(k), dz_total, input_precision=PRECISION)
            gb += tl.sum(dz_total, axis=0)
            dk += tl.dot(dz_total, tl.trans(w), input_precision=PRECISION)
            dgamma += dgamma_out + dgamma_loss
            dbeta += dbeta_out + dbeta_loss

            store_rows(dq_ptr + seq, row0, L, dq, M, D)
            store_rows(dk_ptr + seq, row0, L, dk, M, D)
            store_rows(dv_ptr + seq, row0, L, -de, M, D)
            store_row_scalars(deta_ptr + bh * L, row0, L, deta, M)
        # the next group's replay overwrites the scratch slots read above
        tl.debug_barrier()
    store_block(dw_ptr + bh * D * D, 0, 0, D, gw, D, D)
    store_vector(db_ptr + bh * D, gb, D)
    store_vector(dln_w_ptr + bh * D, dgamma, D)
    store_vector(dln_b_ptr + bh * D, dbeta, D)


def _num_warps(D: int) -> int:
    return 4 if D <= 64 else 8


def _forward(q, k, v, eta, ln_w, ln_b, state, options, store_checkpoints):
    B, H, L, D = q.shape
    out = torch.empty_like(q)
    final = tuple(torch.empty_like(s) for s in state)
    num_groups = options.num_groups(L)
    checkpoints = tuple(s.new_empty(B, H, num_groups, *s.shape[2:]) for s in state) if store_checkpoints else ()
    _linear_forward_kernel[(B * H,)](
        q, k, v, eta, ln_w, ln_b, *state, out, *final, *(checkpoints or final),
        H, L, num_groups, options.checkpoint_group,
        D=D, STORE_CHECKPOINTS=store_checkpoints, num_warps=_num_warps(D), **options.constexprs())
    return out, final, checkpoints


def _backward(q, k, v, eta, ln_w, ln_b, checkpoints, dout, dfinal, options):
    B, H, L, D = q.shape
    scratch = tuple(c.new_empty(B, H, options.checkpoint_group, *c.shape[3:]) for c in checkpoints)
    dq, dk, dv, deta = (torch.empty_like(x) for x in (q, k, v, eta))
    dstate = tuple(torch.empty_like(d) for d in dfinal)
    dln_w = ln_w.new_empty(B, H, D)
    dln_b = ln_w.new_empty(B, H, D)
    _linear_backward_kernel[(B * H,)](
        q, k, v, eta, ln_w, ln_b, *checkpoints, dout, *dfinal, *scratch,
        dq, dk, dv, deta, *dstate, dln_w, dln_b,
        H, L, options.num_groups(L), options.checkpoint_group,
        D=D, num_warps=_num_warps(D), **options.constexprs())
    return dq, dk, dv, deta, dstate, dln_w, dln_b


_TTT_LINEAR = TritonOp(
    state_names=("w", "b"),
    state_shapes=lambda H, D, F: ((H, D, D), (H, D)),
    forward=_forward,
    backward=_backward,
    kernels=(_linear_forward_kernel, _linear_backward_kernel),
)


def ttt_linear_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                      w: torch.Tensor, b: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, *,
                      mini_batch_size: int = 16, initial_state: tuple[torch.Tensor, ...] | None = None,
                      return_state: bool = False, checkpoint_group: int = 4):
    """TTT-Linear with fused Triton forward and backward kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    q, k, v: (B, H, L, D); eta: (B, H, L); w (H, D, D), b (H, D), each optionally with a leading B;
    ln_weight, ln_bias (H, D); initial_state, if given, replaces (w, b) (each (H, ...) or (B, H, ...)).
    D and mini_batch_size must be powers of two >= 16. checkpoint_group: mini-batches per stored state.
    Returns out (B, H, L, D) in q's dtype and, with return_state, the final (w, b) (B, H, ...) in float32
    (float64 for float64 inputs). Differentiable in every tensor input.
    """
    state = tuple(initial_state) if initial_state is not None else (w, b)
    out, *final = apply_triton_op(_TTT_LINEAR, q, k, v, eta, ln_weight, ln_bias, state, mini_batch_size,
                                  checkpoint_group)
    return (out, tuple(final)) if return_state else out
