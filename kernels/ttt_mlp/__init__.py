"""TTT-MLP backends: the plain-autograd reference and the torch backend (the Triton one loads on demand)."""

from .naive import ttt_mlp_naive
from .torch_impl import ttt_mlp_torch

__all__ = ["ttt_mlp_naive", "ttt_mlp_torch"]
