"""bench.py runs and reports every figure it promises (values are not asserted: timings are not tests)."""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def test_bench_prints_table_then_json(mnist_root):
    done = subprocess.run([sys.executable, str(REPO / "bench.py"), "--batches", "10", "--batch-size", "64",
                           "--data-dir", str(mnist_root)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    cpu = figures.get("device") == "cpu"  # the kept-memory row is a CPU (glibc) measurement
    for key in ["train_classic_fp32_img_s", "train_fast_fp32_img_s",
                "train_fast_amp_cl_img_s", "eval_classic_fp32_img_s", "eval_fast_amp_cl_img_s",
                "train_speedup_fast_amp_cl", "eval_speedup_fast_amp_cl",
                "conv_only_ms_per_batch", "conv_only_ceiling_img_s", "cpu", "cores", "torch", "device"] + (
               ["train_classic_fp32_kept_img_s", "train_speedup_fast_amp_cl_vs_kept"] if cpu else []):
        assert key in figures, key
    assert all(figures[k] > 0 for k in figures if k.endswith("_img_s"))
    rows = 5 + cpu  # training rows: classic, [kept,] four fast; then 2 evaluation rows
    assert sum(line.startswith(("train ", "eval ")) for line in lines) == rows + 2
    conv_rows = [line.split() for line in lines if line.lstrip().startswith("conv")]
    assert [row[0] for row in conv_rows] == ["conv1", "conv2", "conv3", "conv4"]
    assert "input" not in conv_rows[0] and all("input" in row for row in conv_rows[1:])  # images need no grad
    # ceiling = batch / seconds, both printed rounded to 0.1: the product is 64 to within what rounding allows
    ceiling, ms = figures["conv_only_ceiling_img_s"], figures["conv_only_ms_per_batch"]
    assert abs(ceiling * ms / 1e3 - 64) <= (ceiling + ms) * 0.05 / 1e3 + 1e-9


@pytest.mark.parametrize("flags,message", [
    (["--batches", "1"], "argument --batches: 1 is out of range: give 10 or more"),  # printed noise as 23x ratios
    (["--batches", "10", "--workers", "8"], "argument --batches: 10 is too few for --workers 8"),
    (["--target", "250"], "argument --target: 250 is out of range: give a percentage above 0 and at most 100"),
    (["--target", "0"], "argument --target: 0 is out of range"),
    (["--target", "nan"], "argument --target: nan is out of range"),
    (["--seeds", "2", "--compile"], "argument --compile: not with --seeds"),
    (["--seeds", "2", "--time-to-target"], "argument --time-to-target: not with --seeds"),
])
def test_flags_out_of_range_are_one_line_errors(flags, message):
    done = subprocess.run([sys.executable, str(REPO / "bench.py"), *flags], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.startswith(f"error: {message}")
    assert len(done.stderr.splitlines()) == 1


def test_accuracy_over_seeds_prints_each_run_then_a_consistent_summary(mnist_root, tmp_path):
    """bench.py --seeds on a tiny real budget: each run's line, the summary and the JSON agree with each other."""
    done = subprocess.run([sys.executable, str(REPO / "bench.py"), "--seeds", "2", "--first-seed", "5",
                           "--train-subset", "1024", "--epochs", "2", "--val-split", "1000", "--target", "50",
                           "--data-dir", str(mnist_root)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("2 runs of Recipe(name='fast'") and " min (from 8 timed steps)" in lines[0]
    figures = json.loads(lines[-1])
    runs = figures["runs"]
    assert [r["seed"] for r in runs] == [5, 6] and figures["seeds"] == [5, 6]
    for r in runs:
        assert f"seed {r['seed']}: test {r['test_acc']:.2f}%, validation {r['val_acc']:.2f}%" in done.stdout
        assert (tmp_path / r["folder"] / "final.json").exists()
    accs = [r["test_acc"] for r in runs]
    assert figures["test_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert figures["test_acc"]["min"] == min(accs) and figures["test_acc"]["reached"] == sum(a >= 50 for a in accs)
    assert figures["test_acc"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert f"test: mean {figures['test_acc']['mean']:.2f}%" in done.stdout
    assert figures["config"]["val_split"] == 1000 and figures["config"]["recipe"]["epochs"] == 2


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compile_reports_both_steps_and_whether_compiling_pays_back(mnist_root):
    done = subprocess.run([sys.executable, str(REPO / "bench.py"), "--batches", "10", "--batch-size", "64",
                           "--compile", "--data-dir", str(mnist_root)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    c = json.loads(done.stdout.strip().splitlines()[-1])["compile"]
    assert c["eager_img_s"] > 0 and c["compiled_img_s"] > 0 and c["compile_seconds"] >= 0
    line = next(line for line in done.stdout.splitlines() if line.startswith("torch.compile"))
    faster = c["compiled_img_s"] > c["eager_img_s"]
    assert (c["payback_steps"] is not None) == faster
    assert ("pays back after" in line) == faster and ("never pays back" in line) != faster
