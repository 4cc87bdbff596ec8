"""TTT-MLP as fused Triton kernels: a forward and a hand-derived backward, one program per (batch, head).

Design: docs/design.md, "The TTT op contract"; docs/kernels.md, "Triton kernels".

Per (batch, head) the fp32 state is W1 (D, F), b1 (F,), W2 (F, D), b2 (D,). At D = 64, F = 256 it does not fit
on chip as whole tiles, so W1, b1, W2 live in a per-(batch, head) buffer in global memory (L2-resident) and are
walked in chunks of BF hidden columns (W1[:, c], b1[c], W2[c, :]); b2 and every (M, D) tensor stay in
registers. Mini-batch t takes rows [t M, t M + M) of Q, K, V (M, D) and eta (M,), T = V - K; rows past L are
zeros with eta = 0 and are never stored. One step (LN notation as in kernels/triton_common.py):

    Z1 = K W1 + b1 (M, F)    X2 = gelu(Z1) (M, F)    Z2 = X2 W2 + b2 (M, D)
    dZ2 = loss_grad(Z2, T, eta) (M, D)               the gradient of sum_i eta_i/2 ||LN(Z2_i) - T_i||^2
    dX2 = dZ2 W2^T (M, F)    dZ1 = dX2 * gelu'(Z1) (M, F)
    W1' = W1 - K^T dZ1    b1' = b1 - sum_rows dZ1    W2' = W2 - X2^T dZ2    b2' = b2 - sum_rows dZ2
    out = Q + LN(gelu(Q W1' + b1') W2' + b2')        (M, D)

Everything with an F dimension splits over chunks except Z2, Zq2 and dZ2, which sum over them. The forward
therefore makes two passes over the chunks per step: Z2 (then dZ2), then update each chunk and add its share
of Zq2 with the updated chunk. A pass reads chunks that other threads wrote in the previous one, hence a
`tl.debug_barrier()` between them.

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

In chunks, a backward step is four passes: Z2 (then dZ2); Zq2 (then dZq2); the read-out backward per chunk,
which completes G for the new state (stored) and accumulates the chunks' shares of C; after loss_grad_backward,
the update backward per chunk, which turns G into dL/d(old state) (stored). gW1, gb1, gW2 live in the output
gradient buffers (initialised with dL/d(final state)), gb2 in registers.

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
    gelu_tanh_grads,
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
def _load_chunk(w1_ptr, b1_ptr, w2_ptr, f0, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr, ACC: tl.constexpr):
    """Hidden columns [f0, f0 + BF) of the state: W1 (D, BF), b1 (BF,), W2 (BF, D)."""
    w1 = load_block(w1_ptr, 0, f0, F, D, BF, ACC)
    b1 = load_vector(b1_ptr + f0, BF, ACC)
    w2 = load_block(w2_ptr, f0, 0, D, BF, D, ACC)
    return w1, b1, w2


@triton.jit
def _store_chunk(w1_ptr, b1_ptr, w2_ptr, f0, w1, b1, w2, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr):
    store_block(w1_ptr, 0, f0, F, w1, D, BF)
    store_vector(b1_ptr + f0, b1, BF)
    store_block(w2_ptr, f0, 0, D, w2, BF, D)


@triton.jit
def _mlp_apply(x, w1_ptr, b1_ptr, w2_ptr, b2, M: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
               BF: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """f(x) = gelu(x W1 + b1) W2 + b2 (M, D), reading the state chunk by chunk."""
    z2 = tl.zeros([M, D], dtype=ACC) + b2[None, :]
    for f0 in range(0, F, BF):
        w1, b1, w2 = _load_chunk(w1_ptr, b1_ptr, w2_ptr, f0, D, F, BF, ACC)
        x2 = gelu_tanh(tl.dot(x, w1, input_precision=PRECISION) + b1[None, :])
        z2 += tl.dot(x2, w2, input_precision=PRECISION)
    return z2


@triton.jit
def _chunk_step(k, dz2, w1, b1, w2, PRECISION: tl.constexpr):
    """One step's intermediates on a hidden chunk given dZ2 (M, D): X2, gelu'(Z1), gelu''(Z1), dX2, dZ1 (M, BF)."""
    x2, gp, gpp = gelu_tanh_grads(tl.dot(k, w1, input_precision=PRECISION) + b1[None, :])
    dx2 = tl.dot(dz2, tl.trans(w2), input_precision=PRECISION)
    return x2, gp, gpp, dx2, dx2 * gp


@triton.jit
def _chunk_update(k, dz2, w1, b1, w2, x2, dz1, PRECISION: tl.constexpr):
    """The chunk after the step: W1' = W1 - K^T dZ1, b1' = b1 - sum_rows dZ1, W2' = W2 - X2^T dZ2."""
    w1n = w1 - tl.dot(tl.trans(k), dz1, input_precision=PRECISION)
    w2n = w2 - tl.dot(tl.trans(x2), dz2, input_precision=PRECISION)
    return w1n, b1 - tl.sum(dz1, axis=0), w2n


