"""Data-parallel training under torchrun (gloo, 2 CPU processes), proven against one process."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, read_metrics, run_train

from s5.checkpoints import load_checkpoint
from s5.data import FastMNISTLoader

pytestmark = pytest.mark.slow  # starts torchrun

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# fp32 and deterministic algorithms, so the only differences left are the order of float additions
RUN = ["--no-progress", "--no-amp", "--recipe", "seed", "--batch-size", "64", "--seed", "3", "--deterministic"]


def torchrun(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, str(REPO / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, **kw)


@pytest.mark.parametrize("n, batch, world, augment", [(1000, 64, 2, True), (1000, 64, 3, True), (10, 4, 4, True),
                                                       (7, 8, 3, True), (100, 16, 3, "elastic")])
def test_shards_are_disjoint_and_add_up_to_the_single_process_batches(n, batch, world, augment):
    images = torch.arange(n).repeat_interleave(28 * 28).view(n, 28, 28).to(torch.uint8)  # image i holds i % 256
    labels = torch.arange(n)
    kw = dict(batch_size=batch, shuffle=True, augment=augment, device="cpu", seed=5)
    single = list(FastMNISTLoader(images, labels, **kw))
    shards = [list(FastMNISTLoader(images, labels, rank=r, world_size=world, **kw)) for r in range(world)]
    assert all(len(s) == len(single) for s in shards)  # every process takes the same number of steps
    for step, (x, y) in enumerate(single):
        xs = torch.cat([s[step][0] for s in shards])
        ys = torch.cat([s[step][1] for s in shards])
        assert torch.equal(ys, y) and torch.equal(xs, x)  # the same samples, the same augmentation draws
    seen = torch.cat([y for s in shards for _, y in s])
    assert sorted(seen.tolist()) == list(range(n))  # each epoch covers every image exactly once


def test_two_processes_train_as_one(tmp_path, mnist_root):
    args = [*RUN, "--train-subset", "640", "--epochs", "2", "--data-dir", mnist_root]
    two = torchrun(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "weights identical in all 2 processes" in two.stdout
    assert two.stdout.count("Test set:") == 2 and two.stdout.count("final test accuracy") == 1  # rank 0 alone
    one = run_train(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    a, b = read_metrics(tmp_path / "one" / "metrics.csv"), read_metrics(tmp_path / "two" / "metrics.csv")
    assert [r["epoch"] for r in b] == ["1", "2"]  # written once, one row per epoch
    # Two shards of 32 add up their gradients where one process sums 64 rows at once, and the convolutions
    # may pick other kernels for 32 rows: the last bits differ, and grow a little over 20 steps. Losses agree
    # to 1e-4; an image or two right at a decision boundary may flip (0.05% = 5 of the 10,000 test images).
    for ra, rb in zip(a, b):
        for key in ("train_loss", "test_loss"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-4), (key, ra, rb)
        for key in ("train_acc", "test_acc"):
            assert abs(float(rb[key]) - float(ra[key])) <= 0.05 + 1e-9, (key, ra, rb)
    wa, wb = torch.load(tmp_path / "one" / "model.pt"), torch.load(tmp_path / "two" / "model.pt")
    assert list(wa) == list(wb) and not any(k.startswith("module.") for k in wb)  # loadable by one process
    for k in wa:  # (one process on one thread, OMP_NUM_THREADS=1, picks other kernels again: two of conv2's 18,432
        # weights, both near 0, ended 1.1e-5 apart; the weights are of order 0.1)
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=3e-5)
    # a run saved under torchrun resumes in one process
    more = run_train("--resume", tmp_path / "two" / "last.pt", "--epochs", "3")
    assert more.returncode == 0, more.stderr
    assert [r["epoch"] for r in read_metrics(tmp_path / "two" / "metrics.csv")] == ["1", "2", "3"]


def child_pids(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_process_ends_the_group_and_the_run_resumes(tmp_path, mnist_root):
    out = tmp_path / "run"
    args = [*RUN, "--train-subset", "1024", "--epochs", "3", "--data-dir", str(mnist_root)]
    proc = subprocess.Popen([*TORCHRUN, str(REPO / "train.py"), *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "metrics.csv").exists():
        time.sleep(0.05)
    workers = child_pids(proc.pid)
    assert len(workers) == 2 and proc.poll() is None, "the run ended before a process could be killed"
    os.kill(workers[1], signal.SIGKILL)  # one rank dies mid-run
    _, err = proc.communicate(timeout=300)  # the group ends instead of hanging
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    # torchrun stops the other processes with SIGTERM (rank 0: "interrupted"); without an agent, rank 0 finds its
    # peer gone ("another process of the group stopped"). Either way: one line from rank 0, and how to go on.
    assert len(ours) == 1 and f"continue with python train.py --resume {out / 'last.pt'}" in ours[0], err[-3000:]
    assert f'File "{REPO / "train.py"}' not in err and f'File "{REPO / "s5"}' not in err  # torchrun's summary aside
    epoch = load_checkpoint(out / "last.pt")["epoch"]
    assert 1 <= epoch < 3
    resumed = torchrun("--resume", out / "last.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out / 'last.pt'} at epoch {epoch + 1}" in resumed.stdout
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == ["1", "2", "3"]


def test_an_empty_share_of_a_last_batch_under_mixed_precision(tmp_path, mnist_root):
    """641 images at batch 128: the last batch has one image, so one process has none; under bf16 autocast its
    stand-in loss is bf16, and the gradient's scaling must keep that dtype (it was a crash on both processes)."""
    done = torchrun("--no-progress", "--amp", "--recipe", "fast", "--epochs", "1", "--train-subset", "641",
                    "--data-dir", mnist_root, "--out", tmp_path / "out", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights identical in all 2 processes" in done.stdout


def test_divergence_stops_every_process_at_once(tmp_path, mnist_root):
    done = torchrun(*RUN, "--train-subset", "1024", "--lr", "10", "--epochs", "3", "--data-dir", mnist_root,
                    "--out", tmp_path / "nan", timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("error: training diverged") == 1  # one message, from rank 0


def test_classic_loader_under_three_processes(tmp_path, mnist_root):
    """The fixed evaluation batch (256) no longer needs to split over the processes; only --batch-size does, and
    rank 0 alone says so."""
    three = [*TORCHRUN[:-1], "--nproc_per_node=3", str(REPO / "train.py"), "--no-progress", "--loader", "classic",
             "--workers", "0", "--data-dir", str(mnist_root), "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([*three, "--batch-size", "512", "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=300)
    ours = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: argument --batch-size: 512 does not split evenly over 3 processes: give a multiple of 3 "
                    "for the classic loader"], bad.stderr[-3000:]
    assert bad.returncode != 0 and not (tmp_path / "bad").exists()
    good = subprocess.run([*three, "--batch-size", "513", "--train-subset", "1026", "--out", str(tmp_path / "good")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert good.returncode == 0, good.stderr[-3000:]
    assert good.stdout.count("Test set: Average loss") == 1 and "Accuracy: " in good.stdout
