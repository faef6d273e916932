"""Data-parallel training on N processes with torch.distributed, as `torchrun` launches it.

`python train.py` runs one process with no process group; `torchrun --nproc_per_node=N train.py` starts N, and
`setup()` joins them: NCCL with one GPU per local rank on CUDA, gloo on CPUs. The model is wrapped in
DistributedDataParallel by the caller; the loaders shard each global batch (s5.data), and the loops add up
their counts across processes with `all_sum`, so every rank sees the same global figures and takes the same
decisions (a NaN stops every rank at the same step, never one alone).
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=5)  # a rank that stops answering ends the group instead of hanging it for 30 min


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among world_size processes, and its rank on this machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world_size > 1


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device):
    """Join the process group torchrun described (or none), and pick this process's device.

    Returns (Context, torch.device or None when there is no group). With a CUDA `device` each process takes
    the GPU of its LOCAL_RANK and the group runs on NCCL; with the CPU, on gloo.
    """
    if not launched_by_torchrun():
        return Context(), None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU (this machine has {torch.cuda.device_count()}): "
                             "give --nproc_per_node at most the number of GPUs, or --device cpu")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Context(rank, world_size, local_rank), device


def current():
    """The Context of this process (rank 0 of 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Context()


def is_main():
    return current().is_main


def all_sum(*tensors):
    """Each tensor summed over all processes, in place (nothing happens in a single process); returns them."""
    if current().active:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


def broadcast(value):
    """Rank 0's Python value, on every rank."""
    if not current().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_every_rank(tensors):
    """Whether every process holds bit-identical tensors (compared by a checksum of their bytes)."""
    if not current().active:
        return True
    digest = torch.stack([t.detach().double().abs().sum() + t.detach().double().sum() for t in tensors])
    gathered = [torch.empty_like(digest) for _ in range(current().world_size)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def barrier():
    if current().active:
        dist.barrier()


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