@triton.jit
def _new_chunk(k, dz2, w1_ptr, b1_ptr, w2_ptr, f0, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
               ACC: tl.constexpr, PRECISION: tl.constexpr):
    """The hidden chunk [f0, f0 + BF) of the state after the step: (W1' (D, BF), b1' (BF,), W2' (BF, D))."""
    w1, b1, w2 = _load_chunk(w1_ptr, b1_ptr, w2_ptr, f0, D, F, BF, ACC)
    x2, gp, gpp, dx2, dz1 = _chunk_step(k, dz2, w1, b1, w2, PRECISION)
    return _chunk_update(k, dz2, w1, b1, w2, x2, dz1, PRECISION)


@triton.jit
def _mlp_forward_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, ln_w_ptr, ln_b_ptr,
                        out_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                        w1_ckpt_ptr, b1_ckpt_ptr, w2_ckpt_ptr, b2_ckpt_ptr,
                        H, L, num_groups, group_size,
                        D: tl.constexpr, F: tl.constexpr, M: tl.constexpr, BF: tl.constexpr,
                        STORE_CHECKPOINTS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # (w1, b1, w2, b2)_ptr hold the initial state and are updated in place into the final state
    bh = tl.program_id(0).to(tl.int64)
    h = bh % H
    gamma = load_vector(ln_w_ptr + h * D, D, ACC)
    beta = load_vector(ln_b_ptr + h * D, D, ACC)
    w1_ptr += bh * D * F
    b1_ptr += bh * F
    w2_ptr += bh * F * D
    b2 = load_vector(b2_ptr + bh * D, D, ACC)
    seq = bh * L * D
    for t in range(0, tl.cdiv(L, M)):
        row0 = t * M
        k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
        v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
        eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
        q = load_rows(q_ptr + seq, row0, L, M, D, ACC)
        z2 = _mlp_apply(k, w1_ptr, b1_ptr, w2_ptr, b2, M, D, F, BF, ACC, PRECISION)
        dz2 = loss_grad(z2, v - k, eta, gamma, beta, D)
        ckpt = bh * num_groups + t // group_size
        if STORE_CHECKPOINTS:
            if t % group_size == 0:
                store_vector(b2_ckpt_ptr + ckpt * D, b2, D)
        b2 -= tl.sum(dz2, axis=0)
        # update the state chunk by chunk, accumulating the read-out f_{W'}(Q) on the way
        zq2 = tl.zeros([M, D], dtype=ACC) + b2[None, :]
        for f0 in range(0, F, BF):
            w1, b1, w2 = _load_chunk(w1_ptr, b1_ptr, w2_ptr, f0, D, F, BF, ACC)
            if STORE_CHECKPOINTS:
                if t % group_size == 0:
                    _store_chunk(w1_ckpt_ptr + ckpt * D * F, b1_ckpt_ptr + ckpt * F, w2_ckpt_ptr + ckpt * F * D, f0,
                                 w1, b1, w2, D, F, BF)
            x2, gp, gpp, dx2, dz1 = _chunk_step(k, dz2, w1, b1, w2, PRECISION)
            w1n, b1n, w2n = _chunk_update(k, dz2, w1, b1, w2, x2, dz1, PRECISION)
            _store_chunk(w1_ptr, b1_ptr, w2_ptr, f0, w1n, b1n, w2n, D, F, BF)
            xq2 = gelu_tanh(tl.dot(q, w1n, input_precision=PRECISION) + b1n[None, :])
            zq2 += tl.dot(xq2, w2n, input_precision=PRECISION)
        store_rows(out_ptr + seq, row0, L, q + layer_norm(zq2, gamma, beta, D), M, D)
        # the next step reads state chunks that other threads of this program wrote
        tl.debug_barrier()
    store_vector(b2_ptr + bh * D, b2, D)


