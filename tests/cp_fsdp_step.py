"""Context parallelism composed with FSDP2: one training step on a CPU gloo mesh, checked against one process.

    torchrun --nproc_per_node 2 tests/cp_fsdp_step.py

Both ranks share one sample of 3 segments (cp = 2: 2 + 1 segments) and FSDP shards every block, TTT layer and the
root over the same 2 ranks, as Accelerate's FSDP2 does over all processes. FSDP averages the gradients over its 2
ranks, each of which holds a share of the sample's gradient, so the loss is multiplied by cp (as train.py does).
Rank 0 also runs the unsharded model in one process; the script exits non-zero unless the loss, every gradient and
every updated weight agree. Float64, as in tests/fsdp_step.py: AdamW's first step moves a weight whose gradient is
near eps by float32 rounding, so only float64 can hold the updated weights to tight tolerances.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fsdp_step import OPTIM, check_against_reference, shard  # noqa: E402
from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, LATENT_CHANNELS, TEXT_LEN, tiny_transformer  # noqa: E402

from models import CogVideoXTTTTransformer3DModel  # noqa: E402
from pipeline.schedulers import make_scheduler  # noqa: E402
from pipeline.training.loss import diffusion_loss  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402


def sample(n: int = 3) -> dict[str, torch.Tensor]:
    f64 = dict(generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    frames = FRAMES_FIRST + (n - 1) * FRAMES_PER_SEGMENT
    return {"latents": torch.randn(1, frames, LATENT_CHANNELS, 4, 4, **f64),
            "noise": torch.randn(1, frames, LATENT_CHANNELS, 4, 4, **f64),
            "timesteps": torch.tensor([421]),
            "text": torch.randn(1, n, TEXT_LEN, 16, **f64),
            "text_mask": torch.ones(1, n, TEXT_LEN, dtype=torch.bool),
            "scene_start": torch.tensor([[False, True, False]])}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    fsdp_mesh = init_device_mesh("cpu", (world,))
    cp_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "cp"))["cp"]
    torch.manual_seed(0)
    model = CogVideoXTTTTransformer3DModel.from_base(
        tiny_transformer(), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        ttt_mini_batch_size=16, ttt_backend="torch", gate_init=0.5).to(torch.float64).train()
    model.set_trainable("ttt+attn")
    reference = copy.deepcopy(model)

    shard(model, fsdp_mesh)
    model.enable_context_parallel(cp_mesh)

    optimizer = build_optimizer(model, OPTIM)
    scheduler = make_scheduler("ddim")
    data = sample()
    loss = diffusion_loss(model, scheduler, data).mean()
    (loss * world).backward()  # FSDP averages over its ranks: each holds a share of this one sample's gradient
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    sharded = {name: p.full_tensor() for name, p in model.named_parameters()}

    if rank == 0:
        ref_loss, _, _ = check_against_reference(reference, scheduler, data, loss, grads, sharded)
        print(f"cp+fsdp ok: loss {ref_loss.item():.6f}, {len(grads)} gradients and every weight agree")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
