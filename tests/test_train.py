"""train.py end to end, in subprocesses, as a user runs it (one in-process test counts plot redraws)."""
import csv
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from s5 import plots
from s5.checkpoints import load_checkpoint
from s5.data import raw_dir


def run_train(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--no-progress", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, **kw)


def read_metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


SMALL = ["--recipe", "fast", "--lr", "0.05", "--train-subset", "2048", "--batch-size", "64", "--seed", "3",
         "--deterministic"]


def test_run_writes_every_output(tmp_path, mnist_root):
    out = tmp_path / "run"
    done = run_train(*SMALL, "--epochs", "2", "--data-dir", mnist_root, "--out", out)
    assert done.returncode == 0, done.stderr
    for name in ["metrics.csv", "accuracy_plots.png", "last.pt", "best.pt", "model.pt", "confusion_matrix.png",
                 "misclassified.png"]:
        assert (out / name).stat().st_size > 0, name
    rows = read_metrics(out / "metrics.csv")
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_seconds",
                             "elapsed_seconds"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["elapsed_seconds"]) > float(rows[0]["elapsed_seconds"]) > float(rows[0]["train_seconds"])
    assert 70 < float(rows[1]["test_acc"]) <= 100
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["args"]["train_subset"] == 2048
    # the same folder is not silently overwritten
    again = run_train(*SMALL, "--epochs", "1", "--data-dir", mnist_root, "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, mnist_root):
    args = [*SMALL, "--epochs", "4", "--data-dir", mnist_root]
    full = run_train(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--no-progress", *map(str, args), "--out",
                             str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.csv").exists() and len(read_metrics(out / "metrics.csv")) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "last.pt")["epoch"]  # intact and loadable after kill -9
    assert 2 <= killed_at < 4, "the run finished before it could be killed"

    resumed = run_train("--resume", out / "last.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out / 'last.pt'} at epoch {killed_at + 1}" in resumed.stdout
    a, b = read_metrics(tmp_path / "full" / "metrics.csv"), read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in b] == ["1", "2", "3", "4"]  # one row per epoch, no duplicates
    columns = ["lr", "train_loss", "train_acc", "test_loss", "test_acc"]
    assert [[r[c] for c in columns] for r in a] == [[r[c] for c in columns] for r in b]
    wa, wb = torch.load(tmp_path / "full" / "model.pt"), torch.load(out / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_divergence_stops_with_message_and_keeps_good_checkpoint(tmp_path, mnist_root):
    out = tmp_path / "nan"
    done = run_train("--recipe", "seed", "--train-subset", "2048", "--lr", "10", "--epochs", "3",
                     "--data-dir", mnist_root, "--out", out)
    assert done.returncode == 1
    assert "training diverged" in done.stderr and "--lr below 10" in done.stderr
    assert "Traceback" not in done.stderr
    if (out / "last.pt").exists():  # any checkpoint kept is a good one
        assert all(x == x for x in load_checkpoint(out / "last.pt")["history"]["train_loss"])


@pytest.mark.parametrize("content,match", [
    (b"not a checkpoint", "not a readable checkpoint"),
    (None, "no checkpoint at"),
])
def test_bad_resume_file_one_line_error(tmp_path, content, match):
    path = tmp_path / "last.pt"
    if content is not None:
        path.write_bytes(content)
    done = run_train("--resume", path)
    assert done.returncode == 2 and match in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_data_is_one_line_error(tmp_path):
    bad = tmp_path / "root"
    raw_dir(bad).mkdir(parents=True)
    (raw_dir(bad) / "train-images-idx3-ubyte").write_bytes(b"\0" * 100)
    done = run_train("--data-dir", bad, "--out", tmp_path / "o", "--epochs", "1")
    assert done.returncode == 2 and "train-images-idx3-ubyte is corrupt or truncated" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("every_s, drawn_after", [(0.0, [1, 2, 3]), (1e9, [1, 3])])
def test_accuracy_plot_redrawn_at_most_every_plot_every_s(tmp_path, mnist_root, monkeypatch, every_s, drawn_after):
    """In-process, to count redraws: the first and last epochs always draw, others only PLOT_EVERY_S apart."""
    import train

    drawn = []
    real = plots.post_accuracyplots
    monkeypatch.setattr(plots, "post_accuracyplots", lambda *a, **k: drawn.append(len(a[0])) or real(*a, **k))
    monkeypatch.setattr(train, "PLOT_EVERY_S", every_s)
    train.main(["--no-progress", "--recipe", "fast", "--lr", "0.05", "--train-subset", "512", "--batch-size", "64",
                "--epochs", "3", "--data-dir", str(mnist_root), "--out", str(tmp_path / "run")])
    assert drawn == drawn_after  # the number of epochs each redraw showed
    assert (tmp_path / "run" / "accuracy_plots.png").stat().st_size > 0