@triton.jit
def _mlp_backward_kernel(q_ptr, k_ptr, v_ptr, eta_ptr, ln_w_ptr, ln_b_ptr,
                         w1_ckpt_ptr, b1_ckpt_ptr, w2_ckpt_ptr, b2_ckpt_ptr,
                         w1_scratch_ptr, b1_scratch_ptr, w2_scratch_ptr, b2_scratch_ptr,
                         dout_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                         dq_ptr, dk_ptr, dv_ptr, deta_ptr, dln_w_ptr, dln_b_ptr,
                         H, L, num_groups, group_size,
                         D: tl.constexpr, F: tl.constexpr, M: tl.constexpr, BF: tl.constexpr,
                         ACC: tl.constexpr, PRECISION: tl.constexpr):
    # (dw1, db1, dw2, db2)_ptr hold dL/d(final state) and are updated in place into dL/d(initial state)
    bh = tl.program_id(0).to(tl.int64)
    h = bh % H
    gamma = load_vector(ln_w_ptr + h * D, D, ACC)
    beta = load_vector(ln_b_ptr + h * D, D, ACC)
    dw1_ptr += bh * D * F
    db1_ptr += bh * F
    dw2_ptr += bh * F * D
    gb2 = load_vector(db2_ptr + bh * D, D, ACC)
    dgamma = tl.zeros([D], dtype=ACC)
    dbeta = tl.zeros([D], dtype=ACC)
    seq = bh * L * D
    num_steps = tl.cdiv(L, M)
    for i in range(0, num_groups):
        group = num_groups - 1 - i
        t0 = group * group_size
        n = tl.minimum(group_size, num_steps - t0)
        # scratch slot j holds the state before step t0 + j: slot 0 is the checkpoint, the rest are replayed
        ckpt = bh * num_groups + group
        slot = bh * group_size
        for f0 in range(0, F, BF):
            w1, b1, w2 = _load_chunk(w1_ckpt_ptr + ckpt * D * F, b1_ckpt_ptr + ckpt * F, w2_ckpt_ptr + ckpt * F * D,
                                     f0, D, F, BF, ACC)
            _store_chunk(w1_scratch_ptr + slot * D * F, b1_scratch_ptr + slot * F, w2_scratch_ptr + slot * F * D,
                         f0, w1, b1, w2, D, F, BF)
        store_vector(b2_scratch_ptr + slot * D, load_vector(b2_ckpt_ptr + ckpt * D, D, ACC), D)
        tl.debug_barrier()
        for j in range(0, n - 1):
            row0 = (t0 + j) * M
            src = bh * group_size + j
            dst = src + 1
            k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
            v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
            eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
            b2 = load_vector(b2_scratch_ptr + src * D, D, ACC)
            z2 = _mlp_apply(k, w1_scratch_ptr + src * D * F, b1_scratch_ptr + src * F, w2_scratch_ptr + src * F * D,
                            b2, M, D, F, BF, ACC, PRECISION)
            dz2 = loss_grad(z2, v - k, eta, gamma, beta, D)
            store_vector(b2_scratch_ptr + dst * D, b2 - tl.sum(dz2, axis=0), D)
            for f0 in range(0, F, BF):
                w1n, b1n, w2n = _new_chunk(k, dz2, w1_scratch_ptr + src * D * F, b1_scratch_ptr + src * F,
                                           w2_scratch_ptr + src * F * D, f0, D, F, BF, ACC, PRECISION)
                _store_chunk(w1_scratch_ptr + dst * D * F, b1_scratch_ptr + dst * F, w2_scratch_ptr + dst * F * D,
                             f0, w1n, b1n, w2n, D, F, BF)
            tl.debug_barrier()
        for j in range(0, n):
            jj = n - 1 - j
            row0 = (t0 + jj) * M
            s = bh * group_size + jj
            w1_ptr = w1_scratch_ptr + s * D * F
            b1_ptr = b1_scratch_ptr + s * F
            w2_ptr = w2_scratch_ptr + s * F * D
            q = load_rows(q_ptr + seq, row0, L, M, D, ACC)
            k = load_rows(k_ptr + seq, row0, L, M, D, ACC)
            v = load_rows(v_ptr + seq, row0, L, M, D, ACC)
            eta = load_row_scalars(eta_ptr + bh * L, row0, L, M, ACC)
            dout = load_rows(dout_ptr + seq, row0, L, M, D, ACC)
            b2 = load_vector(b2_scratch_ptr + s * D, D, ACC)
            z2 = _mlp_apply(k, w1_ptr, b1_ptr, w2_ptr, b2, M, D, F, BF, ACC, PRECISION)
            xh, r, e, dy, g, dz2 = loss_grad_parts(z2, v - k, eta, gamma, beta, D)
            zq2 = tl.zeros([M, D], dtype=ACC) + (b2 - tl.sum(dz2, axis=0))[None, :]
            for f0 in range(0, F, BF):
                w1n, b1n, w2n = _new_chunk(k, dz2, w1_ptr, b1_ptr, w2_ptr, f0, D, F, BF, ACC, PRECISION)
                xq2 = gelu_tanh(tl.dot(q, w1n, input_precision=PRECISION) + b1n[None, :])
                zq2 += tl.dot(xq2, w2n, input_precision=PRECISION)
            xq, rq = layer_norm_stats(zq2, D)
            dzq2, dgamma_out, dbeta_out = readout_backward(dout, xq, rq, gamma, D)
            gb2 += tl.sum(dzq2, axis=0)

            # read-out backward per chunk, completing dL/d(new state); then the chunk's share of dL/d(dZ2)
            dq = dout
            dk = tl.zeros([M, D], dtype=ACC)
            c = tl.zeros([M, D], dtype=ACC) - gb2[None, :]  # dL/d(dZ2) (M, D)
            for f0 in range(0, F, BF):
                w1, b1, w2 = _load_chunk(w1_ptr, b1_ptr, w2_ptr, f0, D, F, BF, ACC)
                x2, gp, gpp, dx2, dz1 = _chunk_step(k, dz2, w1, b1, w2, PRECISION)
                w1n, b1n, w2n = _chunk_update(k, dz2, w1, b1, w2, x2, dz1, PRECISION)
                xq2, gpq, gppq = gelu_tanh_grads(tl.dot(q, w1n, input_precision=PRECISION) + b1n[None, :])
                gw1, gb1, gw2 = _load_chunk(dw1_ptr, db1_ptr, dw2_ptr, f0, D, F, BF, ACC)
                gw2 += tl.dot(tl.trans(xq2), dzq2, input_precision=PRECISION)
                dzq1 = tl.dot(dzq2, tl.trans(w2n), input_precision=PRECISION) * gpq  # (M, BF)
                gw1 += tl.dot(tl.trans(q), dzq1, input_precision=PRECISION)
                gb1 += tl.sum(dzq1, axis=0)
                dq += tl.dot(dzq1, tl.trans(w1n), input_precision=PRECISION)
                _store_chunk(dw1_ptr, db1_ptr, dw2_ptr, f0, gw1, gb1, gw2, D, F, BF)
                dk -= tl.dot(dz1, tl.trans(gw1), input_precision=PRECISION)
                a = -(tl.dot(k, gw1, input_precision=PRECISION) + gb1[None, :])  # dL/d(dZ1) (M, BF)
                c += tl.dot(a * gp, w2, input_precision=PRECISION) - tl.dot(x2, gw2, input_precision=PRECISION)
            tl.debug_barrier()
            dz2_total, de, deta, dgamma_loss, dbeta_loss = loss_grad_backward(c, xh, r, e, dy, g, dz2, eta, gamma, D)
            dk += de
            gb2 += tl.sum(dz2_total, axis=0)

            # the update's backward per chunk, turning dL/d(new state) into dL/d(old state)
            for f0 in range(0, F, BF):
                w1, b1, w2 = _load_chunk(w1_ptr, b1_ptr, w2_ptr, f0, D, F, BF, ACC)
                x2, gp, gpp, dx2, dz1 = _chunk_step(k, dz2, w1, b1, w2, PRECISION)
                gw1, gb1, gw2 = _load_chunk(dw1_ptr, db1_ptr, dw2_ptr, f0, D, F, BF, ACC)
                a = -(tl.dot(k, gw1, input_precision=PRECISION) + gb1[None, :])
                dx2_total = (tl.dot(dz2_total, tl.trans(w2), input_precision=PRECISION)
                             - tl.dot(dz2, tl.trans(gw2), input_precision=PRECISION))  # (M, BF)
                dz1_total = dx2_total * gp + a * dx2 * gpp
                gw2 += (tl.dot(tl.trans(a * gp), dz2, input_precision=PRECISION)
                        + tl.dot(tl.trans(x2), dz2_total, input_precision=PRECISION))
                gw1 += tl.dot(tl.trans(k), dz1_total, input_precision=PRECISION)
                gb1 += tl.sum(dz1_total, axis=0)
                dk += tl.dot(dz1_total, tl.trans(w1), input_precision=PRECISION)
                _store_chunk(dw1_ptr, db1_ptr, dw2_ptr, f0, gw1, gb1, gw2, D, F, BF)
            # the next step (or group) reads gradient and scratch chunks that other threads wrote
            tl.debug_barrier()
            dgamma += dgamma_out + dgamma_loss
            dbeta += dbeta_out + dbeta_loss
            store_rows(dq_ptr + seq, row0, L, dq, M, D)
            store_rows(dk_ptr + seq, row0, L, dk, M, D)
            store_rows(dv_ptr + seq, row0, L, -de, M, D)
            store_row_scalars(deta_ptr + bh * L, row0, L, deta, M)
    store_vector(db2_ptr + bh * D, gb2, D)
    store_vector(dln_w_ptr + bh * D, dgamma, D)
    store_vector(dln_b_ptr + bh * D, dbeta, D)


