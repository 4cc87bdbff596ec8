"""The TTT inner loop as functional ops: `ttt_mlp` and `ttt_linear` (shared/DESIGN.md, "The TTT op contract")."""
