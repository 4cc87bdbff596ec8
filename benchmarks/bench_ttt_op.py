"""Benchmark of the TTT ops (kernels.ttt_mlp / kernels.ttt_linear) per backend: forward and forward+backward time
(median of --repeats after --warmup), memory, and achieved FLOP/s against a measured matmul rate.

    python benchmarks/bench_ttt_op.py                       # CPU defaults: L = 2k, 8k; a few minutes
    python benchmarks/bench_ttt_op.py --lengths 2048 8192 32768 --dtype bf16 --device cuda

Prints a markdown table (and writes it to --output if given). "CPU s" is the process's CPU time per run (all
threads): on a shared machine it is steadier than wall time, since time spent waiting for a core is not in it
(OpenMP threads spin-waiting for each other are). Memory: "saved" is what autograd keeps for
backward (exact, from saved-tensor hooks); "peak" is the peak allocated increase of one forward+backward on CUDA,
and on CPU the resident-set high-water mark over the resident size before it, in a fresh process (Linux only).
FLOPs count the op's matmuls only: TTT-MLP 14 D F per token and head for the forward (read-out 4, inner forward 4,
inner backward 2, update 4), TTT-Linear 6 D^2; forward+backward is counted as 3x the forward (the conventional
1 + 2), so recomputation inside the backward is not credited.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels import ttt_linear, ttt_mlp  # noqa: E402
from pipeline.atomic import atomic_write_text  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", nargs="+", default=["ttt_mlp", "ttt_linear"], choices=["ttt_mlp", "ttt_linear"])
    p.add_argument("--backends", nargs="+", default=None, choices=["torch", "triton", "naive"],
                   help="default: torch, plus triton on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--mlp-mini-batch", type=int, default=64)
    p.add_argument("--linear-mini-batch", type=int, default=16)
    p.add_argument("--checkpoint-group", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    p.add_argument("--peak-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "heads", "head_dim", "mlp_mini_batch", "linear_mini_batch", "checkpoint_group",
                 "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(L < 1 for L in args.lengths):
        p.error(f"--lengths must all be >= 1, got {args.lengths}")
    return args


def make_inputs(op: str, B: int, H: int, L: int, D: int, m: int, dtype: torch.dtype, device: str,
                requires_grad: bool) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Inputs in the ranges the TTT layer produces (unit-norm q, k; eta = 0.1 sigmoid(.) / (D m))."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    q = torch.nn.functional.normalize(rand(B, H, L, D), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(rand(B, H, L, D), dim=-1).to(dtype)
    v = rand(B, H, L, D).to(dtype)
    eta = (0.1 * torch.sigmoid(rand(B, H, L)) / (D * m)).to(dtype)
    if op == "ttt_mlp":
        F = 4 * D
        weights = (rand(H, D, F, scale=0.02), torch.zeros(H, F, device=device), rand(H, F, D, scale=0.02),
                   torch.zeros(H, D, device=device))
    else:
        weights = (rand(H, D, D, scale=0.02), torch.zeros(H, D, device=device))
    ln = (torch.ones(H, D, device=device), torch.zeros(H, D, device=device))
    tensors = tuple(t.requires_grad_(requires_grad) for t in (q, k, v, eta, *weights, *ln))
    return tensors, dict(mini_batch_size=m)


def forward_flops(op: str, B: int, H: int, L: int, D: int) -> float:
    per_token = 14 * D * 4 * D if op == "ttt_mlp" else 6 * D * D
    return float(per_token * B * H * L)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], None], repeats: int, warmup: int, device: str) -> tuple[float, float, float, float]:
    """(median, min, max) wall seconds of fn over `repeats` runs after `warmup` runs, and the median CPU seconds
    of this process (all its threads, OpenMP spin-waits included) per run."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), min(times), max(times), statistics.median(cpu)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn: Callable[[], None], device: str) -> float | None:
    """Peak memory increase (bytes) while fn runs: the CUDA allocator's peak, or on Linux CPU the resident-set
    high-water mark (reset through /proc/self/clear_refs) over the resident size before. Call it in a fresh
    process on CPU (`--peak-child`), where no freed-but-retained heap from earlier runs hides the growth."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated() - base)
    try:
        base = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    fn()
    return float(_proc_status_kib("VmHWM") - base) * 1024


def saved_for_backward(fn: Callable[[], torch.Tensor]) -> float:
    """Bytes autograd keeps for backward after fn's forward (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return float(sum(storages.values()))


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul in `dtype` (bf16 on CUDA, fp32 on CPU is the reference)."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: torch.mm(a, b), repeats=5, warmup=2, device=device)[0]
    return 2 * n**3 / t


