"""Shared helpers for testing TTT op backends against the plain-autograd reference.

Used by every kernel test module (torch and Triton backends): named cases with awkward sizes, a random input
builder, a relative error measure, and one check that compares output, final state and every gradient of a
backend with the float64 reference (`kernels/*/naive.py`). The naive reference itself is anchored to
`contract_reference`, the op contract written out here again without any code from kernels/.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

OPS = ("ttt_mlp", "ttt_linear")
REFERENCE = "reference"  # run_op backend name for the naive functions called directly, bypassing dispatch
CONTRACT = "contract"  # run_op backend name for `contract_reference`
STATE_NAMES = {"ttt_mlp": ("w1", "b1", "w2", "b2"), "ttt_linear": ("w", "b")}


@dataclass(frozen=True)
class Case:
    """One input configuration.

    per_sample: "none" (weights shared by the batch, (H, ...)), "weights" (weights with a leading B) or
    "initial_state" (shared weights replaced by a per-sample initial_state). eta_zeros: about a third of the
    tokens, and the whole last mini-batch, get eta = 0 (masked tokens, padding).
    """

    name: str
    B: int
    H: int
    L: int
    D: int = 8
    mini_batch_size: int = 16
    checkpoint_group: int = 2
    per_sample: str = "none"
    eta_zeros: bool = False

    def with_(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)


CASES = (
    Case("L63_m16", B=2, H=2, L=63),
    Case("L40_m16_short_tail", B=1, H=2, L=40, checkpoint_group=1),
    Case("L5_shorter_than_m", B=2, H=1, L=5),
    Case("B3_H1_odd", B=3, H=1, L=24, mini_batch_size=8, checkpoint_group=3),
    Case("m1", B=1, H=3, L=7, mini_batch_size=1, checkpoint_group=3),
    Case("per_sample_weights", B=2, H=3, L=20, mini_batch_size=8, per_sample="weights"),
    Case("per_sample_initial_state", B=3, H=2, L=20, mini_batch_size=8, per_sample="initial_state"),
    Case("eta_zeros", B=2, H=2, L=48, D=16, mini_batch_size=16, checkpoint_group=2, eta_zeros=True),
)
CASE_IDS = [c.name for c in CASES]


@dataclass
class OpInputs:
    """Inputs of one op call. Tensors: q, k, v (B, H, L, D); eta (B, H, L); weights in the op's state order,
    (H, ...) or (B, H, ...); ln_weight, ln_bias (H, D); initial_state None or per-sample (B, H, ...) tensors."""

    op_name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    eta: torch.Tensor
    weights: tuple[torch.Tensor, ...]
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    initial_state: tuple[torch.Tensor, ...] | None
    mini_batch_size: int
    checkpoint_group: int

    def leaves(self) -> dict[str, torch.Tensor]:
        """The tensors that the op must be differentiable in, by name (state under its weight names)."""
        state = self.initial_state if self.initial_state is not None else self.weights
        named = dict(q=self.q, k=self.k, v=self.v, eta=self.eta)
        named.update(zip(STATE_NAMES[self.op_name], state))
        named.update(ln_weight=self.ln_weight, ln_bias=self.ln_bias)
        return named

    def cast(self, dtype: torch.dtype, requires_grad: bool = True) -> OpInputs:
        """Fresh leaf copies in `dtype` (values rounded once, so a float64 copy of a cast holds the same numbers)."""

        def leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
            return t.detach().to(dtype).requires_grad_(grad)

        used_state = self.initial_state is None
        return dataclasses.replace(
            self,
            q=leaf(self.q, requires_grad), k=leaf(self.k, requires_grad), v=leaf(self.v, requires_grad),
            eta=leaf(self.eta, requires_grad),
            weights=tuple(leaf(w, requires_grad and used_state) for w in self.weights),
            ln_weight=leaf(self.ln_weight, requires_grad), ln_bias=leaf(self.ln_bias, requires_grad),
            initial_state=None if used_state else tuple(leaf(s, requires_grad) for s in self.initial_state),
        )


def make_inputs(op_name: str, case: Case, seed: int = 0, device: str | torch.device = "cpu") -> OpInputs:
    """Random float64 inputs for `case`, in the ranges the TTT layer produces.

    q, k are L2-normalised per token (as the layer does); eta is sized so that the state moves visibly over the
    sequence (a few tens of percent) without diverging, which makes every gradient path matter.
    """
    if op_name not in OPS:
        raise ValueError(f"op_name must be one of {OPS}, got {op_name!r}")
    g = torch.Generator().manual_seed(seed)
    B, H, L, D, m = case.B, case.H, case.L, case.D, case.mini_batch_size

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    q = torch.nn.functional.normalize(randn(B, H, L, D), dim=-1)
    k = torch.nn.functional.normalize(randn(B, H, L, D), dim=-1)
    v = randn(B, H, L, D)
    eta = torch.rand(B, H, L, generator=g, dtype=torch.float64) * (0.5 / min(m, L))
    if case.eta_zeros:
        eta = eta * (torch.rand(B, H, L, generator=g, dtype=torch.float64) > 1 / 3)
        eta[:, :, (math.ceil(L / m) - 1) * m:] = 0
    if op_name == "ttt_mlp":
        F = 4 * D
        shapes = ((H, D, F), (H, F), (H, F, D), (H, D))
        scales = (1 / math.sqrt(D), 0.1, 1 / math.sqrt(F), 0.1)
    else:
        shapes = ((H, D, D), (H, D))
        scales = (1 / math.sqrt(D), 0.1)
    lead = (B,) if case.per_sample == "weights" else ()
    weights = tuple(randn(*lead, *s, scale=sc) for s, sc in zip(shapes, scales))
    initial_state = None
    if case.per_sample == "initial_state":
        initial_state = tuple(randn(B, *s, scale=sc) for s, sc in zip(shapes, scales))
    ln_weight = 1 + randn(H, D, scale=0.2)
    ln_bias = randn(H, D, scale=0.2)
    inputs = OpInputs(op_name, q, k, v, eta, weights, ln_weight, ln_bias, initial_state, m, case.checkpoint_group)
    inputs = inputs.cast(torch.float64, requires_grad=False)
    return dataclasses.replace(
        inputs, **{f.name: _to(getattr(inputs, f.name), device) for f in dataclasses.fields(inputs)}
    )


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(t.to(device) for t in x)
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _inner_model(op_name: str, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """f_W(x) for x (M, D) and one head's state: (w1 (D, F), b1 (F,), w2 (F, D), b2 (D,)) or (w (D, D), b (D,))."""
    if op_name == "ttt_mlp":
        w1, b1, w2, b2 = state
        return _gelu_tanh(x @ w1 + b1) @ w2 + b2
    w, b = state
    return x @ w + b


