"""Per-GPU training memory of CogVideoX-5B + TTT-MLP for every curriculum stage and context-parallel size.

One 8-GPU node; cp GPUs share each sample (context parallelism, models/context_parallel.py), FSDP full shard over
the rest (8 / cp data-parallel ranks: --fsdp-over dp, the default) or over all 8 (--fsdp-over all: what
configs/accelerate/fsdp_8gpu.yaml gives, Accelerate's FSDP2 shards over every process). Terms per GPU:

- weights: fp32 master weights, 4 B per parameter / FSDP ranks;
- gradients: fp32, 4 B per trainable parameter / FSDP ranks;
- optimizer: AdamW's two fp32 moments, 8 B per trainable parameter / FSDP ranks;
- gathered: FSDP's unsharded bf16 weights of two blocks (the current one and the prefetched next) and one block's
  fp32 gradients before the reduce-scatter;
- activation checkpoints: the input of each of the 42 blocks (text + video tokens of the rank's segments,
  width 3072) in the activation dtype (bf16 under FSDP2 mixed precision, --act-bytes 2);
- working set: one block recomputed and differentiated, ~ WORKING_SET_BYTES per token per channel over the rank's
  tokens (the TTT half is head-sharded: every token, 1/cp of the heads, the same bytes). A rough estimate (below).

The largest working set of a step is the checkpoints plus one block's recompute during backward, on top of the
states. "fits" compares the total with the usable memory of an 80 GB GPU (80 GiB less 10 % for the CUDA context,
NCCL buffers and allocator fragmentation).

    python benchmarks/memory_model.py                 # the table (GB = 1e9 bytes)
    python benchmarks/memory_model.py --measure       # the checkpoint term against measured CPU memory, tiny sizes
    python benchmarks/memory_model.py --communication # bytes each GPU sends per block and per step at 63 s

--measure runs a small random model (fp32, CPU) with gradient checkpointing in fresh processes (glibc told to mmap
every allocation above 64 KiB, so that freed tensors leave the resident set) and compares the memory held after
the forward pass with layers x tokens x width x 4 B.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GPUS = 8
GB = 1e9
USABLE = 80 * 2**30 * 0.9  # bytes of an 80 GB GPU left for the step
STAGES = {"3 s": (1, "full"), "9 s": (3, "ttt+attn"), "18 s": (6, "ttt+attn"), "30 s": (10, "ttt+attn"),
          "63 s": (21, "ttt+attn")}
CONTEXT = (1, 2, 4, 8)
# bytes per token per channel for one block's recompute + backward in bf16: ~34 for a CogVideoX block with
# memory-efficient attention (Korthikanti et al. 2022, sbh(34 + 5as/h) without the attention-score term), ~32 for the
# forward and reverse TTT passes (q, k, v, normalised and rotated q/k, target, the inner MLP's activations and the
# op's state checkpoints). Not measured on a GPU.
WORKING_SET_BYTES = 66

COGVIDEOX_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49,
                    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
                    use_rotary_positional_embeddings=True)


@dataclass
class Model:
    width: int
    layers: int
    text_len: int
    tokens_per_frame: int
    frames_first: int
    frames_per_segment: int
    parameters: int
    trainable: dict[str, int]  # per trainable mode
    block_parameters: int


def cogvideox_5b_ttt_mlp() -> Model:
    """Parameter counts of the real model class, built on the meta device (no memory)."""
    from accelerate import init_empty_weights

    from models import CogVideoXTTTTransformer3DModel

    with init_empty_weights():
        model = CogVideoXTTTTransformer3DModel(**COGVIDEOX_5B, ttt_type="mlp")
    total = sum(p.numel() for p in model.parameters())
    trainable = {}
    for mode in ("full", "ttt+attn"):
        model.set_trainable(mode)
        trainable[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    block = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    width = COGVIDEOX_5B["num_attention_heads"] * COGVIDEOX_5B["attention_head_dim"]
    return Model(width, COGVIDEOX_5B["num_layers"], COGVIDEOX_5B["max_text_seq_length"], (60 // 2) * (90 // 2), 13, 12,
                 total, trainable, block)


def rank_tokens(model: Model, segments: int, cp: int) -> int:
    """Tokens (text + video) of the rank holding the most: whole segments, the first ranks one more when uneven."""
    from models.context_parallel import split_segments

    most = 0
    for run in split_segments(segments, cp):
        frames = sum(model.frames_first if i == 0 else model.frames_per_segment for i in run)
        most = max(most, len(run) * model.text_len + frames * model.tokens_per_frame)
    return most


def per_gpu(model: Model, segments: int, trainable: str, cp: int, fsdp_over: str, act_bytes: int) -> dict:
    shards = GPUS // cp if fsdp_over == "dp" else GPUS
    train = model.trainable[trainable]
    tokens = rank_tokens(model, segments, cp)
    row = {
        "tokens": tokens,
        "weights": 4 * model.parameters / shards,
        "gradients": 4 * train / shards,
        "optimizer": 8 * train / shards,
        "gathered": model.block_parameters * (2 * 2 + 4),
        "checkpoints": model.layers * tokens * model.width * act_bytes,
        "working_set": WORKING_SET_BYTES * tokens * model.width,
    }
    row["total"] = sum(v for k, v in row.items() if k != "tokens")
    return row


def table(fsdp_over: str, act_bytes: int) -> str:
    model = cogvideox_5b_ttt_mlp()
    in_ttt_attn = model.trainable["ttt+attn"] / 1e9
    lines = [f"CogVideoX-5B + TTT-MLP: {model.parameters / 1e9:.2f} B parameters ({in_ttt_attn:.2f} B"
             f" in ttt+attn), {model.block_parameters / 1e6:.0f} M per block; FSDP over "
             f"{'8 / cp data-parallel ranks' if fsdp_over == 'dp' else 'all 8 GPUs'}; activations {act_bytes} B; "
             f"GB = 1e9 B; usable {USABLE / GB:.1f} GB of an 80 GB GPU", "",
             "| stage | cp | tokens per GPU | weights | grads | AdamW | gathered | checkpoints | working set | total "
             "| 80 GB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for stage, (segments, trainable) in STAGES.items():
        for cp in CONTEXT:
            if cp > segments:
                lines.append(f"| {stage} | {cp} | - | | | | | | | | n/a: {segments} segment(s) |")
                continue
            r = per_gpu(model, segments, trainable, cp, fsdp_over, act_bytes)
            fits = "fits" if r["total"] <= USABLE else "does not fit"
            lines.append(f"| {stage} | {cp} | {r['tokens']:,} | " + " | ".join(
                f"{r[k] / GB:.1f}" for k in ("weights", "gradients", "optimizer", "gathered", "checkpoints",
                                             "working_set", "total")) + f" | {fits} |")
    return "\n".join(lines)


def communication(act_bytes: int) -> str:
    """Bytes each GPU sends per block (forward) at 63 s: the TTT all-to-alls and the overlap-frame exchanges."""
    model = cogvideox_5b_ttt_mlp()
    segments = STAGES["63 s"][0]
    lines = ["| cp | tokens per GPU | TTT all-to-alls sent (MB) | overlap frames sent (MB) | per step, all 42 blocks x "
             "4 passes (GB) |", "|---:|---:|---:|---:|---:|"]
    for cp in CONTEXT[1:]:
        tokens = rank_tokens(model, segments, cp)
        # per direction: q, k, target in (3 x width) and the output back (1 x width), eta (heads) in; the share
        # (cp - 1) / cp leaves the GPU
        ttt = 2 * (4 * model.width + 48) * tokens * act_bytes * (cp - 1) / cp
        overlap = 2 * model.tokens_per_frame * model.width * act_bytes
        # forward, the block's recompute, the TTT call's own recompute (checkpoint_ttt, as in the 63-s config) and
        # backward (the inverse of every exchange, the same bytes): 4 passes
        step = model.layers * 4 * (ttt + overlap)
        lines.append(f"| {cp} | {tokens:,} | {ttt / 1e6:,.0f} | {overlap / 1e6:.1f} | {step / GB:.0f} |")
    return "\n".join(lines)


# measuring the checkpoint term on the CPU


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(layers: int, segments: int, width: int) -> dict:
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from models import CogVideoXTTTTransformer3DModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    heads = width // 64
    base = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=64,
        text_embed_dim=64, num_layers=layers, sample_width=16, sample_height=16, sample_frames=49, patch_size=2,
        max_text_seq_length=16, use_rotary_positional_embeddings=True)
    model = CogVideoXTTTTransformer3DModel.from_base(base, ttt_type="mlp", ttt_backend="torch", checkpoint_ttt=True)
    model.enable_gradient_checkpointing()
    model.train()
    frames = model.num_latent_frames(segments)
    latents = torch.randn(1, frames, 4, 16, 16)
    text = torch.randn(1, segments, 16, 64)
    t = torch.tensor([500])
    tokens = segments * 16 + frames * 64
    with torch.no_grad():
        model(latents, text, t)  # warm-up: cached layout, allocator
    before = rss()
    out = model(latents, text, t).sample
    after_forward = rss()
    peak_before_backward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.float().square().mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
    return {"layers": layers, "segments": segments, "width": width, "tokens": tokens,
            "kept_after_forward": after_forward - before, "predicted_checkpoints": layers * tokens * width * 4,
            "peak_backward_above_start": max(peak - max(before, peak_before_backward), 0) + after_forward - before,
            "gradients": grads}


def measure() -> str:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    for layers, segments in ((4, 3), (8, 3), (8, 6)):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(layers), str(segments), "256"],
                             env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = ["| layers | segments | tokens | checkpoints predicted (MB) | held after forward (MB) | ratio |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kept, predicted = r["kept_after_forward"], r["predicted_checkpoints"]
        lines.append(f"| {r['layers']} | {r['segments']} | {r['tokens']:,} | {predicted / 1e6:.1f} | "
                     f"{kept / 1e6:.1f} | {kept / predicted:.2f} |")
    a, b = rows[0], rows[1]
    per_layer = (b["kept_after_forward"] - a["kept_after_forward"]) / (b["layers"] - a["layers"])
    lines.append("")
    lines.append(f"per added layer (8 vs 4 layers at {a['tokens']:,} tokens): measured {per_layer / 1e6:.2f} MB, "
                 f"predicted tokens x width x 4 B = {a['tokens'] * a['width'] * 4 / 1e6:.2f} MB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsdp-over", choices=("dp", "all"), default="dp")
    parser.add_argument("--act-bytes", type=int, default=2, help="bytes per activation (2: bf16, 4: fp32)")
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--communication", action="store_true", help="bytes exchanged per block and step at 63 s")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
    elif args.measure:
        print(measure())
    elif args.communication:
        print(communication(args.act_bytes))
    else:
        print(table(args.fsdp_over, args.act_bytes))


if __name__ == "__main__":
    main()
