"""Context parallelism in training (docs/training.md, "Context parallelism"): the (dp, cp) mesh, which batches each
data-parallel group reads, and the loss scale that makes the processes' gradient average the data-parallel one.

With context parallelism every rank of a cp group holds a share of each parameter's gradient (its tokens, its TTT
heads) and the shares add up to the sample's gradient. DDP, FSDP and DeepSpeed average gradients over all
dp x cp processes, so each rank's loss is multiplied by cp: the average then is the data-parallel mean of the
samples' gradients, the same as without context parallelism.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.data import DataLoader

from .config import ConfigError, ParallelConfig


def data_parallel_size(parallel: ParallelConfig, num_processes: int) -> int:
    """Processes that read different batches: num_processes / parallel.context."""
    if parallel.context < 1 or num_processes % parallel.context:
        raise ConfigError(f"parallel.context={parallel.context} must be >= 1 and divide the process count "
                          f"({num_processes})")
    return num_processes // parallel.context


def context_parallel_mesh(parallel: ParallelConfig, accelerator: Accelerator) -> DeviceMesh | None:
    """The ("dp", "cp") mesh over all processes (cp groups are consecutive ranks: one node), or None for cp = 1."""
    if parallel.context == 1:
        return None
    dp = data_parallel_size(parallel, accelerator.num_processes)
    return init_device_mesh(accelerator.device.type, (dp, parallel.context), mesh_dim_names=("dp", "cp"))


def prepare_loader(accelerator: Accelerator, loader: DataLoader, mesh: DeviceMesh | None) -> DataLoader:
    """The loader sharded over data-parallel groups: the ranks of a cp group read the same batches."""
    if mesh is None:
        return accelerator.prepare(loader)
    return prepare_data_loader(loader, accelerator.device, num_processes=mesh["dp"].size(),
                               process_index=mesh["dp"].get_local_rank(), put_on_device=True)
