"""Where and how a run computes: the device, the precision, the seeds, and CPU memory reuse.

Nothing here runs by itself: the entry points and the notebook choose what to switch on.
"""

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
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def as_device(device):
    """A torch.device from what PyTorch code passes: a torch.device, "cpu", "cuda", "cuda:1"; ConfigError otherwise."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"unknown device {device!r}: use cpu, cuda, cuda:N, mps, xpu or auto") from None


def accelerator():
    """This machine's accelerator type as PyTorch sees it ("cuda", "mps", "xpu", ...), or None: torch.accelerator,
    which knows every backend, so a new one needs no change here."""
    found = torch.accelerator.current_accelerator(check_available=True)
    return found.type if found is not None else None


def machine_devices():
    """What `get_device` can give here, in words: "cpu", or e.g. "cpu and 2 cuda devices (cuda:0 to cuda:1)"."""
    kind = accelerator()
    if kind is None:
        return "cpu only"
    count = torch.accelerator.device_count()
    return f"cpu and {count} {kind} device{'s' if count != 1 else ''} ({kind}:0 to {kind}:{count - 1})" \
        if count > 1 else f"cpu and one {kind} device ({kind})"


def get_device(name=None):
    """The device to run on: for None or "auto" the machine's accelerator (CUDA, MPS, XPU, ... through
    torch.accelerator) when there is one, else the CPU; otherwise `name` ("cpu", "cuda:1", "mps", ...) checked.

    Raises ConfigError with a one-line fix, naming what the machine has, for a device it does not have.
    """
    if name is None or name == "auto":
        kind = accelerator()
        return torch.device(kind if kind is not None else "cpu")
    device = as_device(name)
    if device.type == "cpu":
        return device
    kind = accelerator()
    if device.type != kind:
        raise ConfigError("device", f"{name!r} asked for, but this machine has {machine_devices()}: use "
                                    f"{kind or 'cpu'} or auto")
    if (device.index or 0) >= torch.accelerator.device_count():
        raise ConfigError("device", f"{name!r} asked for, but this machine has {machine_devices()}: use one of "
                                    "those")
    return device


def channels_last_for(device, channels_last=None):
    """Whether to lay the model out channels_last on `device`: measured faster on CPUs (oneDNN) and CUDA GPUs
    (README: Speed); left off elsewhere (MPS, XPU, ...), unmeasured. True/False force it."""
    if channels_last is not None:
        return channels_last
    return as_device(device).type in ("cpu", "cuda")


def pins_memory(device):
    """Whether pinned host memory speeds copies to `device` (CUDA and XPU; MPS shares memory with the CPU)."""
    return as_device(device).type in ("cuda", "xpu")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt() parameters, from glibc's malloc.h
_freed_memory_kept = False


def keep_freed_memory():
    """Make glibc keep freed memory for reuse, so each CPU training step reuses the last one's buffers.

    A training step frees and re-allocates activation buffers of tens of MB. glibc serves blocks that big
    with fresh mmap()ed pages and unmaps them on free, so every step pays a page fault per 4 KB touched
    (docs/speed.md's bench table measures what that costs). With mmap and heap trimming off, freed blocks are
    reused. The cost: the process keeps its peak memory until it exits, and the setting cannot be undone,
    so it is the caller's choice (runs, the benchmark and the notebook make it on the CPU). Only on Linux
    with glibc; returns whether the settings are in effect.
    """
    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    _freed_memory_kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _freed_memory_kept


def set_seed(seed, deterministic=False):
    """Seed python, numpy, torch and CUDA; with deterministic=True also force deterministic algorithms.

    (cuDNN's benchmark mode, which picks convolution algorithms by timing them, is left to the caller,
    except that deterministic=True turns it off, as determinism requires.)
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def amp_dtype_for(device, amp=None):
    """The autocast dtype to train with on `device`, or None for full fp32.

    amp=None decides by hardware: bf16 on CPUs with native bf16 instructions (AVX512-BF16/AMX), plain fp32
    on other CPUs, where bf16 is emulated and slower. On CUDA GPUs from Ampere on (compute capability 8.0+)
    fp32, whose convolutions already run on TF32 tensor cores: for a net this small autocast's extra casts
    cost more than bf16 saves (measured: docs/speed.md, GPU); fp16 with a GradScaler on older GPUs. Other
    accelerators (MPS, XPU, ...) train fp32 unless asked: unmeasured here. amp=False forces fp32; amp=True
    forces mixed precision (bf16 where the GPU has it, else fp16; fp16 on MPS, bf16 elsewhere).
    """
    device = as_device(device)
    if amp is False:
        return None
    if device.type == "cuda":
        if amp is None and torch.cuda.get_device_capability(device) >= (8, 0):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if amp or torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    if amp:
        return torch.float16 if device.type == "mps" else torch.bfloat16
    return None


CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


@contextlib.contextmanager
def out_of_memory_typed():
    """Within the block, the CPU allocator's failure is raised as torch.OutOfMemoryError, the type a GPU's has: the
    allocator raises a plain RuntimeError (c10's enforce), whose message is its only sign."""
    try:
        yield
    except RuntimeError as e:
        if type(e) is not RuntimeError or CPU_OUT_OF_MEMORY not in str(e):
            raise
        raise torch.OutOfMemoryError(str(e).split(CPU_OUT_OF_MEMORY)[-1].strip(": ")) from e
