"""The Triton TTT kernels (kernels/*/triton_impl.py) against the float64 reference (kernels/*/naive.py).

Without CUDA the kernels run on Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay
tiny: D = 16 (F = 64, which the MLP kernels walk in two hidden chunks of 32), m = 16, B*H <= 4, L <= 80. The
file starts with a plain-PyTorch mirror of the kernels' per-mini-batch maths (the hand-derived backward written
in the kernels' module docstrings), checked against autograd; then the kernels themselves: output, final state
and every gradient against the reference.
`gpu` tests run the release shapes (D = 64, F = 256, m = 16 and 64, fp32 and bf16) where CUDA exists.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import OPS, Case, check_backend_against_reference, make_inputs, rel_err, run_op

from kernels.common import LN_EPS
from kernels.ttt_linear import triton_impl as linear_triton
from kernels.ttt_mlp import triton_impl as mlp_triton

# ---- plain-PyTorch mirror of one mini-batch, one head: q, k, v (M, D), eta (M,), gamma, beta (D,) ----


def _gelu(x):
    """gelu_tanh and its first two derivatives, as in triton_common.gelu_tanh."""
    s, c = math.sqrt(2 / math.pi), 0.044715
    t = torch.tanh(s * (x + c * x ** 3))
    du = s * (1 + 3 * c * x * x)
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du, (1 - t * t) * (
        du - x * t * du * du + 3 * s * c * x * x)


def _ln(z, gamma, beta):
    zc = z - z.mean(-1, keepdim=True)
    r = torch.rsqrt((zc * zc).mean(-1, keepdim=True) + LN_EPS)
    return zc * r, r, gamma * zc * r + beta


def _ln_backward(xh, r, dxh):
    D = xh.shape[-1]
    return (r / D) * (D * dxh - dxh.sum(-1, keepdim=True) - xh * (dxh * xh).sum(-1, keepdim=True))


def _loss_grad(z, target, eta, gamma, beta):
    xh, r, y = _ln(z, gamma, beta)
    e = y - target
    dy = eta[:, None] * e
    g = gamma * dy
    return xh, r, e, dy, g, _ln_backward(xh, r, g)


def _loss_grad_backward(c, xh, r, e, dy, g, dz, eta, gamma):
    D = xh.shape[-1]
    dg = _ln_backward(xh, r, c)
    ddy = gamma * dg
    de = eta[:, None] * ddy
    dxh = gamma * de - (r / D) * (c * (g * xh).sum(-1, keepdim=True) + g * (c * xh).sum(-1, keepdim=True))
    dz_total = _ln_backward(xh, r, dxh) - (r / D) * (c * dz).sum(-1, keepdim=True) * xh
    return dz_total, de, (ddy * e).sum(-1), (dg * dy + de * xh).sum(0), de.sum(0)


def _mlp_step(state, q, k, v, eta, gamma, beta, dout=None, grad_state=None):
    """One TTT-MLP mini-batch: (new state, out) forward; with dout and grad_state (dL/d new state), the
    hand-derived backward instead: (dq, dk, dv, deta, dgamma, dbeta, dL/d old state)."""
    w1, b1, w2, b2 = state
    z1 = k @ w1 + b1
    x2, gp, gpp = _gelu(z1)
    xh, r, e, dy, g, dz2 = _loss_grad(x2 @ w2 + b2, v - k, eta, gamma, beta)
    dx2 = dz2 @ w2.T
    dz1 = dx2 * gp
    w1n, b1n, w2n, b2n = w1 - k.T @ dz1, b1 - dz1.sum(0), w2 - x2.T @ dz2, b2 - dz2.sum(0)
    xq2, gpq, _ = _gelu(q @ w1n + b1n)
    xq, rq, y = _ln(xq2 @ w2n + b2n, gamma, beta)
    if dout is None:
        return (w1n, b1n, w2n, b2n), q + y
    gw1, gb1, gw2, gb2 = grad_state
    dzq2 = _ln_backward(xq, rq, gamma * dout)
    gw2, gb2 = gw2 + xq2.T @ dzq2, gb2 + dzq2.sum(0)
    dzq1 = (dzq2 @ w2n.T) * gpq
    gw1, gb1 = gw1 + q.T @ dzq1, gb1 + dzq1.sum(0)
    dq = dout + dzq1 @ w1n.T
    dk = -dz1 @ gw1.T
    a = -(k @ gw1 + gb1)
    c = -(x2 @ gw2 + gb2)
    dx2_total = -dz2 @ gw2.T
    ddx2 = a * gp
    dz1_total = a * dx2 * gpp
    c = c + ddx2 @ w2
    gw2 = gw2 + ddx2.T @ dz2
    dz2_total, de, deta, dgamma, dbeta = _loss_grad_backward(c, xh, r, e, dy, g, dz2, eta, gamma)
    dx2_total = dx2_total + dz2_total @ w2.T
    gw2, gb2 = gw2 + x2.T @ dz2_total, gb2 + dz2_total.sum(0)
    dz1_total = dz1_total + dx2_total * gp
    gw1, gb1 = gw1 + k.T @ dz1_total, gb1 + dz1_total.sum(0)
    dk = dk + de + dz1_total @ w1.T
    return dq, dk, -de, deta, dgamma + (dout * xq).sum(0), dbeta + dout.sum(0), (gw1, gb1, gw2, gb2)


def _linear_step(state, q, k, v, eta, gamma, beta, dout=None, grad_state=None):
    """One TTT-Linear mini-batch, forward or hand-derived backward as in `_mlp_step`."""
    w, b = state
    xh, r, e, dy, g, dz = _loss_grad(k @ w + b, v - k, eta, gamma, beta)
    wn, bn = w - k.T @ dz, b - dz.sum(0)
    xq, rq, y = _ln(q @ wn + bn, gamma, beta)
    if dout is None:
        return (wn, bn), q + y
    gw, gb = grad_state
    dzq = _ln_backward(xq, rq, gamma * dout)
    gw, gb = gw + q.T @ dzq, gb + dzq.sum(0)
    dq = dout + dzq @ wn.T
    dk = -dz @ gw.T
    dz_total, de, deta, dgamma, dbeta = _loss_grad_backward(-(k @ gw + gb), xh, r, e, dy, g, dz, eta, gamma)
    gw, gb = gw + k.T @ dz_total, gb + dz_total.sum(0)
    dk = dk + de + dz_total @ w.T
    return dq, dk, -de, deta, dgamma + (dout * xq).sum(0), dbeta + dout.sum(0), (gw, gb)


@pytest.mark.parametrize("op_name", OPS)
def test_mirror_backward_matches_autograd(op_name):
    torch.manual_seed(0)
    M, D = 8, 4
    shapes = ((D, 4 * D), (4 * D,), (4 * D, D), (D,)) if op_name == "ttt_mlp" else ((D, D), (D,))
    step = _mlp_step if op_name == "ttt_mlp" else _linear_step
    state = [torch.randn(s, dtype=torch.float64) * 0.5 for s in shapes]
    q, k, v = (torch.randn(M, D, dtype=torch.float64) for _ in range(3))
    eta = torch.rand(M, dtype=torch.float64)
    eta[2] = 0.0
    gamma, beta = 1 + 0.3 * torch.randn(D, dtype=torch.float64), 0.2 * torch.randn(D, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (*state, q, k, v, eta, gamma, beta)]

    new_state, out = step(state, q, k, v, eta, gamma, beta)
    dout = torch.randn_like(out)
    grad_state = [torch.randn_like(s) for s in new_state]
    loss = (out * dout).sum() + sum((s * gs).sum() for s, gs in zip(new_state, grad_state))
    expected = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        dq, dk, dv, deta, dgamma, dbeta, dstate = step(state, q, k, v, eta, gamma, beta, dout, grad_state)
    for name, got, want in zip(
            ("state",) * len(state) + ("q", "k", "v", "eta", "gamma", "beta"),
            (*dstate, dq, dk, dv, deta, dgamma, dbeta), expected):
        assert rel_err(got, want) < 1e-12, f"{op_name} mirror: d{name} rel err {rel_err(got, want):.3g}"


# ---- the kernels ----

# with CUDA the same tests run the compiled kernels (conftest sets TRITON_INTERPRET only without CUDA)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TRITON_CASES = (
    Case("L63_m16_G3", B=2, H=2, L=63, D=16, checkpoint_group=3),
    Case("L80_B3_H1_G1", B=3, H=1, L=80, D=16, checkpoint_group=1),
    Case("L5_shorter_than_m", B=2, H=1, L=5, D=16),
    Case("per_sample_weights", B=2, H=2, L=40, D=16, per_sample="weights", checkpoint_group=5),
    Case("per_sample_initial_state", B=2, H=2, L=33, D=16, per_sample="initial_state", checkpoint_group=3),
    Case("eta_zeros", B=2, H=2, L=48, D=16, eta_zeros=True),
)


def test_tiny_mlp_shapes_walk_several_hidden_chunks():
    # the interpreter tests only cover the MLP kernels' chunk loops if F = 64 takes more than one chunk
    block_f, _ = mlp_triton._launch_config(64, 16)
    assert 64 // block_f >= 2


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c.name for c in TRITON_CASES])
@pytest.mark.parametrize("op_name", OPS)
def test_triton_matches_reference_float32(op_name, case):
    check_backend_against_reference(op_name, "triton", case, torch.float32, tol=1e-4, device=DEVICE)


@pytest.mark.parametrize("op_name", OPS)
def test_triton_backward_is_exact_in_float64(op_name):
    # in float64 the kernels agree with autograd to rounding: the hand-derived backward has no approximation
    check_backend_against_reference(op_name, "triton", TRITON_CASES[0], torch.float64, tol=1e-10, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op_name", OPS)
def test_triton_low_precision_inputs(op_name, dtype):
    # inputs, output and input gradients in bf16/fp16; the state, every accumulation and the final state in fp32
    check_backend_against_reference(op_name, "triton", Case("low_precision", B=1, H=2, L=40, D=16), dtype, tol=1e-2,
                                    device=DEVICE)


class _LaunchCounter:
    """Wraps a Triton kernel and counts its launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("op_name", OPS)