def bench_one(op: str, backend: str, L: int, args, dtype: torch.dtype) -> dict:
    fn_op = ttt_mlp if op == "ttt_mlp" else ttt_linear
    m = args.mlp_mini_batch if op == "ttt_mlp" else args.linear_mini_batch
    B, H, D, device = args.batch, args.heads, args.head_dim, args.device
    tensors, kwargs = make_inputs(op, B, H, L, D, m, dtype, device, requires_grad=True)
    kwargs.update(backend=backend)
    if backend != "naive":
        kwargs.update(checkpoint_group=args.checkpoint_group)

    def forward():
        with torch.no_grad():
            fn_op(*tensors, **kwargs)

    def forward_backward():
        for t in tensors:
            t.grad = None
        fn_op(*tensors, **kwargs).float().square().mean().backward()

    if args.peak_child:
        # one-time library set-up (thread pools, BLAS buffers) stays out of the peak; a full-size warm-up would
        # leave freed heap behind that hides the growth
        tiny, _ = make_inputs(op, B, H, m, D, m, dtype, device, requires_grad=True)
        fn_op(*tiny, **kwargs).float().square().mean().backward()
        return dict(peak=peak_memory(forward_backward, device))
    fwd = median_time(forward, args.repeats, args.warmup, device)
    fwd_bwd = median_time(forward_backward, args.repeats, args.warmup, device)
    peak = peak_memory(forward_backward, device) if device.startswith("cuda") else peak_in_child(op, backend, L, args)
    return dict(op=op, backend=backend, L=L, fwd=fwd, fwd_bwd=fwd_bwd, flops=forward_flops(op, B, H, L, D),
                saved=saved_for_backward(lambda: fn_op(*tensors, **kwargs)), peak=peak)


def peak_in_child(op: str, backend: str, L: int, args) -> float | None:
    """Peak resident-set growth of one forward+backward, measured in a fresh process (CPU)."""
    argv = [sys.executable, os.path.abspath(__file__), "--peak-child", "--ops", op, "--backends", backend,
            "--lengths", str(L), "--device", args.device, "--batch", str(args.batch), "--heads", str(args.heads),
            "--head-dim", str(args.head_dim), "--mlp-mini-batch", str(args.mlp_mini_batch),
            "--linear-mini-batch", str(args.linear_mini_batch), "--checkpoint-group", str(args.checkpoint_group)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


def format_table(rows: list[dict], rate: float, rate_label: str) -> str:
    def mib(x):
        return "n/a" if x is None else f"{x / 2**20:.1f}"

    lines = [
        f"| op | backend | L | fwd median (s) [min-max] | fwd+bwd median (s) [min-max] | CPU s fwd / fwd+bwd | "
        f"fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd % of {rate_label} | saved for bwd (MiB) | peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, fb = r["fwd"], r["fwd_bwd"]
        tf_f, tf_fb = r["flops"] / f[0] / 1e12, 3 * r["flops"] / fb[0] / 1e12
        lines.append(
            f"| {r['op']} | {r['backend']} | {r['L']} | {f[0]:.3f} [{f[1]:.3f}-{f[2]:.3f}] | "
            f"{fb[0]:.3f} [{fb[1]:.3f}-{fb[2]:.3f}] | {f[3]:.3f} / {fb[3]:.3f} | {tf_f:.3g} | {tf_fb:.3g} | "
            f"{100 * tf_fb * 1e12 / rate:.1f} | {mib(r['saved'])} | {mib(r['peak'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    backends = args.backends or (["torch", "triton"] if cuda else ["torch"])
    if args.peak_child:
        print(json.dumps(bench_one(args.ops[0], backends[0], args.lengths[0], args, dtype)))
        return
    rate_dtype = torch.bfloat16 if cuda else torch.float32
    rate = matmul_rate(args.device, rate_dtype)
    rate_label = f"{'bf16' if cuda else 'fp32'} matmul {rate / 1e12:.2f} TFLOP/s"
    rows = []
    for op in args.ops:
        for backend in backends:
            for L in args.lengths:
                rows.append(bench_one(op, backend, L, args, dtype))
                print(f"done: {op} {backend} L={L}", file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    header = (f"{device_name}{load}; dtype {str(dtype).removeprefix('torch.')}, B={args.batch}, H={args.heads}, "
              f"D={args.head_dim}, m={args.mlp_mini_batch} (MLP) / {args.linear_mini_batch} (Linear), "
              f"checkpoint_group={args.checkpoint_group}, median of {args.repeats}")
    table = header + "\n\n" + format_table(rows, rate, rate_label)
    print(table)
    if args.output:
        atomic_write_text(args.output, table + "\n")


if __name__ == "__main__":
    main()
