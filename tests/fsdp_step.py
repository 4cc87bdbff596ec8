"""One training step of the tiny TTT transformer under FSDP2 on a CPU gloo mesh, checked against one process.

    torchrun --nproc_per_node 2 tests/fsdp_step.py

Accelerate refuses FSDP on CPU, so this applies torch's own `fully_shard` with the wrapping the GPU configs ask
Accelerate for (configs/accelerate/fsdp_8gpu.yaml: one unit per class in fsdp_transformer_layer_cls_to_wrap, then
the root). Each rank takes its own sample of a batch; rank 0 also runs the unsharded model on the whole batch and
the script exits non-zero unless the loss, every gradient and every updated parameter agree.

Model and batch run in float64: AdamW's first step is lr * g / (|g| + eps), so where a gradient is near eps (1e-8)
float32 rounding moves the update by ~1e-5 between two correct runs; in float64 the two runs agree to ~1e-14, and
the tolerances below are far under what a wrong sharding or gradient averaging (a factor of 2) would produce.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, LATENT_CHANNELS, TEXT_LEN, tiny_transformer  # noqa: E402

from models import CogVideoXTTTTransformer3DModel  # noqa: E402
from pipeline.schedulers import make_scheduler  # noqa: E402
from pipeline.training.config import OptimConfig  # noqa: E402
from pipeline.training.loss import diffusion_loss  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402


def wrap_classes() -> set[str]:
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_8gpu.yaml").read_text())
    return set(config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","))


def batch(world: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    n = 2
    frames = FRAMES_FIRST + (n - 1) * FRAMES_PER_SEGMENT
    f64 = dict(generator=generator, dtype=torch.float64)
    return {"latents": torch.randn(world, frames, LATENT_CHANNELS, 4, 4, **f64),
            "noise": torch.randn(world, frames, LATENT_CHANNELS, 4, 4, **f64),
            "timesteps": torch.randint(0, 1000, (world,), generator=generator),
            "text": torch.randn(world, n, TEXT_LEN, 16, **f64),
            "text_mask": torch.ones(world, n, TEXT_LEN, dtype=torch.bool),
            "scene_start": torch.tensor([[False, True]] * world)}


OPTIM = OptimConfig(lr=1e-3, ttt_lr=1e-2, weight_decay=0.1)


def shard(model: torch.nn.Module, mesh) -> list[torch.nn.Module]:
    """`fully_shard` as the GPU configs wrap: one unit per class to wrap, inner units first, then the root."""
    names = wrap_classes()
    units = [m for m in model.modules() if type(m).__name__ in names]
    assert {type(m).__name__ for m in units} == names, f"classes to wrap not found in the model: {names}"
    for module in reversed(units):  # inner units (TTT layers) before the blocks that contain them
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return units


def check_against_reference(reference: torch.nn.Module, scheduler, data: dict[str, torch.Tensor],
                            loss: torch.Tensor, grads: dict[str, torch.Tensor], updated: dict[str, torch.Tensor]
                            ) -> tuple[torch.Tensor, float, float]:
    """Runs the unsharded step on `data` and asserts that the sharded run's loss, gradients and updated
    parameters (whole tensors) agree; returns the reference loss and the largest gradient and parameter diffs."""
    ref_optimizer = build_optimizer(reference, OPTIM)
    ref_loss = diffusion_loss(reference, scheduler, data).mean()
    ref_loss.backward()
    ref_optimizer.step()
    # the loss itself is float32 (diffusion_loss computes it so), its gradients flow back into float64
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=0)
    ref_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() == {n for n, p in reference.named_parameters() if p.requires_grad}
    worst_grad = worst_param = 0.0
    for name, p in reference.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m, n=name: f"grad of {n}: {m}")
            worst_grad = max(worst_grad, (grads[name] - ref_grads[name]).abs().max().item())
        torch.testing.assert_close(updated[name], p.detach(), rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        worst_param = max(worst_param, (updated[name] - p.detach()).abs().max().item())
    return ref_loss, worst_grad, worst_param


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = CogVideoXTTTTransformer3DModel.from_base(
        tiny_transformer(), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        ttt_mini_batch_size=16, ttt_backend="torch").to(torch.float64).train()
    model.set_trainable("ttt+attn")
    reference = copy.deepcopy(model)

    units = shard(model, mesh)

    optimizer = build_optimizer(model, OPTIM)
    scheduler = make_scheduler("ddim")
    data = batch(world)
    mine = {k: v[rank:rank + 1] for k, v in data.items()}
    loss = diffusion_loss(model, scheduler, mine).mean()
    loss.backward()  # FSDP averages the gradients over ranks: the gradient of the whole batch's mean loss
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    sharded = {name: p.full_tensor() for name, p in model.named_parameters()}

    if rank == 0:
        ref_loss, worst_grad, worst_param = check_against_reference(
            reference, scheduler, data, torch.stack(losses).mean(), grads, sharded)
        print(f"fsdp ok: {len(units)} units + root, loss {ref_loss.item():.6f}, {len(grads)} trained parameters "
              f"agree (max diff: gradients {worst_grad:.1e}, updated parameters {worst_param:.1e})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
