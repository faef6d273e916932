"""Where and how a run computes: the device, the precision, the seeds, CPU memory reuse (each the caller's choice)."""

import contextlib
import ctypes
import os
import platform
import random

import numpy as np
import torch

from s5.errors import ConfigError


def cpu_name():
    """The processor's model name (from /proc/cpuinfo on Linux), to print beside every timing."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def as_device(device):
    """A torch.device from a torch.device, "cpu", "cuda", "cuda:1", ...; ConfigError for anything else."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"unknown device {device!r}: use cpu, cuda, cuda:N, mps, xpu or auto") from None


def accelerator():
    """This machine's accelerator type ("cuda", "mps", "xpu", ...) or None, as torch.accelerator sees it."""
    return getattr(torch.accelerator.current_accelerator(check_available=True), "type", None)


def get_device(name=None):
    """The device to run on: for None or "auto" the machine's accelerator when there is one, else the CPU; otherwise
    `name` ("cpu", "cuda:1", "mps", ...), checked: ConfigError naming what the machine has for one it does not."""
    if name is None or name == "auto":
        return torch.device(accelerator() or "cpu")
    device = as_device(name)
    if device.type == "cpu":
        return device
    kind = accelerator()
    count = torch.accelerator.device_count() if kind else 0
    if device.type == kind and (device.index or 0) < count:
        return device
    has = (f"cpu and {count} {kind} devices ({kind}:0 to {kind}:{count - 1})" if count > 1 else
           f"cpu and one {kind} device ({kind})" if kind else "cpu only")
    use = "one of those" if device.type == kind else f"{kind or 'cpu'} or auto"
    raise ConfigError("device", f"{name!r} asked for, but this machine has {has}: use {use}")


def channels_last_for(device, channels_last=None):
    """Whether to lay the model out channels_last on `device`: measured faster on CPUs (oneDNN) and CUDA GPUs
    (README: Speed), unmeasured elsewhere (MPS, XPU, ...). True/False force it."""
    return as_device(device).type in ("cpu", "cuda") if channels_last is None else channels_last


def pins_memory(device):
    """Whether pinned host memory speeds copies to `device` (CUDA and XPU; MPS shares memory with the CPU)."""
    return as_device(device).type in ("cuda", "xpu")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt() parameters, from glibc's malloc.h
_freed_memory_kept = False


def keep_freed_memory():
    """Make glibc keep freed memory, so each CPU training step reuses the last one's buffers instead of faulting in
    fresh pages (docs/speed.md); returns whether it does (Linux, glibc). Peak memory is kept: the caller's choice."""
    global _freed_memory_kept
    if not _freed_memory_kept and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        _freed_memory_kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _freed_memory_kept


def set_seed(seed, deterministic=False):
    """Seed python, numpy, torch and every CUDA device; deterministic=True also forces deterministic algorithms and
    turns cuDNN's benchmark mode off (otherwise left to the caller)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def amp_dtype_for(device, amp=None):
    """The autocast dtype to train with on `device`, or None for fp32. amp=None decides by hardware: bf16 on CPUs with
    native bf16 (AVX512-BF16/AMX), else fp32 (emulated bf16 is slower); on CUDA fp32 from Ampere (8.0) on (TF32
    convolutions beat autocast's casts for a net this small: docs/speed.md), else fp16 (with a GradScaler); fp32 on
    other accelerators (unmeasured). amp=False forces fp32, amp=True bf16 (fp16 on MPS and GPUs without bf16)."""
    device = as_device(device)
    if amp is False or amp is None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if amp or torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return (torch.float16 if device.type == "mps" else torch.bfloat16) if amp else None


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


@contextlib.contextmanager
def out_of_memory_typed():
    """Within the block, the CPU allocator's failure (a plain RuntimeError) is a torch.OutOfMemoryError, as a GPU's."""
    try:
        yield
    except RuntimeError as e:
        if type(e) is not RuntimeError or CPU_OUT_OF_MEMORY not in str(e):
            raise
        raise torch.OutOfMemoryError(str(e).split(CPU_OUT_OF_MEMORY)[-1].strip(": ")) from e
