"""Lower bounds for the torch backend of `kernels.ttt_mlp` on this machine: how fast could forward+backward be if
everything but its matmuls were free, and how long do its per-step Python and dispatch costs take alone.

    python benchmarks/bench_ttt_floor.py                  # B=1, H=12, D=64, F=256, L=8192, m=64, G=4; ~1 min
    python benchmarks/bench_ttt_floor.py --threads 1

"matmuls only" replays the batched matmuls of the torch backend (kernels/ttt_mlp/torch_impl.py) with its shapes,
layouts and order: per mini-batch 5 calls in the forward (7 m-row units), and, for forward+backward, the forward,
the recompute of each checkpoint group (5 calls) and the hand-written backward (10 calls, 14 units). Nothing else
runs, so the time is what the op would take if every elementwise op, copy and Python line cost nothing.
"dispatch only" runs the real op at D=4, F=16, one head: the same number of ops per mini-batch on tiny tensors,
so its time is the per-op Python and ATen dispatch cost of the scan.
The op's own times come from benchmarks/bench_ttt_op.py; docs/performance.md puts the three side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_ttt_op import make_inputs, median_time  # noqa: E402  (the op benchmark's timing and inputs)

from kernels import ttt_mlp  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--mini-batch", type=int, default=64)
    p.add_argument("--checkpoint-group", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    for name in ("heads", "head_dim", "length", "mini_batch", "checkpoint_group", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


class MatmulReplay:
    """The torch backend's batched matmuls for N = B * H heads on fixed buffers, in the op's forms: the forward
    updates the state in place, the recompute writes the new state to scratch, the backward accumulates the state
    gradients in place (small inputs keep the accumulated values far from overflow)."""

    def __init__(self, N: int, D: int, m: int):
        F, R = 4 * D, 2 * m

        def buf(*shape):
            return torch.randn(*shape) * 0.02

        self.m = m
        self.x, self.x2, self.z1, self.z2 = buf(N, R, D), buf(N, R, F), buf(N, R, F), buf(N, R, D)
        self.w1, self.b1, self.w2, self.b2 = buf(N, D, F), buf(N, 1, F), buf(N, F, D), buf(N, 1, D)
        self.new_w1, self.new_w2 = buf(N, D, F), buf(N, F, D)
        self.dz2, self.dx2, self.dz1 = buf(N, m, D), buf(N, m, F), buf(N, m, F)
        self.g_w1, self.g_w2 = buf(N, D, F), buf(N, F, D)
        self.g_z1, self.g_z2, self.g_x, self.g_x2 = buf(N, R, F), buf(N, R, D), buf(N, R, D), buf(N, R, F)
        self.g_dz1, self.g_dz2, self.tmp_f, self.tmp_d = buf(N, m, F), buf(N, m, D), buf(N, m, F), buf(N, m, D)

    def forward_step(self, save: bool) -> None:
        m = self.m
        torch.baddbmm(self.b1, self.x, self.w1, out=self.z1)
        torch.baddbmm(self.b2, self.x2, self.w2, out=self.z2)
        torch.bmm(self.dz2, self.w2.transpose(1, 2), out=self.dx2)
        if save:
            torch.baddbmm(self.w2, self.x2[:, m:].transpose(1, 2), self.dz2, alpha=-1, out=self.new_w2)
            torch.baddbmm(self.w1, self.x[:, m:].transpose(1, 2), self.dz1, alpha=-1, out=self.new_w1)
        else:
            self.w2.baddbmm_(self.x2[:, m:].transpose(1, 2), self.dz2, alpha=-1)
            self.w1.baddbmm_(self.x[:, m:].transpose(1, 2), self.dz1, alpha=-1)

    def backward_step(self) -> None:
        m = self.m
        torch.baddbmm(self.b1, self.x[:, m:], self.g_w1, beta=-1, alpha=-1, out=self.g_dz1)
        torch.baddbmm(self.b2, self.x2[:, m:], self.g_w2, beta=-1, alpha=-1, out=self.g_dz2)
        self.g_dz2.baddbmm_(self.g_dz1, self.w2)
        torch.bmm(self.g_z2, self.w2.transpose(1, 2), out=self.g_x2)
        torch.bmm(self.dz2, self.g_w2.transpose(1, 2), out=self.tmp_f)
        self.g_w2.baddbmm_(self.g_dz1.transpose(1, 2), self.dz2)
        self.g_w2.baddbmm_(self.x2.transpose(1, 2), self.g_z2)
        torch.bmm(self.g_z1, self.w1.transpose(1, 2), out=self.g_x)
        torch.bmm(self.dz1, self.g_w1.transpose(1, 2), out=self.tmp_d)
        self.g_w1.baddbmm_(self.x.transpose(1, 2), self.g_z1)

    def forward(self, steps: int) -> None:
        for _ in range(steps):
            self.forward_step(save=False)

    def forward_backward(self, steps: int, group: int) -> None:
        self.forward(steps)
        for first in range(0, steps, group):
            n = min(group, steps - first)
            for _ in range(n):
                self.forward_step(save=True)
            for _ in range(n):
                self.backward_step()


def dispatch_floor(L: int, m: int, repeats: int) -> tuple[float, float]:
    """(forward, forward+backward) seconds of the real op at D=4, F=16, one head."""
    tensors, kwargs = make_inputs("ttt_mlp", 1, 1, L, 4, m, torch.float32, "cpu", requires_grad=True)

    def forward():
        with torch.no_grad():
            ttt_mlp(*tensors, backend="torch", **kwargs)

    def forward_backward():
        for t in tensors:
            t.grad = None
        ttt_mlp(*tensors, backend="torch", **kwargs).square().mean().backward()

    return median_time(forward, repeats, 1, "cpu")[0], median_time(forward_backward, repeats, 1, "cpu")[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = math.ceil(args.length / args.mini_batch)
    replay = MatmulReplay(args.heads, args.head_dim, args.mini_batch)
    fwd = median_time(lambda: replay.forward(steps), args.repeats, 1, "cpu")[0]
    fwd_bwd = median_time(lambda: replay.forward_backward(steps, args.checkpoint_group), args.repeats, 1, "cpu")[0]
    d_fwd, d_fwd_bwd = dispatch_floor(args.length, args.mini_batch, args.repeats)
    print(f"ttt_mlp torch backend, H={args.heads}, D={args.head_dim}, L={args.length}, m={args.mini_batch}, "
          f"G={args.checkpoint_group}, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| floor | forward (s) | forward+backward (s) |")
    print("|---|---|---|")
    print(f"| matmuls only | {fwd:.3f} | {fwd_bwd:.3f} |")
    print(f"| dispatch only (D=4, F=16, 1 head) | {d_fwd:.3f} | {d_fwd_bwd:.3f} |")


if __name__ == "__main__":
    main()
