"""TTT-Linear backends: the plain-autograd reference and the torch backend (the Triton one loads on demand)."""

from .naive import ttt_linear_naive
from .torch_impl import ttt_linear_torch

__all__ = ["ttt_linear_naive", "ttt_linear_torch"]
