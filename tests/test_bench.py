"""bench.py, the speed benchmark: it runs and reports every figure it promises (values are not asserted: timings are
not tests), refuses bad flags in one line, and stops on Ctrl-C or SIGTERM with one line. Seeds are sweep.py's
(test_sweep.py)."""
import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO

from s5 import config, data
from s5.device import get_device

pytestmark = pytest.mark.slow  # each test starts bench.py
COMPILER = shutil.which("c++") or shutil.which("g++")  # torch.compile on the CPU needs one


def bench(*flags, **kw):
    return subprocess.run([sys.executable, str(REPO / "bench.py"), *map(str, flags)], capture_output=True, text=True,
                          **kw)


def test_bench_prints_table_then_json(mnist_root):
    """One real run at a tiny budget (with --compile where a C++ compiler is): the table, each convolution, the
    ceiling, the ratios, the step's profile, then one JSON line that agrees with them."""
    done = bench("--batches", 10, "--batch-size", 64, "--data-dir", mnist_root, "--profile", "--device", "cpu",
                 *(["--compile"] if COMPILER else []), timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    cpu = figures["device"] == "cpu"  # the kept-memory row is a CPU (glibc) measurement
    for key in ["train_classic_fp32_img_s", "train_fast_fp32_img_s", "train_fast_fp32_cl_img_s", "train_fast_amp_img_s",
                "train_fast_amp_cl_img_s", "eval_classic_fp32_img_s", "eval_fast_amp_cl_img_s",
                "train_speedup_fast_fp32", "train_speedup_fast_amp_cl", "eval_speedup_fast_amp_cl",
                "conv_only_ms_per_batch", "conv_only_ceiling_img_s", "cpu", "cores", "torch", "device"] + (
               ["train_classic_fp32_kept_img_s", "train_speedup_fast_amp_cl_vs_kept"] if cpu else []):
        assert key in figures, key
    assert all(figures[k] > 0 for k in figures if k.endswith("_img_s"))
    # training at --batch-size, evaluation at the batch every evaluation uses
    assert figures["batch_size"] == 64 and figures["eval_batch_size"] == data.TEST_BATCH
    rows = [line for line in lines if line.startswith(("train ", "eval ")) and line.endswith(" img/s")]
    assert len(rows) == 5 + cpu + 2  # training: classic, [kept,] four fast; then 2 evaluation rows
    assert sum("channels_last" in row for row in rows) == 3 and sum("fp32" in row for row in rows) == 4 + cpu
    conv_rows = [line.split() for line in lines if line.lstrip().startswith("conv") and "GFLOP/s" in line]
    assert [row[0] for row in conv_rows] == ["conv1", "conv2", "conv3", "conv4"]
    assert "input" not in conv_rows[0] and all("input" in row for row in conv_rows[1:])  # images need no grad
    # ceiling = batch / seconds, both printed rounded to 0.1: the product is 64 to within what rounding allows
    ceiling, ms = figures["conv_only_ceiling_img_s"], figures["conv_only_ms_per_batch"]
    assert abs(ceiling * ms / 1e3 - 64) <= (ceiling + ms) * 0.05 / 1e3 + 1e-9
    reached = re.search(r"the fast path reached (\d+)% of that", done.stdout)
    assert reached and abs(int(reached[1]) - 100 * figures["train_fast_amp_cl_img_s"] / ceiling) <= 1
    # the profile: every layer's passes found by its shapes, and the rows add up to the profiled step
    profiled = figures["profile_ms_per_batch"]
    for part in ["conv1 forward", "conv1 backward", "conv2 pool forward", "conv2 pool backward", "conv4 pool forward",
                 "fc1 forward, backward", "fc2 forward, backward", "loss", "optimizer SGD.step",
                 "loader batch, augmentation"] + [f"conv{k} {p}" for k in (2, 3, 4) for p in ("forward", "backward")]:
        assert profiled.get(part, 0) > 0, part
    step_ms = float(re.search(r"([\d.]+) ms a batch under torch.profiler", done.stdout)[1])
    assert sum(profiled.values()) == pytest.approx(step_ms, rel=0.01, abs=0.1)
    share = re.search(r"convolutions (\d+)% of the profiled step, everything else (\d+)%", done.stdout)
    assert share and int(share[1]) + int(share[2]) in (99, 100, 101)
    speedups = [k for k in figures if "_speedup_" in k]
    assert len(speedups) == 3 + cpu and sum("speedup" in line for line in lines[:-1]) == len(speedups)
    for key in speedups:
        kind, new = key.split("_speedup_")
        old = "classic_fp32_kept" if new.endswith("_vs_kept") else "classic_fp32"
        ratio = figures[f"{kind}_{new.removesuffix('_vs_kept')}_img_s"] / figures[f"{kind}_{old}_img_s"]
        assert figures[key] == pytest.approx(ratio, abs=0.01)
    if COMPILER:
        c = figures["compile"]
        assert c["eager_img_s"] > 0 and c["compiled_img_s"] > 0 and c["compile_seconds"] >= 0
        line = next(line for line in lines if line.startswith("torch.compile"))
        faster = c["compiled_img_s"] > c["eager_img_s"]
        assert (c["payback_steps"] is not None) == faster
        assert ("pays back after" in line) == faster and ("never pays back" in line) != faster


def test_defaults_are_the_seed_recipes_batch(monkeypatch):
    import bench as bench_py

    given = {}
    monkeypatch.setattr(bench_py, "bench", lambda args, device: given.update(vars(args), resolved=device))
    bench_py.main([])
    assert given["batch_size"] == config.RECIPES["seed"].batch_size == 512
    assert given["batches"] == 60 and given["device"] == "auto" and given["resolved"] == get_device("auto")
    assert not given["compile"] and not given["profile"]


@pytest.mark.parametrize("flags,message", [
    (["--batches", "1"], "argument --batches: 1 is out of range: give 10 or more"),  # printed noise as 23x ratios
    (["--batch-size", "0"], "argument --batch-size: 0 is out of range: give 1 to 60000"),
    (["--time-to-target"], "unrecognized arguments: --time-to-target"),  # a recipe's time and accuracy: sweep.py
    (["--device", "tpu"], "argument --device: unknown device 'tpu'"),  # s5's ConfigError, found before any work
    (["--seeds", "2"], "unrecognized arguments: --seeds 2"),  # accuracy over seeds is sweep.py's now
])
def test_flags_out_of_range_are_one_line_errors(flags, message):
    done = bench(*flags, timeout=600)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.startswith(f"error: {message}"), done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_mid_table_ends_with_one_line(mnist_root, sig):
    """Stopped while the classic DataLoader's workers run (after the first row): `error: interrupted`, exit 130."""
    proc = subprocess.Popen([sys.executable, str(REPO / "bench.py"), "--batches", "10", "--batch-size", "64",
                             "--data-dir", str(mnist_root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("train classic DataLoader"), (first, first or proc.communicate(timeout=60)[1])
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == "error: interrupted\n", (proc.returncode, err[-2000:])
    assert "{" not in out  # no JSON line: the figures are not all there
