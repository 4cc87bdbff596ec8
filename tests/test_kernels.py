"""The TTT ops' public API and torch backend against the plain-autograd reference (kernels/*/naive.py), and that
reference against the op contract written out again in the tests (kernel_testing.contract_reference).

Output, final state and every gradient in float64; the contract's properties (eta = 0 tokens do not update,
a sequence split in two calls with the state carried equals one call, low-precision inputs); activation
checkpointing (results independent of the group size, saved memory growing with L / (m * G)); validation.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import (
    CASE_IDS,
    CASES,
    CONTRACT,
    OPS,
    STATE_NAMES,
    Case,
    check_backend_against_reference,
    forward_backward,
    make_inputs,
    rel_err,
    run_op,
)

import kernels
from kernels.dispatch import resolve_backend


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("op_name", OPS)
def test_torch_backend_matches_reference_float64(op_name, case):
    check_backend_against_reference(op_name, "torch", case, torch.float64, tol=1e-6)


@pytest.mark.parametrize("op_name", OPS)
def test_torch_backend_matches_reference_float32(op_name):
    check_backend_against_reference(op_name, "torch", CASES[0], torch.float32, tol=1e-4)


@pytest.mark.parametrize("op_name", OPS)
def test_naive_backend_is_the_reference(op_name):
    check_backend_against_reference(op_name, "naive", CASES[0], torch.float64, tol=0.0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("op_name", OPS)
def test_naive_backend_follows_the_contract_written_out(op_name, case):
    """The reference every backend is held to is itself held to the contract, written again in the test."""
    check_backend_against_reference(op_name, "naive", case, torch.float64, tol=1e-11, reference=CONTRACT)


@pytest.mark.gpu
@pytest.mark.parametrize("op_name", OPS)
def test_torch_backend_on_cuda(op_name):
    check_backend_against_reference(op_name, "torch", CASES[0], torch.float64, tol=1e-6, device="cuda")


@pytest.mark.parametrize("op_name", OPS)
def test_tokens_with_eta_zero_do_not_update_the_state(op_name):
    inputs = make_inputs(op_name, Case("eta0", B=2, H=2, L=40, mini_batch_size=16, per_sample="weights"))
    _, state = run_op("torch", inputs)
    for s, w in zip(state, inputs.weights):
        assert not torch.allclose(s, w), "the test inputs must move the state"

    frozen = inputs.cast(torch.float64, requires_grad=False)
    frozen.eta = torch.zeros_like(frozen.eta)
    out, state = run_op("torch", frozen)
    for s, w in zip(state, frozen.weights):
        torch.testing.assert_close(s, w, rtol=0, atol=0)
    # with the initial state throughout, out = q + LN(f_W0(q)): the naive read-out of a zero-step sequence
    torch.testing.assert_close(out, run_op("naive", frozen, return_state=False), rtol=1e-12, atol=1e-12)

    # keys and values of masked tokens do not matter, whatever they are
    masked = frozen.cast(torch.float64, requires_grad=False)
    masked.eta = inputs.eta.clone()
    masked.eta[:, :, 3::4] = 0
    out_a, state_a = run_op("torch", masked)
    masked.k[:, :, 3::4] = torch.randn_like(masked.k[:, :, 3::4])
    masked.v[:, :, 3::4] = 100.0
    out_b, state_b = run_op("torch", masked)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-13)
    for a, b in zip(state_a, state_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("op_name", OPS)
def test_two_calls_with_carried_state_equal_one_call(op_name):
    """Continuing a story: out and final state, and every gradient (also through the carried state)."""
    m, split = 8, 24
    whole = make_inputs(op_name, Case("split", B=2, H=2, L=44, mini_batch_size=m, checkpoint_group=2)).cast(
        torch.float64)
    out, state, grads = forward_backward("torch", whole)

    first, second = whole.cast(torch.float64), whole.cast(torch.float64)
    for name in ("q", "k", "v"):
        setattr(first, name, getattr(whole, name)[:, :, :split])
        setattr(second, name, getattr(whole, name)[:, :, split:])
    first.eta, second.eta = whole.eta[:, :, :split], whole.eta[:, :, split:]
    first.weights = second.weights = whole.weights
    first.ln_weight = second.ln_weight = whole.ln_weight
    first.ln_bias = second.ln_bias = whole.ln_bias
    out_1, state_1 = run_op("torch", first)
    second.initial_state = state_1
    out_2, state_2 = run_op("torch", second)

    torch.testing.assert_close(torch.cat([out_1, out_2], dim=2), out, rtol=1e-12, atol=1e-12)
    for a, b in zip(state_2, state):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)  # the same random cotangents as forward_backward draws
    g_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    loss = (torch.cat([out_1, out_2], dim=2) * g_out).sum()
    for s in state_2:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64)).sum()
    leaves = whole.leaves()
    split_grads = torch.autograd.grad(loss, list(leaves.values()))
    for name, gr in zip(leaves, split_grads):
        assert rel_err(gr, grads[name]) < 1e-10, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op_name", OPS)
def test_low_precision_inputs_match_float32(op_name, dtype):
    case = Case("half", B=2, H=2, L=40, D=16, mini_batch_size=16)
    low = make_inputs(op_name, case).cast(dtype)
    out, state, grads = forward_backward("torch", low)
    assert out.dtype == dtype
    assert all(s.dtype == torch.float32 for s in state)
    ref_out, ref_state, ref_grads = forward_backward("torch", low.cast(torch.float32))
    pairs = [("out", out, ref_out)] + [(n, a, b) for n, a, b in zip(STATE_NAMES[op_name], state, ref_state)]
    pairs += [(f"grad.{n}", grads[n], ref_grads[n]) for n in grads]
    for name, a, b in pairs:
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-2, name


@pytest.mark.parametrize("op_name", OPS)
def test_checkpoint_group_does_not_change_results(op_name):
    base = make_inputs(op_name, Case("groups", B=1, H=2, L=70, mini_batch_size=8))
    results = []
    for group in (1, 2, 5):
        inputs = base.cast(torch.float64)
        inputs.checkpoint_group = group
        results.append(forward_backward("torch", inputs))
    (out, state, grads), others = results[0], results[1:]
    for out_g, state_g, grads_g in others:
        assert torch.equal(out_g, out)
        assert all(torch.equal(a, b) for a, b in zip(state_g, state))
        for name in grads:
            torch.testing.assert_close(grads_g[name], grads[name], rtol=1e-13, atol=1e-15)


def _saved_bytes(op_name: str, inputs) -> int:
    """Bytes that autograd keeps for backward during one forward (each distinct storage counted once)."""
    storages = {}

    def pack(t):
        storages[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_op("torch", inputs)
    return sum(storages.values())


@pytest.mark.parametrize("op_name", OPS)
def test_backward_memory_grows_with_checkpoints_not_tokens(op_name):
    m, D = 8, 8
    for L, group in ((64, 1), (64, 4), (256, 4), (256, 16), (251, 3)):
        inputs = make_inputs(op_name, Case("mem", B=1, H=2, L=L, D=D, mini_batch_size=m, checkpoint_group=group))
        inputs = inputs.cast(torch.float64)
        state_bytes = sum(w.numel() * 8 for w in inputs.weights)
        input_bytes = sum(t.numel() * 8 for t in (inputs.q, inputs.k, inputs.v, inputs.eta, inputs.ln_weight,
                                                      inputs.ln_bias))
        checkpoints = math.ceil((math.ceil(L / m) + 1) / group)
        # the inputs themselves, plus one state per group of `group` mini-batches: nothing per token
        assert _saved_bytes(op_name, inputs) == input_bytes + checkpoints * state_bytes, (L, group)


def test_backend_names_are_validated():
    inputs = make_inputs("ttt_linear", CASES[0])
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton', 'naive'\), got 'cuda'"):
        run_op("cuda", inputs)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(None, inputs.q)
    assert resolve_backend("auto", inputs.q) == "torch"
    assert resolve_backend("naive", inputs.q) == "naive"


@pytest.mark.gpu
def test_auto_backend_picks_triton_on_cuda():
    assert resolve_backend("auto", torch.zeros(1, device="cuda")) == "triton"


def test_auto_backend_runs_torch_on_cpu():
    inputs = make_inputs("ttt_mlp", CASES[0])
    torch.testing.assert_close(run_op("auto", inputs)[0], run_op("torch", inputs)[0], rtol=0, atol=0)


def _mlp_args(B=2, H=2, L=10, D=8, F=32):
    return dict(q=torch.zeros(B, H, L, D), k=torch.zeros(B, H, L, D), v=torch.zeros(B, H, L, D),
                eta=torch.zeros(B, H, L), w1=torch.zeros(H, D, F), b1=torch.zeros(H, F), w2=torch.zeros(H, F, D),
                b2=torch.zeros(H, D), ln_weight=torch.ones(H, D), ln_bias=torch.zeros(H, D))


@pytest.mark.parametrize("change, message", [
    (dict(mini_batch_size=0), "mini_batch_size must be an integer >= 1, got 0"),
    (dict(checkpoint_group=1.5), "checkpoint_group must be an integer >= 1, got 1.5"),
    (dict(eta=torch.zeros(2, 2, 9)), r"eta must be \(B, H, L\) = \(2, 2, 10\), got \(2, 2, 9\)"),
    (dict(k=torch.zeros(2, 2, 10, 4)), "q, k, v must share one shape"),
    (dict(v=torch.zeros(2, 2, 10, 8, dtype=torch.float64)), "q, k, v must share one dtype"),
    (dict(w1=torch.zeros(2, 6, 32)), r"w1 must have shape \(2, 8, 32\) or \(2, 2, 8, 32\), got \(2, 6, 32\)"),
    (dict(w2=torch.zeros(3, 2, 32, 8)), r"w2 must have shape \(2, 32, 8\) or \(2, 2, 32, 8\), got \(3, 2, 32, 8\)"),
    (dict(ln_bias=torch.zeros(2, 2, 8)), r"ln_bias must have shape \(H, D\) = \(2, 8\), got \(2, 2, 8\)"),
    (dict(initial_state=(torch.zeros(2, 8, 32),) * 4), r"initial_state.w1 must have shape \(2, 2, 8, 32\)"),
    (dict(initial_state=(torch.zeros(2, 2, 8, 32),)), r"initial_state must be a tuple of 4 tensors \(w1, b1, w2, b2\)"),
    (dict(eta=torch.zeros(2, 2, 10, dtype=torch.long)), "eta must be a floating-point tensor"),
])
def test_mlp_inputs_are_validated(change, message):
    args = _mlp_args()
    args.update(change)
    with pytest.raises(ValueError, match=message):
        kernels.ttt_mlp(**args)


def test_linear_inputs_are_validated():
    B, H, L, D = 1, 3, 5, 8
    qkv = [torch.zeros(B, H, L, D) for _ in range(3)]
    with pytest.raises(ValueError, match=r"w must have shape \(3, 8, 8\) or \(1, 3, 8, 8\), got \(3, 8, 4\)"):
        kernels.ttt_linear(*qkv, torch.zeros(B, H, L), torch.zeros(H, D, 4), torch.zeros(H, D), torch.ones(H, D),
                           torch.zeros(H, D))
    with pytest.raises(ValueError, match=r"b must have shape"):
        kernels.ttt_linear(*qkv, torch.zeros(B, H, L), torch.zeros(H, D, D), torch.zeros(H, 4), torch.ones(H, D),
                           torch.zeros(H, D))


@pytest.mark.parametrize("op_name", OPS)
def test_autocast_region_does_not_lower_the_state_precision(op_name):
    inputs = make_inputs(op_name, CASES[0]).cast(torch.float32)
    out, state, grads = forward_backward("torch", inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, state_ac, grads_ac = forward_backward("torch", inputs.cast(torch.float32))
    assert out_ac.dtype == torch.float32
    torch.testing.assert_close(out_ac, out, rtol=0, atol=0)
    for a, b in zip(state_ac, state):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=0, atol=0)
