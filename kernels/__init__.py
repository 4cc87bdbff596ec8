"""The TTT inner loop as functional ops: `ttt_mlp` and `ttt_linear` (docs/design.md, "The TTT op contract").

The functions share their names with the backend subpackages; dispatch imports those subpackages first, so the
names below end up bound to the functions (a later import of a backend module does not rebind them).
"""

from .dispatch import BACKENDS, ttt_linear, ttt_mlp

__all__ = ["BACKENDS", "ttt_linear", "ttt_mlp"]
