"""Sampling with context parallelism: `torchrun --nproc_per_node P sample.py --context-parallel P ...`.

Every process runs the whole pipeline with the same seed; the transformer splits each call's segments over the P
ranks and gathers its prediction, so latents, scheduler steps and decoded frames are the same on every rank and
the first writes the video. See models/context_parallel.py and docs/sampling.md.
"""

from __future__ import annotations

import os

from .loading import UsageError


def start_context_parallel(size: int, device):
    """Join the torchrun group of `size` processes; returns (mesh, rank, device): a 1-D ("cp",) DeviceMesh, this
    process's rank and its device (cuda:LOCAL_RANK on a GPU)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise UsageError(f"--context-parallel {size} needs {size} processes started by torchrun "
                         f"(torchrun --nproc_per_node {size} sample.py ...), got {world}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (size,), mesh_dim_names=("cp",))
    return mesh, dist.get_rank(), device
