"""Data-parallel training on the processes `torchrun` starts: their context, the group, and the sums (`all_sum`) that
let every rank see the same figures and take the same decisions (a NaN stops every rank at once)."""

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from s5.config import Field
from s5.errors import EXIT_FAILED, ConfigError, UserError, first_line

TIMEOUT = timedelta(minutes=5)  # a rank that stops answering ends the group instead of hanging it for 30 min
JOIN_TIMEOUT_S = 120.0  # how long the processes wait for each other to start (S5_JOIN_TIMEOUT_S overrides it)


@dataclass(frozen=True)
class Context:
    """This process's rank among world_size processes, and its rank on this machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world_size > 1


SINGLE = Context()  # one process, no group


class LaunchError(UserError, ValueError):
    """The torchrun environment variables are missing or inconsistent, or the group could not form."""


class GroupError(UserError, RuntimeError):
    """Another process of the group stopped or stopped answering mid-run."""
    exit_code = EXIT_FAILED


def _env(name, field, default=None, fix="start the processes with torchrun"):
    """The environment variable `name`, parsed and checked by `field`; `default` if unset (LaunchError if None)."""
    text = os.environ.get(name)
    if not text and default is None:
        raise LaunchError(f"{name} is not set: start the processes with torchrun (it sets RANK, WORLD_SIZE, "
                          "MASTER_ADDR and MASTER_PORT), or unset RANK and WORLD_SIZE to run one process")
    try:
        return field.parse(name, text) if text else default
    except ConfigError as e:
        raise LaunchError(f"{name}={e.reason}: {fix}") from None


def context_from_env():
    """This process's Context from torchrun's variables, checked; SINGLE without them."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return SINGLE
    world_size = _env("WORLD_SIZE", Field(int, 1, 1 << 16))
    rank = _env("RANK", Field(int, 0, world_size - 1))
    local_rank = _env("LOCAL_RANK", Field(int, 0, world_size - 1), default=0)
    if world_size > 1:
        _env("MASTER_ADDR", Field(str))
        _env("MASTER_PORT", Field(int, 1, 65535))
    return Context(rank, world_size, local_rank)


def setup(ctx, device):
    """Join `ctx`'s group (within S5_JOIN_TIMEOUT_S, else LaunchError); the device to train on (CUDA: LOCAL_RANK's)."""
    if not ctx.active:
        return device
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {ctx.local_rank} has no GPU (this machine has {torch.cuda.device_count()})"
                              ": start at most one process per GPU, or train on the CPU")
        torch.cuda.set_device(ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
    wait = _env("S5_JOIN_TIMEOUT_S", Field(float, 0, 86400, above=True), JOIN_TIMEOUT_S, "fix or unset it")
    try:  # the processes meet within `wait`; the group's collectives then wait TIMEOUT at most
        store = next(dist.rendezvous("env://", timeout=timedelta(seconds=wait)))[0]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=ctx.rank,
                                world_size=ctx.world_size, timeout=TIMEOUT)
    except (RuntimeError, OSError, ValueError) as e:  # DistStoreError, DistNetworkError are RuntimeErrors
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise LaunchError(f"process {ctx.rank} of {ctx.world_size} could not join the group at {where} within "
                          f"{wait:g} s ({first_line(e)}): start every process with torchrun, with the same "
                          "MASTER_ADDR and MASTER_PORT") from None
    return device


def all_sum(ctx, *tensors):
    """Each tensor summed over all processes, in place; returns them."""
    if ctx.active:
        for t in tensors:
            dist.all_reduce(t)  # ReduceOp.SUM
    return tensors


def broadcast(ctx, value):
    """Rank 0's Python value, on every rank."""
    box = [value]
    if ctx.active:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_every_rank(ctx, tensors):
    """Whether every process holds the same tensors, by float64 sums of their values and magnitudes: a cheap test
    for processes drifting apart, not a proof of bit-identity."""
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


def share_weighted(ctx, loss_fn):
    """`loss_fn` with its gradient scaled by this process's share of the global batch times the number of processes,
    so DDP's average is the single-process gradient even for unequal shares (a last batch); an empty share adds 0."""
    if not ctx.active:
        return loss_fn

    def weighted(output, target):
        n_global = all_sum(ctx, torch.tensor(len(target), device=output.device))[0]
        loss = loss_fn(output, target) if len(target) else output.sum() * 0.0  # (an empty share's is bf16 under amp)
        scale = len(target) * ctx.world_size / n_global  # on the device: no wait for the GPU every step
        loss.register_hook(lambda grad: grad * scale.to(grad.dtype))  # the gradient keeps the loss's dtype
        return loss
    return weighted


@contextlib.contextmanager
def group_errors(ctx):
    """A failed collective of `ctx`'s group in the block (DistError: a peer died or timed out) as a GroupError."""
    try:
        yield
    except dist.DistError as e:
        if not ctx.active:
            raise
        raise GroupError(f"another process of the group stopped or stopped answering ({first_line(e)})") from e
