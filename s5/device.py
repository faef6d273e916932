"""Where and how a run computes: the device, the precision, the memory layout (a new Net in it), the seeds, CPU memory
reuse (each the caller's choice)."""

import contextlib
import ctypes
import functools
import os
import platform
import random

import numpy as np
import torch

from model import Net
from s5.errors import ConfigError


def cpu_name():
    """The processor's model name (from /proc/cpuinfo on Linux), to print beside every timing."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def machine(device):
    """What a measurement ran on, for a JSON line (bench.py's and sweep.py's)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}


def as_device(device):
    """A torch.device from a torch.device, "cpu", "cuda", "cuda:1", ...; ConfigError for anything else."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"unknown device {device!r}: use cpu, cuda, cuda:N, mps, xpu or auto") from None


def get_device(name=None):
    """None or "auto": the accelerator torch.accelerator finds, else the CPU; else `name` if this machine has it."""
    kind = getattr(torch.accelerator.current_accelerator(check_available=True), "type", None)
    if name is None or name == "auto":
        return torch.device(kind or "cpu")
    device, count = as_device(name), torch.accelerator.device_count() if kind else 0
    if device.type == "cpu" or device.type == kind and (device.index or 0) < count:
        return device
    has = (f"cpu and {count} {kind} devices ({kind}:0 to {kind}:{count - 1}): use one of those" if count > 1 else
           f"cpu and one {kind} device ({kind}): use it" if kind else "cpu only: use cpu")
    raise ConfigError("device", f"{name!r} asked for, but this machine has {has} or auto")


def channels_last_for(device, channels_last=None):
    """channels_last unless forced: measured faster on CPUs (oneDNN) and CUDA GPUs (README: Speed), else unmeasured."""
    return as_device(device).type in ("cpu", "cuda") if channels_last is None else channels_last


def new_net(device, channels_last=None):
    """A freshly initialised Net on `device`, in the channels_last layout where `channels_last_for` says so."""
    layout = torch.channels_last if channels_last_for(device, channels_last) else torch.preserve_format
    return Net().to(device, memory_format=layout)


def pins_memory(device):
    """Whether pinned host memory speeds copies to `device` (CUDA and XPU; MPS shares memory with the CPU)."""
    return as_device(device).type in ("cuda", "xpu")


@functools.cache
def keep_freed_memory():
    """glibc keeps freed memory for the next CPU step, not new pages (docs/speed.md; peak memory stays): True if so."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_MAX, M_TRIM_THRESHOLD (malloc.h)


def set_seed(seed, deterministic=False):
    """Seed python, numpy, torch and every CUDA device; deterministic=True also forces deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:  # (cuDNN's benchmark mode is otherwise left to the caller)
        torch.backends.cudnn.benchmark = False
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@functools.cache
def native_bf16(device):
    """Whether `device` computes bf16 natively, not emulated: a CUDA GPU from Ampere (8.0) on, a CPU with AVX512-BF16
    or AMX."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def amp_dtype_for(device, amp=None):
    """The autocast dtype to train with on `device`, or None for fp32. amp=None decides by hardware: bf16 on CPUs with
    native bf16 (AVX512-BF16/AMX), not emulated; fp32 on CUDA from Ampere (8.0) on (TF32 beats autocast's casts for a
    net this small: docs/speed.md), else fp16; fp32 elsewhere (unmeasured). amp=False: fp32; True: bf16 (or fp16)."""
    device = as_device(device)
    if amp is False or amp is None and device.type == "cuda" and native_bf16(device):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if amp or native_bf16(device) else None
    return (torch.float16 if device.type == "mps" else torch.bfloat16) if amp else None


@contextlib.contextmanager
def out_of_memory_typed():
    """Within the block, the CPU allocator's failure (a plain RuntimeError) is a torch.OutOfMemoryError, as a GPU's."""
    try:
        yield
    except RuntimeError as e:
        if type(e) is not RuntimeError or "DefaultCPUAllocator: can't allocate memory" not in str(e):
            raise
        raise torch.OutOfMemoryError(str(e)) from e
