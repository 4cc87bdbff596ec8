"""The public TTT ops: validate the inputs once, at the boundary, then hand them to the chosen backend.

Backends: "torch" (kernels/*/torch_impl.py, any device), "triton" (kernels/*/triton_impl.py, CUDA; imported only
when asked for), "naive" (the plain-autograd reference, for tests) and "auto" (triton on CUDA tensors, torch
otherwise). Design: docs/design.md, "The TTT op contract".
"""

from __future__ import annotations

import torch

from .ttt_linear import ttt_linear_naive, ttt_linear_torch
from .ttt_mlp import ttt_mlp_naive, ttt_mlp_torch

BACKENDS = ("auto", "torch", "triton", "naive")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend for `backend` (one of BACKENDS) and tensors on q's device."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda else "torch"
    return backend


def _check_qkv_eta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor) -> tuple[int, int, int, int]:
    """Checks q, k, v (B, H, L, D) and eta (B, H, L); returns (B, H, L, D)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if eta.shape != q.shape[:3]:
        raise ValueError(f"eta must be (B, H, L) = {tuple(q.shape[:3])}, got {tuple(eta.shape)}")
    return tuple(q.shape)


def _check_state(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], shapes: tuple[tuple[int, ...], ...],
                 batch: int, per_sample_only: bool = False) -> None:
    """Checks that tensors[i] has shape shapes[i] (shared by the batch) or (batch, *shapes[i]) (per sample)."""
    if len(tensors) != len(names):
        raise ValueError(f"expected {len(names)} state tensors ({', '.join(names)}), got {len(tensors)}")
    for name, t, shape in zip(names, tensors, shapes):
        per_sample = (batch, *shape)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape {per_sample}, got {type(t).__name__}")
        if tuple(t.shape) == per_sample or (tuple(t.shape) == shape and not per_sample_only):
            continue
        want = str(per_sample) if per_sample_only else f"{shape} or {per_sample}"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_common(q, k, v, eta, ln_weight, ln_bias, mini_batch_size, checkpoint_group) -> tuple[int, int, int, int]:
    for name, value in (("mini_batch_size", mini_batch_size), ("checkpoint_group", checkpoint_group)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("eta", eta), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, L, D = _check_qkv_eta(q, k, v, eta)
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tuple(t.shape) != (H, D):
            raise ValueError(f"{name} must have shape (H, D) = {(H, D)}, got {tuple(t.shape)}")
    _check_device(q, k=k, v=v, eta=eta, ln_weight=ln_weight, ln_bias=ln_bias)
    return B, H, L, D


def _check_device(q: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")


def _check_weights(q, names, weights, shapes, initial_state, B) -> None:
    _check_state(names, weights, shapes, B)
    _check_device(q, **dict(zip(names, weights)))
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != len(names):
            got = len(initial_state) if isinstance(initial_state, (tuple, list)) else type(initial_state).__name__
            raise ValueError(f"initial_state must be a tuple of {len(names)} tensors ({', '.join(names)}), got {got}")
        names = tuple(f"initial_state.{n}" for n in names)
        _check_state(names, tuple(initial_state), shapes, B, per_sample_only=True)
        _check_device(q, **dict(zip(names, initial_state)))


def ttt_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, w1: torch.Tensor,
            b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, *,
            mini_batch_size: int = 64, initial_state: tuple[torch.Tensor, ...] | None = None,
            return_state: bool = False, checkpoint_group: int = 4, backend: str = "auto"):
    """TTT-MLP: a two-layer MLP per head, trained by one gradient step per mini-batch while reading the sequence.

    Inner model f(x) = gelu_tanh(x W1 + b1) W2 + b2; per mini-batch of m tokens, W <- W - sum_i eta_i grad l_i(W)
    with l_i = 1/2 ||LN(f(k_i)) - (v_i - k_i)||^2, then out_j = q_j + LN(f(q_j)) with the updated W.

    q, k, v: (B, H, L, D), any L (the last mini-batch may be shorter); eta: (B, H, L), the per-token inner step
    (0 = no update). w1 (H, D, F), b1 (H, F), w2 (H, F, D), b2 (H, D), each optionally with a leading B for
    per-sample state. ln_weight, ln_bias: (H, D), LayerNorm over D (eps 1e-6). initial_state: optional
    (w1, b1, w2, b2) with a leading B that replaces the weights (e.g. a previous call's final state).
    checkpoint_group: the torch backend keeps the state every this many mini-batches for backward.
    backend: one of "auto", "torch", "triton", "naive".
    Returns out (B, H, L, D) in q's dtype; with return_state, (out, (w1, b1, w2, b2)) with a leading B, in
    float32 (float64 for float64 inputs). Differentiable in every tensor input.
    """
    B, H, L, D = _check_common(q, k, v, eta, ln_weight, ln_bias, mini_batch_size, checkpoint_group)
    if w1.dim() not in (3, 4):
        raise ValueError(f"w1 must be (H, D, F) or (B, H, D, F), got {tuple(w1.shape)}")
    F = w1.shape[-1]
    _check_weights(q, ("w1", "b1", "w2", "b2"), (w1, b1, w2, b2), ((H, D, F), (H, F), (H, F, D), (H, D)),
                   initial_state, B)
    kwargs = dict(mini_batch_size=mini_batch_size, initial_state=initial_state, return_state=return_state)
    backend = resolve_backend(backend, q)
    if backend == "naive":
        return ttt_mlp_naive(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias, **kwargs)
    fn = ttt_mlp_torch
    if backend == "triton":
        from .ttt_mlp.triton_impl import ttt_mlp_triton as fn
    return fn(q, k, v, eta, w1, b1, w2, b2, ln_weight, ln_bias, checkpoint_group=checkpoint_group, **kwargs)


def ttt_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, w: torch.Tensor,
               b: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, *, mini_batch_size: int = 16,
               initial_state: tuple[torch.Tensor, ...] | None = None, return_state: bool = False,
               checkpoint_group: int = 4, backend: str = "auto"):
    """TTT-Linear: a linear map per head, trained by one gradient step per mini-batch while reading the sequence.

    Inner model f(x) = x W + b; per mini-batch of m tokens, W <- W - sum_i eta_i grad l_i(W) with
    l_i = 1/2 ||LN(f(k_i)) - (v_i - k_i)||^2, then out_j = q_j + LN(f(q_j)) with the updated W.

    q, k, v: (B, H, L, D), any L; eta: (B, H, L); w (H, D, D), b (H, D), each optionally with a leading B;
    ln_weight, ln_bias: (H, D); initial_state: optional (w, b) with a leading B that replaces the weights.
    checkpoint_group and backend as in `ttt_mlp`.
    Returns out (B, H, L, D) in q's dtype; with return_state, (out, (w, b)) with a leading B, in float32
    (float64 for float64 inputs). Differentiable in every tensor input.
    """
    B, H, L, D = _check_common(q, k, v, eta, ln_weight, ln_bias, mini_batch_size, checkpoint_group)
    _check_weights(q, ("w", "b"), (w, b), ((H, D, D), (H, D)), initial_state, B)
    kwargs = dict(mini_batch_size=mini_batch_size, initial_state=initial_state, return_state=return_state)
    backend = resolve_backend(backend, q)
    if backend == "naive":
        return ttt_linear_naive(q, k, v, eta, w, b, ln_weight, ln_bias, **kwargs)
    fn = ttt_linear_torch
    if backend == "triton":
        from .ttt_linear.triton_impl import ttt_linear_triton as fn
    return fn(q, k, v, eta, w, b, ln_weight, ln_bias, checkpoint_group=checkpoint_group, **kwargs)