def test_interpreter_runs_the_triton_kernels(op_name, monkeypatch):
    module, prefix = (mlp_triton, "_mlp") if op_name == "ttt_mlp" else (linear_triton, "_linear")
    counters = {}
    for which in ("forward", "backward"):
        name = f"{prefix}_{which}_kernel"
        kernel = getattr(module, name)
        if not torch.cuda.is_available():
            from triton.runtime.interpreter import InterpretedFunction

            assert isinstance(kernel, InterpretedFunction), f"{name} is not running on Triton's interpreter"
        counters[which] = _LaunchCounter(kernel)
        monkeypatch.setattr(module, name, counters[which])
    case = Case("spy", B=2, H=2, L=20, D=16)
    inputs = make_inputs(op_name, case, device=DEVICE).cast(torch.float32)
    out = run_op("triton", inputs, return_state=False)
    out.sum().backward()
    assert counters["forward"].grids == [(4,)] and counters["backward"].grids == [(4,)]
    assert torch.isfinite(inputs.q.grad).all()


@pytest.mark.parametrize("op_name", OPS)
def test_forward_without_grad_matches(op_name):
    # without inputs that need grad the forward skips its checkpoint stores: same output and state
    inputs = make_inputs(op_name, TRITON_CASES[0], device=DEVICE).cast(torch.float32)
    out, state = run_op("triton", inputs)
    with torch.no_grad():
        out_ng, state_ng = run_op("triton", inputs)
    torch.testing.assert_close(out_ng, out, rtol=0, atol=0)
    for a, b in zip(state_ng, state):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("change", "message"), [
    (dict(D=8), "head dim D must be a power of two >= 16, got 8"),
    (dict(D=24), "head dim D must be a power of two >= 16, got 24"),
    (dict(mini_batch_size=8), "mini_batch_size must be a power of two >= 16, got 8"),
])
def test_unsupported_sizes_are_refused(change, message):
    inputs = make_inputs("ttt_mlp", Case("bad", B=1, H=1, L=20, D=16).with_(**change)).cast(torch.float32)
    with pytest.raises(ValueError, match=message):
        run_op("triton", inputs)


def test_inner_width_must_be_a_power_of_two():
    H, D, F = 1, 16, 48
    q, k, v = (torch.randn(1, H, 20, D) for _ in range(3))
    weights = (torch.randn(H, D, F), torch.zeros(H, F), torch.randn(H, F, D), torch.zeros(H, D))
    with pytest.raises(ValueError, match="inner width F must be a power of two >= 16, got 48"):
        mlp_triton.ttt_mlp_triton(q, k, v, torch.rand(1, H, 20), *weights, torch.ones(H, D), torch.zeros(H, D),
                                  mini_batch_size=16)


GPU_CASES = (
    Case("D64_m16", B=2, H=3, L=200, D=64, mini_batch_size=16, checkpoint_group=4),
    Case("D64_m64", B=1, H=4, L=300, D=64, mini_batch_size=64, checkpoint_group=3, per_sample="initial_state"),
)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
@pytest.mark.parametrize("op_name", OPS)
def test_triton_on_cuda(op_name, case, dtype, tol):
    check_backend_against_reference(op_name, "triton", case, dtype, tol=tol, device="cuda")