def _launch_config(F: int, M: int) -> tuple[int, int]:
    """(hidden columns per chunk, warps): every on-chip tile stays at most 64 x 64 fp32 (16 KiB), and the
    (M, chunk) intermediates of a 64-row mini-batch are spread over twice the warps."""
    block_f = max(16, min(64 if M <= 16 else 32, F // 2))
    return block_f, 4 if M <= 16 else 8


def _forward(q, k, v, eta, ln_w, ln_b, state, options, store_checkpoints):
    B, H, L, D = q.shape
    F = state[0].shape[-1]
    out = torch.empty_like(q)
    final = tuple(s.clone() for s in state)  # updated in place by the kernel
    num_groups = options.num_groups(L)
    checkpoints = tuple(s.new_empty(B, H, num_groups, *s.shape[2:]) for s in state) if store_checkpoints else ()
    block_f, num_warps = _launch_config(F, options.mini_batch_size)
    _mlp_forward_kernel[(B * H,)](
        q, k, v, eta, ln_w, ln_b, out, *final, *(checkpoints or final),
        H, L, num_groups, options.checkpoint_group,
        D=D, F=F, BF=block_f, STORE_CHECKPOINTS=store_checkpoints, num_warps=num_warps, **options.constexprs())
    return out, final, checkpoints


def _backward(q, k, v, eta, ln_w, ln_b, checkpoints, dout, dfinal, options):
    B, H, L, D = q.shape
    F = checkpoints[0].shape[-1]
    scratch = tuple(c.new_empty(B, H, options.checkpoint_group, *c.shape[3:]) for c in checkpoints)
    dq, dk, dv, deta = (torch.empty_like(x) for x in (q, k, v, eta))
    dstate = tuple(d.clone() for d in dfinal)  # updated in place by the kernel
    dln_w = ln_w.new_empty(B, H, D)
    dln_b = ln_w.new_empty(B, H, D)
    block_f, num_warps = _launch_config(F, options.mini_batch_size)
    _mlp_backward_kernel[(B * H,)](
        q, k, v, eta, ln_w, ln_b, *checkpoints, *scratch, dout, *dstate,
        dq, dk, dv, deta, dln_w, dln_b,
        H, L, options.num_groups(L), options.checkpoint_group,
        D=D, F=F, BF=block_f, num_warps=num_warps, **options.constexprs())
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
