"""Device, precision, seeds and CPU memory reuse."""
import platform
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from model import Net
from s5.device import (
    amp_dtype_for,
    channels_last_for,
    get_device,
    native_bf16,
    out_of_memory_typed,
    pins_memory,
    set_seed,
)


def test_amp_dtype_choice():
    assert amp_dtype_for("cpu", False) is None
    assert amp_dtype_for("cpu", True) is torch.bfloat16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert amp_dtype_for("cpu") is (torch.bfloat16 if native else None)


@pytest.fixture
def uncached_native_bf16():
    """native_bf16 caches each device's answer; these tests change the device under it."""
    native_bf16.cache_clear()
    yield
    native_bf16.cache_clear()


@pytest.mark.parametrize("capability, bf16, default, forced", [
    ((9, 0), True, None, torch.bfloat16),       # H100: TF32 convolutions, autocast measured slower
    ((8, 0), True, None, torch.bfloat16),       # A100
    ((7, 5), False, torch.float16, torch.float16),  # T4: no TF32, no bf16: fp16 with a GradScaler
])
def test_amp_dtype_choice_on_cuda(monkeypatch, uncached_native_bf16, capability, bf16, default, forced):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert amp_dtype_for("cuda") is default
    assert amp_dtype_for("cuda", True) is forced
    assert amp_dtype_for("cuda", False) is None


def test_set_seed_reproduces_weights():
    set_seed(5)
    a = Net().conv1.weight.clone()
    set_seed(5)
    assert torch.equal(a, Net().conv1.weight)


REALLOCATE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[2])
from utils import keep_freed_memory  # with all a run imports loaded: a bare process's small heap sits differently
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(3):
    torch.ones(64 << 20, dtype=torch.uint8)  # a training step's worth of buffers; the heap grows to fit
for _ in range(10):  # freed and allocated again, as step after step: the page faults of each
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 20, dtype=torch.uint8)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc; a no-op elsewhere")
def test_keep_freed_memory_reuses_big_buffers_instead_of_faulting_them_in_again():
    def page_faults(mode):  # the median step's: on busy cores the heap can take a few more steps to settle
        run = subprocess.run([sys.executable, "-c", REALLOCATE, mode, str(REPO)], capture_output=True, text=True,
                             check=True)
        return statistics.median(map(int, run.stdout.split()))

    # (the better of two processes kept: once, in a full suite on a Zen 4, one process faulted in half of every step's
    # buffer, 8,192 of 16,385 pages; three reruns and every earlier suite reused all of it)
    default, kept = page_faults("default"), min(page_faults("keep"), page_faults("keep"))
    assert default >= 16, default  # fresh pages every step (16 is 64 MB in 2 MB huge pages)
    assert kept < default / 4, (kept, default)  # most steps reuse the freed memory: no page faults


def pretend_accelerator(monkeypatch, kind, count):
    """torch.accelerator's answers on a machine with `count` devices of `kind` (this one has none)."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: torch.device(kind) if kind else None)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count if kind else 0)


def test_the_cpu_for_real():
    assert get_device("cpu") == torch.device("cpu")
    if torch.accelerator.current_accelerator(check_available=True) is None:  # this machine: no accelerator
        assert get_device() == get_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="'cuda' asked for, but this machine has cpu only: use cpu or auto"):
            get_device("cuda")


@pytest.mark.parametrize("kind", ["cuda", "mps", "xpu"])
def test_auto_takes_the_accelerator_pytorch_reports(monkeypatch, kind):
    pretend_accelerator(monkeypatch, kind, 2)
    assert get_device() == get_device("auto") == torch.device(kind)
    assert get_device(f"{kind}:1") == torch.device(kind, 1)
    assert get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=rf"'{kind}:2' asked for, but this machine has cpu and 2 {kind} devices "
                                         rf"\({kind}:0 to {kind}:1\)"):
        get_device(f"{kind}:2")
    other = "mps" if kind != "mps" else "cuda"
    with pytest.raises(ValueError, match=rf"'{other}' asked for, but this machine has cpu and 2 {kind} devices"):
        get_device(other)


def test_one_accelerator_is_named_without_an_index(monkeypatch):
    pretend_accelerator(monkeypatch, "cuda", 1)
    assert get_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"'cuda:1' asked for, but this machine has cpu and one cuda device \(cuda\): "
                                         "use it or auto"):
        get_device("cuda:1")


@pytest.mark.parametrize("name", ["tpu", "garbage", "cuda:-1"])
def test_unknown_device_names_are_one_line(name):
    with pytest.raises(ValueError) as err:
        get_device(name)
    assert "\n" not in str(err.value) and name in str(err.value)


def test_precision_and_layout_per_device_type():
    assert amp_dtype_for("mps") is None and amp_dtype_for("xpu") is None  # unmeasured: fp32
    assert amp_dtype_for("mps", True) is torch.float16 and amp_dtype_for("xpu", True) is torch.bfloat16
    assert [channels_last_for(d) for d in ("cpu", "cuda", "mps", "xpu")] == [True, True, False, False]
    assert channels_last_for("mps", True) and not channels_last_for("cpu", False)
    assert [pins_memory(d) for d in ("cpu", "cuda", "mps", "xpu")] == [False, True, False, True]


def test_the_cpu_allocator_failure_is_an_out_of_memory_error():
    with pytest.raises(torch.OutOfMemoryError, match="you tried to allocate"), out_of_memory_typed():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
    with pytest.raises(RuntimeError, match="^other$") as other, out_of_memory_typed():
        raise RuntimeError("other")
    assert type(other.value) is RuntimeError


def test_new_net_takes_the_layout_the_device_gets():
    from s5.device import new_net
    weight = lambda net: net.conv2.weight  # noqa: E731  (32 input channels: the two layouts differ)
    assert weight(new_net("cpu")).is_contiguous(memory_format=torch.channels_last)
    assert not weight(new_net("cpu")).is_contiguous()
    assert weight(new_net("cpu", channels_last=False)).is_contiguous()
    torch.manual_seed(0)
    a = new_net("cpu")
    torch.manual_seed(0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), new_net("cpu", False).parameters()))  # same weights
