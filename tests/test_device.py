"""Device, precision, seeds and CPU memory reuse."""
import platform
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from model import Net
from s5.device import amp_dtype_for, set_seed


def test_amp_dtype_choice():
    assert amp_dtype_for("cpu", False) is None
    assert amp_dtype_for("cpu", True) is torch.bfloat16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert amp_dtype_for("cpu") is (torch.bfloat16 if native else None)


@pytest.mark.parametrize("capability, bf16, default, forced", [
    ((9, 0), True, None, torch.bfloat16),       # H100: TF32 convolutions, autocast measured slower
    ((8, 0), True, None, torch.bfloat16),       # A100
    ((7, 5), False, torch.float16, torch.float16),  # T4: no TF32, no bf16: fp16 with a GradScaler
])
def test_amp_dtype_choice_on_cuda(monkeypatch, capability, bf16, default, forced):
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
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(64 << 20, dtype=torch.uint8)  # freed and allocated again, as step after step
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc; a no-op elsewhere")
def test_keep_freed_memory_reuses_big_buffers_instead_of_faulting_them_in_again():
    def page_faults(mode):
        run = subprocess.run([sys.executable, "-c", REALLOCATE, mode, str(REPO)], capture_output=True, text=True,
                             check=True)
        return int(run.stdout.split()[-1])

    default, kept = page_faults("default"), page_faults("keep")
    assert default > 10 * 16, default  # fresh pages every time (16 is 64 MB in 2 MB huge pages)
    assert kept < default / 4, (kept, default)  # at most a late heap extension or two
