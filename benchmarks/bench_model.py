"""Forward cost of the TTT CogVideoX against sequence length, and against the same model without TTT.

Measures, for a small random CogVideoX (width 256 = 4 heads x 64, 2 layers, 8x8 latents, CogVideoX's 13 + 12 (n-1)
latent frames) on whatever device is given:
- forward time per token at n segments (median of --repeats), and its ratio to 1 segment (linear growth = 1.0);
- peak memory per token (CPU: max RSS of a fresh process above its state after building the model; CUDA: peak
  allocated), and its ratio to 1 segment;
- the ratio of the TTT model to the local-attention-only model (ttt_type="none") at the same n.
Each measurement runs in a fresh subprocess so that peak memory is its own.

    python benchmarks/bench_model.py --segments 1 7 20 21 --ttt-type mlp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(ttt_type: str, device: str, dtype):
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from models import CogVideoXTTTTransformer3DModel

    torch.manual_seed(0)
    base = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=64,
        text_embed_dim=64, num_layers=2, sample_width=8, sample_height=8, sample_frames=49, patch_size=2,
        max_text_seq_length=16, use_rotary_positional_embeddings=True)
    model = CogVideoXTTTTransformer3DModel.from_base(base, ttt_type=ttt_type, ttt_backend="auto")
    return model.to(device=device, dtype=dtype).eval()


def measure(args) -> dict:
    """Runs in the child process: one (ttt_type, n) point."""
    import torch

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build(args.ttt_type, args.device, dtype)
    n = args.segments[0]
    frames = model.num_latent_frames(n)
    latents = torch.randn(1, frames, 4, 8, 8, device=args.device, dtype=dtype)
    text = torch.randn(1, n, 16, 64, device=args.device, dtype=dtype)
    t = torch.tensor([500], device=args.device)
    tokens = n * 16 + frames * 16
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # model and inputs built
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(latents, text, t)  # warm-up (also builds the cached layout); counts towards the peak
        sync()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(latents, text, t)
            sync()
            times.append(time.perf_counter() - start)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base_alloc
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"segments": n, "ttt_type": args.ttt_type, "tokens": tokens, "seconds": statistics.median(times),
            "peak_bytes": max(peak, 0)}


def run_point(args, ttt_type: str, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--ttt-type", ttt_type, "--segments", str(n),
           "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads",
           str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 7, 20, 21])
    parser.add_argument("--ttt-type", default="mlp", choices=["mlp", "linear", "none"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    rows = {(kind, n): run_point(args, kind, n) for n in args.segments for kind in (args.ttt_type, "none")}
    first = rows[(args.ttt_type, args.segments[0])]
    per_token = first["seconds"] / first["tokens"]
    mem_per_token = first["peak_bytes"] / first["tokens"]
    print(f"device {args.device}, {args.dtype}, {args.threads} threads, TTT-{args.ttt_type.upper()}, "
          f"median of {args.repeats}")
    print("| segments | tokens | forward s | s/token vs 1st | peak MiB | peak/token vs 1st | TTT / local-only time |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.segments:
        r, local = rows[(args.ttt_type, n)], rows[("none", n)]
        mem_ratio = (r["peak_bytes"] / r["tokens"]) / mem_per_token if mem_per_token else float("nan")
        print(f"| {n} | {r['tokens']} | {r['seconds']:.3f} | {(r['seconds'] / r['tokens']) / per_token:.2f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {mem_ratio:.2f} | {r['seconds'] / local['seconds']:.2f} |")


if __name__ == "__main__":
    main()
