"""Speed of the Triton TTT kernels against the torch backend, and what the kernels need from a GPU.

Two modes:
- timing (needs CUDA): forward and forward+backward time of `kernels.ttt_mlp` / `ttt_linear` with
  backend="triton" and backend="torch" at the release head size (D = 64, MLP F = 256), median of --repeats,
  and the tokens per second of the Triton backend;
      python benchmarks/bench_ttt_triton.py --op mlp --lengths 4096 16384 --batch-heads 48 --dtype bf16
- --compile-report (no GPU needed): compiles the kernels for sm_80 and sm_90 with Triton's own ptxas and prints
  the shared memory each launch needs (A100 allows 163 KiB per block, H100 227 KiB) and, for sm_90, ptxas's
  register and spill counts. A kernel over the limit fails at launch with Triton's OutOfResources.
      python benchmarks/bench_ttt_triton.py --compile-report
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
PER_HEAD_DTYPES = ("q", "k", "v", "eta", "out", "dq", "dk", "dv", "deta", "dout")


def compile_report(mini_batch_sizes: list[int], dtype: str) -> None:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.ttt_linear import triton_impl as linear
    from kernels.ttt_mlp import triton_impl as mlp

    io = {"fp32": "fp32", "bf16": "bf16"}[dtype]
    precision = "tf32x3" if dtype == "fp32" else "tf32"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    D, F = 64, 256
    kernels = []
    for m in mini_batch_sizes:
        common = dict(D=D, M=m, ACC=tl.float32, PRECISION=precision)
        block_f, num_warps = mlp._launch_config(F, m)
        kernels += [
            (f"linear forward  D={D} m={m}", linear._linear_forward_kernel, dict(common, STORE_CHECKPOINTS=True),
             linear._num_warps(D)),
            (f"linear backward D={D} m={m}", linear._linear_backward_kernel, common, linear._num_warps(D)),
            (f"mlp forward  D={D} F={F} m={m}", mlp._mlp_forward_kernel,
             dict(common, F=F, BF=block_f, STORE_CHECKPOINTS=True), num_warps),
            (f"mlp backward D={D} F={F} m={m}", mlp._mlp_backward_kernel, dict(common, F=F, BF=block_f), num_warps),
        ]
    for name, fn, constexprs, num_warps in kernels:
        signature = {a: "constexpr" if a in constexprs else
                     ("*" + (io if a[:-4] in PER_HEAD_DTYPES else "fp32") if a.endswith("_ptr") else "i32")
                     for a in fn.arg_names}
        for arch in (80, 90):
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
            shared = compiled.metadata.shared
            verdict = "fits" if shared <= SHARED_LIMIT[arch] else "TOO MUCH SHARED MEMORY"
            line = f"{name:32s} sm_{arch} {dtype} warps={num_warps}: shared {shared / 1024:6.1f} KiB ({verdict})"
            if arch == 90:
                line += "; " + _ptxas_summary(ptxas, compiled.asm["ptx"])
            print(f"{line}  [{time.perf_counter() - start:.0f} s]", flush=True)


def _ptxas_summary(ptxas: str, ptx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "kernel.o")],
                             capture_output=True, text=True).stderr
    parts = [line.split(":", 1)[-1].strip() for line in log.splitlines()
             if "Used" in line and "registers" in line or "spill stores" in line]
    return " | ".join(parts)


def time_ms(fn, repeats: int) -> float:
    import torch

    fn()  # compile / warm up
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def random_inputs(op_name: str, B: int, H: int, L: int, D: int, m: int, dtype) -> tuple:
    """(q, k, v, eta, *weights, ln_weight, ln_bias) on CUDA, in the ranges the TTT layer produces, requiring grad."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    q = torch.nn.functional.normalize(randn(B, H, L, D), dim=-1)
    k = torch.nn.functional.normalize(randn(B, H, L, D), dim=-1)
    eta = torch.full((B, H, L), 0.1 / (D * m), device="cuda", dtype=dtype)
    if op_name == "mlp":
        weights = (randn(H, D, 4 * D, scale=0.02), randn(H, 4 * D, scale=0.0), randn(H, 4 * D, D, scale=0.02),
                   randn(H, D, scale=0.0))
    else:
        weights = (randn(H, D, D, scale=0.02), randn(H, D, scale=0.0))
    ln = (torch.ones(H, D, device="cuda", dtype=dtype), torch.zeros(H, D, device="cuda", dtype=dtype))
    return tuple(t.requires_grad_() for t in (q, k, randn(B, H, L, D), eta, *weights, *ln))


def time_backend(op, inputs: tuple, m: int, backend: str, repeats: int) -> tuple[float, float]:
    """(forward ms, forward + backward ms), medians."""
    import torch

    def forward():
        with torch.no_grad():
            op(*inputs, mini_batch_size=m, backend=backend)

    def forward_backward():
        out = op(*inputs, mini_batch_size=m, backend=backend)
        torch.autograd.grad(out.float().square().sum(), inputs)

    return time_ms(forward, repeats), time_ms(forward_backward, repeats)


def timing(args) -> None:
    import torch

    import kernels

    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA device; use --compile-report without one")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    D, H = 64, args.batch_heads
    op = kernels.ttt_mlp if args.op == "mlp" else kernels.ttt_linear
    m = args.mini_batch_size or (64 if args.op == "mlp" else 16)
    print(f"ttt_{args.op} D={D} m={m} B*H={H} {args.dtype} on {torch.cuda.get_device_name()}")
    print(f"{'L':>8} {'backend':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd+bwd Mtok/s':>15}")
    for L in args.lengths:
        inputs = random_inputs(args.op, 1, H, L, D, m, dtype)
        for backend in ("triton", "torch"):
            fwd, both = time_backend(op, inputs, m, backend, args.repeats)
            print(f"{L:8d} {backend:>8} {fwd:9.2f} {both:11.2f} {H * L / both / 1e3:15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-report", action="store_true", help="compile for sm_80/sm_90 without a GPU")
    parser.add_argument("--op", choices=("mlp", "linear"), default="mlp")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch-heads", type=int, default=48, help="B*H (CogVideoX-5B: 48 heads)")
    parser.add_argument("--mini-batch-size", type=int, nargs="+", default=None,
                        help="timing: one value (default 64 for mlp, 16 for linear); report: the list (16 64)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.compile_report:
        compile_report(args.mini_batch_size or [16, 64], args.dtype)
    else:
        args.mini_batch_size = args.mini_batch_size[0] if args.mini_batch_size else None
        timing(args)


if __name__ == "__main__":
    main()
