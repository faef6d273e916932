"""Data-parallel training on N processes with torch.distributed, as `torchrun` launches it.

A plain run is one process with no process group; torchrun starts N of them, and `setup()`
joins them: NCCL with one GPU per local rank on CUDA, gloo on CPUs. The model is wrapped in
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
    return "RANK" in os.environ or "WORLD_SIZE" in os.environ


class LaunchError(ValueError):
    """The torchrun environment variables are missing, inconsistent, or the group could not form; says which."""


class GroupError(RuntimeError):
    """Another process of the group stopped or stopped answering mid-run."""


def _env_int(name, low, high=None, default=None):
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise LaunchError(f"{name} is not set: start the processes with torchrun (it sets RANK, WORLD_SIZE, "
                              "MASTER_ADDR and MASTER_PORT), or unset RANK and WORLD_SIZE to run one process")
        return default
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not a whole number: start the processes with torchrun") from None
    if value < low or (high is not None and value > high):
        raise LaunchError(f"{name}={value} is out of range ({low} to {high if high is not None else 'more'}): "
                          "start the processes with torchrun")
    return value


def context_from_env():
    """This process's Context from torchrun's variables, checked; Context() without them. LaunchError if wrong."""
    if not launched_by_torchrun():
        return Context()
    world_size = _env_int("WORLD_SIZE", 1, 1 << 16)
    rank = _env_int("RANK", 0, world_size - 1)
    local_rank = _env_int("LOCAL_RANK", 0, world_size - 1, default=0)
    if world_size > 1:
        if not os.environ.get("MASTER_ADDR"):
            raise LaunchError("MASTER_ADDR is not set: start the processes with torchrun (it sets the address "
                              "where they meet)")
        _env_int("MASTER_PORT", 1, 65535)
    return Context(rank, world_size, local_rank)


JOIN_TIMEOUT_S = 120.0  # how long the processes wait for each other to start (S5_JOIN_TIMEOUT_S overrides it)


def join_timeout():
    text = os.environ.get("S5_JOIN_TIMEOUT_S") or str(JOIN_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 86400:
        raise LaunchError(f"S5_JOIN_TIMEOUT_S={text!r} is not a number of seconds from 0 to 86400: fix or unset it")
    return timedelta(seconds=seconds)


def setup(ctx, device):
    """Join the process group of `ctx` (from context_from_env) and pick this process's device.

    Returns the device this process trains on: with a CUDA `device` the GPU of its LOCAL_RANK, with NCCL;
    otherwise `device`, with gloo. Waits at most join_timeout() for every process to arrive, then LaunchError.
    A single process (world size 1) forms no group.
    """
    if not ctx.active:
        return device
    use_cuda = device.type == "cuda"
    if use_cuda:
        if ctx.local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {ctx.local_rank} has no GPU (this machine has "
                              f"{torch.cuda.device_count()}): start at most one process per GPU, or train on "
                              "the CPU")
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        addr, port, wait = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), join_timeout()
        hosts_store = ctx.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # torchrun's agent
        try:
            store = dist.TCPStore(addr, port, ctx.world_size, is_master=hosts_store, timeout=wait,
                                  wait_for_workers=True)
            dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=ctx.rank,
                                    world_size=ctx.world_size, timeout=TIMEOUT)
        except (RuntimeError, OSError, ValueError) as e:  # DistStoreError, DistNetworkError are RuntimeErrors
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise LaunchError(f"process {ctx.rank} of {ctx.world_size} could not join the group at {addr}:{port} "
                              f"within {wait.total_seconds():g} s ({reason}): start every process with "
                              "torchrun, with the same MASTER_ADDR and MASTER_PORT") from None
    return torch.device("cuda", ctx.local_rank) if use_cuda else device


def all_sum(ctx, *tensors):
    """Each tensor summed over all processes, in place (nothing happens in a single process); returns them."""
    if ctx.active:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


def broadcast(ctx, value):
    """Rank 0's Python value, on every rank."""
    if not ctx.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_every_rank(ctx, tensors):
    """Whether every process holds bit-identical tensors (compared by a checksum of their bytes)."""
    if not ctx.active:
        return True
    digest = torch.stack([t.detach().double().abs().sum() + t.detach().double().sum() for t in tensors])
    gathered = [torch.empty_like(digest) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def barrier(ctx):
    if ctx.active:
        dist.barrier()


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