def contract_reference(inputs: OpInputs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The TTT op contract written out one sample and one head at a time, sharing no code with kernels/.

    Per mini-batch t: W_t = W_{t-1} - grad_W sum_i eta_i 1/2 ||LN(f_W(k_i)) - (v_i - k_i)||^2 at W_{t-1}, by
    torch.autograd.grad (with create_graph, so the result stays differentiable), then out_j = q_j + LN(f_{W_t}(q_j)).
    LN is torch's layer_norm (eps 1e-6) with the head's affine. Computes in the inputs' dtype (use float64).
    Returns out (B, H, L, D) and the final state with a leading B, like the op with return_state.
    """
    B, H, L, D = inputs.q.shape
    m = inputs.mini_batch_size
    state = inputs.initial_state if inputs.initial_state is not None else inputs.weights
    per_sample = state[-1].dim() == 3  # the last bias: (H, D) shared or (B, H, D) per sample
    outs, finals = [], []
    for b in range(B):
        for h in range(H):
            weights = tuple(s[b, h] if per_sample else s[h] for s in state)
            weights = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in weights)

            def ln(x: torch.Tensor, h: int = h) -> torch.Tensor:
                return torch.nn.functional.layer_norm(x, (D,), inputs.ln_weight[h], inputs.ln_bias[h], eps=1e-6)

            rows = []
            for start in range(0, L, m):
                t = slice(start, start + m)  # the last mini-batch may be shorter
                q, k, v, eta = inputs.q[b, h, t], inputs.k[b, h, t], inputs.v[b, h, t], inputs.eta[b, h, t]
                losses = 0.5 * (ln(_inner_model(inputs.op_name, k, weights)) - (v - k)).square().sum(dim=-1)
                grads = torch.autograd.grad((eta * losses).sum(), weights, create_graph=True)
                weights = tuple(w - g for w, g in zip(weights, grads))
                rows.append(q + ln(_inner_model(inputs.op_name, q, weights)))
            outs.append(torch.cat(rows))
            finals.append(weights)
    out = torch.stack(outs).unflatten(0, (B, H))
    final = tuple(torch.stack([w[i] for w in finals]).unflatten(0, (B, H)) for i in range(len(state)))
    return out, final


def run_op(backend: str, inputs: OpInputs, return_state: bool = True, **extra):
    """Calls the op: `contract_reference` for backend CONTRACT, the naive reference for REFERENCE, else the public
    API with that backend."""
    if backend == CONTRACT:
        out, state = contract_reference(inputs)
        return (out, state) if return_state else out
    args = (inputs.q, inputs.k, inputs.v, inputs.eta, *inputs.weights, inputs.ln_weight, inputs.ln_bias)
    kwargs = dict(mini_batch_size=inputs.mini_batch_size, initial_state=inputs.initial_state,
                  return_state=return_state)
    if backend == REFERENCE:
        if inputs.op_name == "ttt_mlp":
            from kernels.ttt_mlp.naive import ttt_mlp_naive as fn
        else:
            from kernels.ttt_linear.naive import ttt_linear_naive as fn
        return fn(*args, **kwargs, **extra)
    import kernels

    fn = getattr(kernels, inputs.op_name)
    return fn(*args, **kwargs, checkpoint_group=inputs.checkpoint_group, backend=backend, **extra)


def forward_backward(backend: str, inputs: OpInputs, seed: int = 1, **extra):
    """Output, final state and the gradient of a random linear function of both, for every leaf.

    Returns (out, state, grads) with grads a dict name -> tensor (zeros where the op does not depend on a leaf).
    """
    out, state = run_op(backend, inputs, return_state=True, **extra)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum()
    for s in state:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s)).sum()
    leaves = inputs.leaves()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {n: torch.zeros_like(x) if gr is None else gr for (n, x), gr in zip(leaves.items(), grads)}
    return out.detach(), tuple(s.detach() for s in state), grads


def check_backend_against_reference(op_name: str, backend: str, case: Case, dtype: torch.dtype, tol: float, *,
                                    device: str | torch.device = "cpu", seed: int = 0,
                                    reference: str = REFERENCE) -> dict[str, float]:
    """Asserts that `backend` matches the float64 `reference` (the naive one unless told) within relative error `tol`.

    Compares the output, every final-state tensor and the gradient of every input (q, k, v, eta, the weights or
    the initial state, ln_weight, ln_bias), and that all of them are finite. The reference runs on the very
    values the backend sees (inputs rounded to `dtype`, then widened). Returns the errors by name.
    """
    base = make_inputs(op_name, case, seed=seed, device=device)
    test_in = base.cast(dtype)
    ref_in = test_in.cast(torch.float64)
    out, state, grads = forward_backward(backend, test_in)
    ref_out, ref_state, ref_grads = forward_backward(reference, ref_in)

    assert out.dtype == dtype, f"out dtype {out.dtype}, expected the input dtype {dtype}"
    want_state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for s in state:
        assert s.dtype == want_state_dtype, f"state dtype {s.dtype}, expected {want_state_dtype}"
    pairs = {"out": (out, ref_out)}
    pairs.update({f"state.{n}": (a, b) for n, a, b in zip(STATE_NAMES[op_name], state, ref_state)})
    pairs.update({f"grad.{n}": (grads[n], ref_grads[n]) for n in ref_grads})
    errors, failures = {}, []
    for name, (a, b) in pairs.items():
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)}, reference {tuple(b.shape)}"
        if not torch.isfinite(a).all():
            failures.append(f"{name}: not finite")
            continue
        errors[name] = rel_err(a, b)
        if errors[name] > tol:
            failures.append(f"{name}: rel err {errors[name]:.3g} > {tol:g}")
    assert not failures, f"{op_name}[{backend}, {case.name}, {dtype}]: " + "; ".join(failures)
    return errors
