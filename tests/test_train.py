"""train.py end to end, in subprocesses, as a user runs it (one in-process test counts plot redraws)."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, assert_one_line_error, read_metrics, run_train

from s5 import plots
from s5.checkpoints import load_checkpoint
from s5.files import RunDir
from s5.mnist import raw_dir

SMALL = ["--recipe", "fast", "--train-subset", "2048", "--batch-size", "64", "--seed", "3",
         "--deterministic"]


@pytest.mark.slow
def test_run_writes_every_output(tmp_path, mnist_root):
    out = tmp_path / "run"
    done = run_train(*SMALL, "--epochs", "2", "--data-dir", mnist_root, "--out", out)
    assert done.returncode == 0, done.stderr
    for name in ["metrics.csv", "steps.csv", "accuracy_plots.png", "training_curves.png", "last.pt", "best.pt",
                 "model.pt", "confusion_matrix.png", "misclassified.png"]:
        assert (out / name).stat().st_size > 0, name
    rows = read_metrics(out / "metrics.csv")
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_seconds",
                             "elapsed_seconds"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["elapsed_seconds"]) > float(rows[0]["elapsed_seconds"]) > float(rows[0]["train_seconds"])
    assert 70 < float(rows[1]["test_acc"]) <= 100
    steps = read_metrics(out / "steps.csv")  # 2048 / 64 = 32 batches an epoch: rows after 10, 20, 30 and 32
    assert [float(r["step_epoch"]) for r in steps] == pytest.approx([10 / 32, 20 / 32, 30 / 32, 1.0,
                                                                      1 + 10 / 32, 1 + 20 / 32, 1 + 30 / 32, 2.0])
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["config"]["train_subset"] == 2048
    assert state["config"]["recipe"]["batch_size"] == 64 and state["config"]["recipe"]["epochs"] == 2
    # the same folder is not silently overwritten
    again = run_train(*SMALL, "--epochs", "1", "--data-dir", mnist_root, "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_divergence_stops_with_message_and_keeps_good_checkpoint(tmp_path, mnist_root):
    out = tmp_path / "nan"
    done = run_train("--recipe", "seed", "--train-subset", "2048", "--lr", "10", "--epochs", "3",
                     "--data-dir", mnist_root, "--out", out)
    assert done.returncode == 1
    assert "training diverged" in done.stderr and "--lr below 10" in done.stderr
    assert "Traceback" not in done.stderr
    if (out / "last.pt").exists():  # any checkpoint kept is a good one
        assert all(x == x for x in load_checkpoint(out / "last.pt")["history"]["train_loss"])


@pytest.mark.slow  # a new process each
@pytest.mark.parametrize("content,match", [
    (b"not a checkpoint", "not a readable checkpoint"),
    (None, "no checkpoint at"),
])
@pytest.mark.slow
def test_bad_resume_file_one_line_error(tmp_path, content, match):
    path = tmp_path / "last.pt"
    if content is not None:
        path.write_bytes(content)
    done = run_train("--resume", path)
    assert done.returncode == 2 and match in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a new process each
def test_missing_data_is_one_line_error(tmp_path):
    bad = tmp_path / "root"
    raw_dir(bad).mkdir(parents=True)
    (raw_dir(bad) / "train-images-idx3-ubyte").write_bytes(b"\0" * 100)
    done = run_train("--data-dir", bad, "--out", tmp_path / "o", "--epochs", "1")
    assert done.returncode == 2 and "train-images-idx3-ubyte is corrupt or truncated" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("every_s, drawn_after", [(0.0, [1, 2, 3]), (1e9, [1, 3])])
def test_accuracy_plot_redrawn_at_most_every_plot_every_s(tmp_path, mnist_root, monkeypatch, every_s, drawn_after):
    """In-process, to count redraws: the first and last epochs always draw, others only PLOT_EVERY_S apart."""
    import train

    drawn = []
    real = plots.post_accuracyplots
    monkeypatch.setattr(plots, "post_accuracyplots", lambda *a, **k: drawn.append(len(a[0])) or real(*a, **k))
    monkeypatch.setattr("s5.callbacks.PLOT_EVERY_S", every_s)
    train.main(["--no-progress", "--recipe", "fast", "--train-subset", "512", "--batch-size", "64",
                "--epochs", "3", "--data-dir", str(mnist_root), "--out", str(tmp_path / "run")])
    assert drawn == drawn_after  # the number of epochs each redraw showed
    assert (tmp_path / "run" / "accuracy_plots.png").stat().st_size > 0


# --- robustness: every bad input is a one-line error, and nothing is lost ---------------------------------------

TINY = ["--recipe", "seed", "--train-subset", "256", "--batch-size", "64", "--seed", "3", "--deterministic"]


def main_in_process(capsys, *args):
    """train.main as the command line calls it, in this process: the same parser and checks without the seconds
    a new process takes to import torch (for the cases that stop before training; a few are also run as
    subprocesses below)."""
    import train

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(["--no-progress", *map(str, args)])
    return subprocess.CompletedProcess([], stop.value.code, "", capsys.readouterr().err)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags, needle", [
    (["--epochs", "0"], "--epochs: 0 is out of range"),
    (["--epochs", "-1"], "--epochs: -1 is out of range"),
    (["--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["--batch-size", "-5"], "--batch-size: -5 is out of range"),
    (["--lr", "-1"], "--lr: -1 is out of range"),
    (["--lr", "nan"], "--lr: nan is out of range"),
    (["--train-subset", "0"], "--train-subset: 0 is out of range"),
    (["--train-subset", "-1"], "--train-subset: -1 is out of range"),
    (["--loader", "classic", "--train-subset", "10000000"], "--train-subset: 10000000 is out of range: give 1 to"),
    (["--workers", "-1"], "--workers: -1 is out of range"),
    (["--seed", "-1"], "--seed: -1 is out of range"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--device", "garbage"], "unknown device 'garbage'"),
    (["--recipe", "best", "--loader", "classic"], "--loader: the classic loader has the original's augmentation only"),
    (["--augment", "elastic", "--loader", "classic"], "--loader: the classic loader has the original's"),
])
def test_impossible_flags_fail_before_any_work(tmp_path, capsys, flags, needle):
    done = main_in_process(capsys, *flags, "--data-dir", tmp_path / "data", "--out", tmp_path / "out")
    assert_one_line_error(done, 2, needle)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # nothing read, nothing made


@pytest.mark.slow  # a new process each
def test_impossible_flag_from_the_command_line(tmp_path):
    done = run_train("--lr", "nan", "--data-dir", tmp_path / "data")
    assert_one_line_error(done, 2, "argument --lr: nan is out of range: give a number above 0")


@pytest.mark.slow
def test_too_few_steps_for_one_cycle_is_one_line(tmp_path, mnist_root):
    done = run_train(*SMALL, "--train-subset", "256", "--epochs", "1", "--data-dir", mnist_root,
                     "--out", tmp_path / "o")
    assert_one_line_error(done, 2, "a one-cycle schedule needs at least 5 optimizer steps", "this run has 4")


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unusable_out_fails_before_reading_data(tmp_path, capsys, where):
    out = tmp_path / "a-file" if where == "file" else "/proc/s5-no-such-place/run"
    if where == "file":
        out.write_text("keep me")
    done = main_in_process(capsys, "--data-dir", tmp_path / "data", "--out", out)
    assert_one_line_error(done, 2, "is a file, not a folder" if where == "file" else "cannot create the output folder")
    assert not (tmp_path / "data").exists()
    if where == "file":
        assert out.read_text() == "keep me"


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unusable_data_dir_is_one_line(tmp_path, capsys, where):
    data_dir = tmp_path / "a-file" if where == "file" else "/proc/s5-no-such-place"
    if where == "file":
        data_dir.write_text("not a folder")
    done = main_in_process(capsys, "--data-dir", data_dir, "--out", tmp_path / "out")
    assert_one_line_error(done, 2, "cannot write MNIST into")
    assert not (tmp_path / "out" / "last.pt").exists()


@pytest.mark.slow
def test_out_folder_holding_other_files_is_left_alone(tmp_path, mnist_root):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "accuracy_plots.png").write_bytes(b"the README's picture")
    (docs / "notes.txt").write_text("mine")
    before = snapshot(docs)
    done = run_train(*TINY, "--epochs", "1", "--data-dir", mnist_root, "--out", docs)
    assert_one_line_error(done, 2, "is not empty", "accuracy_plots.png")
    assert snapshot(docs) == before


@pytest.mark.slow
def test_two_runs_into_one_folder_one_is_refused(tmp_path, mnist_root):
    out = tmp_path / "shared"
    cmd = [sys.executable, str(REPO / "train.py"), "--no-progress", *TINY, "--epochs", "2", "--data-dir",
           str(mnist_root), "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert "another process is running the run in" in results[1][1] or "already holds a run" in results[1][1]
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == ["1", "2"]  # the winner's run, whole


@pytest.mark.slow
def test_best_checkpoint_is_never_behind_the_last_one(tmp_path, mnist_root, monkeypatch):
    """Killed between an epoch's two saves: best.pt must not be older than the best epoch last.pt records."""
    import train

    saves = []
    real = RunDir.write

    def dies_at_the_second_save(self, name, data):
        if name.endswith(".pt"):
            saves.append(name)
            if len(saves) == 2:  # epoch 1 improves, so it saves twice: die between the two
                raise KeyboardInterrupt
        real(self, name, data)

    monkeypatch.setattr(RunDir, "write", dies_at_the_second_save)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main([*TINY, "--no-progress", "--epochs", "2", "--data-dir", str(mnist_root), "--out", str(out)])
    assert stop.value.code == 130
    if (out / "last.pt").exists():
        last = load_checkpoint(out / "last.pt")
        accs = last["history"]["test_acc"]
        best_epoch = last["history"]["epoch"][accs.index(max(accs))]
        assert load_checkpoint(out / "best.pt")["epoch"] >= best_epoch
    assert saves[0] == "best.pt"


@pytest.fixture(scope="module")
def finished_run(mnist_root, tmp_path_factory):
    """A finished one-epoch run of the `seed` recipe (StepLR: it can be extended)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = run_train(*TINY, "--epochs", "1", "--data-dir", mnist_root, "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def copy_of(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("flags, name", [
    (["--lr", "0.1"], "--lr"), (["--batch-size", "32"], "--batch-size"), (["--recipe", "fast"], "--recipe"),
    (["--seed", "9"], "--seed"), (["--train-subset", "100"], "--train-subset"), (["--loader", "classic"], "--loader"),
    (["--augment", "affine"], "--augment"), (["--tta"], "--tta"),
])
@pytest.mark.slow
def test_resume_refuses_flags_that_define_the_run(finished_run, tmp_path, capsys, flags, name):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    done = main_in_process(capsys, "--resume", run / "last.pt", *flags)
    assert_one_line_error(done, 2, f"argument {name}: cannot change when resuming")
    assert snapshot(run) == before


@pytest.mark.slow
def test_resume_extends_a_finished_run_and_cleans_stale_temporaries(finished_run, tmp_path, mnist_root):
    run = copy_of(finished_run, tmp_path)
    run_id = (run / ".s5-run").read_text().split()[1]
    (run / f".last.pt.{run_id}.killed.tmp").write_bytes(b"half a checkpoint from a killed save")
    (run / ".someone-elses.tmp").write_bytes(b"not the run's")
    moved = tmp_path / "moved-data"
    raw_dir(moved).mkdir(parents=True)
    for f in raw_dir(mnist_root).iterdir():
        (raw_dir(moved) / f.name).symlink_to(f)
    done = run_train("--resume", run / "last.pt", "--epochs", "2", "--data-dir", moved, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert f"resuming {run / 'last.pt'} at epoch 2" in done.stdout
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == ["1", "2"]
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["config"]["data_dir"] == str(moved) and state["run_id"] == run_id
    assert [p.name for p in run.glob(".*.tmp")] == [".someone-elses.tmp"]  # only the run's own leftovers went


@pytest.mark.slow
def test_resume_of_a_finished_run_writes_its_final_outputs(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    for name in ("model.pt", "confusion_matrix.png", "misclassified.png"):
        (run / name).unlink()  # as if it was killed while drawing the final plots
    done = run_train("--resume", run / "last.pt")
    assert done.returncode == 0, done.stderr
    assert "has all 1 epochs done: writing the final outputs" in done.stdout and "resuming" not in done.stdout
    assert all((run / name).stat().st_size > 0 for name in ("model.pt", "confusion_matrix.png", "misclassified.png"))
    assert len(read_metrics(run / "metrics.csv")) == 1


@pytest.mark.slow
def test_resume_cannot_stretch_a_one_cycle_schedule(tmp_path, mnist_root, capsys):
    out = tmp_path / "fast"
    assert run_train(*SMALL, "--train-subset", "512", "--epochs", "1", "--data-dir", mnist_root, "--out",
                     out).returncode == 0
    done = main_in_process(capsys, "--resume", out / "last.pt", "--epochs", "3")
    assert_one_line_error(done, 2, "argument --epochs: cannot change for a one-cycle run")


@pytest.mark.slow
def test_resume_on_another_machine_asks_for_what_moved(finished_run, tmp_path, mnist_root, capsys):
    run = copy_of(finished_run, tmp_path)
    state = load_checkpoint(run / "last.pt")
    state["config"].update(device="cuda", data_dir=str(tmp_path / "gone"))  # saved on a GPU machine, data elsewhere
    torch.save(state, run / "last.pt")
    if not torch.cuda.is_available():
        assert_one_line_error(main_in_process(capsys, "--resume", run / "last.pt", "--data-dir", mnist_root), 2,
                              "--device: 'cuda' asked for, but this machine has cpu only")
    done = main_in_process(capsys, "--resume", run / "last.pt", "--device", "cpu")
    assert_one_line_error(done, 2, f"the run's data folder {tmp_path / 'gone'} is gone: give --data-dir")
    assert not (tmp_path / "gone").exists()  # not re-created where the old machine had it


@pytest.mark.slow
def test_resume_of_a_checkpoint_with_missing_keys(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    state = load_checkpoint(run / "last.pt")
    del state["optimizer"], state["rng"]
    torch.save(state, run / "last.pt")
    assert_one_line_error(main_in_process(capsys, "--resume", run / "last.pt"), 2,
                          "cannot be resumed: it lacks optimizer, rng")


@pytest.mark.slow
def test_a_failed_checkpoint_write_keeps_the_previous_one(finished_run, tmp_path):
    """A full disk, simulated with a file-size limit (writes past it fail with EFBIG, as ENOSPC would)."""
    run = copy_of(finished_run, tmp_path)
    before = (run / "last.pt").read_bytes()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MB: a checkpoint is ~5 MB

    done = run_train("--resume", run / "last.pt", "--epochs", "2", preexec_fn=small_files)
    assert_one_line_error(done, 1, "cannot write", "(File too large)", "continue with python train.py --resume")
    assert (run / "last.pt").read_bytes() == before  # the previous checkpoint, intact
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not list(run.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupted_runs_say_what_was_kept(tmp_path, mnist_root, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--no-progress", *SMALL, "--epochs", "4",
                             "--data-dir", str(mnist_root), "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for = (lambda: (out / "metrics.csv").exists()) if sig == signal.SIGINT else (lambda: True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not wait_for():
        time.sleep(0.05)
    if sig != signal.SIGINT:
        while "Epoch 1" not in (proc.stdout.readline() or "Epoch 1"):
            pass  # in the first epoch: nothing saved yet
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    if sig == signal.SIGINT:
        assert_one_line_error(done, 130, "interrupted", f"continue with python train.py --resume {out / 'last.pt'}")
        assert load_checkpoint(out / "last.pt")["epoch"] >= 1
    else:
        assert_one_line_error(done, 130, "interrupted before the first epoch ended, so nothing was saved")
        assert not (out / "last.pt").exists()
        assert run_train(*TINY, "--epochs", "1", "--data-dir", mnist_root, "--out",
                         out).returncode == 0  # the folder can be used again


@pytest.mark.slow
def test_interrupt_while_drawing_the_final_plots(tmp_path, mnist_root, monkeypatch):
    import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("s5.plots.plot_misclassified", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main([*TINY, "--no-progress", "--epochs", "1", "--data-dir", str(mnist_root), "--out", str(out)])
    assert stop.value.code == 130
    assert (out / "model.pt").exists() and load_checkpoint(out / "last.pt")["epoch"] == 1


def test_default_run_folders_are_never_shared(tmp_path):
    first = RunDir.claim_new(tmp_path, "seed-20261125-120000")
    second = RunDir.claim_new(tmp_path, "seed-20261125-120000")  # same second, same recipe
    assert first.path != second.path and second.path.name == "seed-20261125-120000-2"
    first.release()
    second.release()


# --- the run's folder: a resume goes through the same claim as a new run -----------------------------------------

@pytest.mark.slow
def test_resume_of_best_pt_is_refused_and_names_last_pt(finished_run, tmp_path, capsys):
    """Resuming best.pt in place continued from the best epoch and overwrote last.pt and metrics.csv."""
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    done = main_in_process(capsys, "--resume", run / "best.pt")
    assert_one_line_error(done, 2, "is not the latest checkpoint of its run", f"resume {run / 'last.pt'} instead")
    shutil.copy(run / "last.pt", run / "last-copy.pt")
    assert_one_line_error(main_in_process(capsys, "--resume", run / "last-copy.pt"), 2, "not the latest checkpoint")
    (run / "last-copy.pt").unlink()
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_last_pt_copied_into_another_folder_never_writes_there(finished_run, tmp_path, capsys):
    """A last.pt copied into docs/ and resumed rewrote docs/'s plots and left a marker behind."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "accuracy_plots.png").write_bytes(b"the README's picture")
    shutil.copy(finished_run / "last.pt", docs / "last.pt")
    before = snapshot(docs)
    done = main_in_process(capsys, "--resume", docs / "last.pt", "--epochs", "2")
    assert_one_line_error(done, 2, "is not the folder of the run being resumed", "with --out DIR")
    assert snapshot(docs) == before and sorted(os.listdir(docs)) == ["accuracy_plots.png", "last.pt"]


@pytest.mark.slow
def test_resume_into_a_folder_whose_marker_names_another_run(finished_run, tmp_path, capsys, mnist_root):
    run = copy_of(finished_run, tmp_path)
    (run / ".s5-run").write_text("run 00000000deadbeef\n")
    before = snapshot(run)
    assert_one_line_error(main_in_process(capsys, "--resume", run / "last.pt"), 2, "its marker names another run")
    assert snapshot(run) == before


@pytest.mark.slow
def test_resume_can_continue_in_a_new_folder(finished_run, tmp_path):
    """--resume CKPT --out NEW: the run goes on in NEW (new or empty); its own folder is left as it was."""
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    done = run_train("--resume", run / "best.pt", "--epochs", "2", "--out", tmp_path / "branch")
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in read_metrics(tmp_path / "branch" / "metrics.csv")] == ["1", "2"]
    assert snapshot(run) == before
    state = load_checkpoint(tmp_path / "branch" / "last.pt")
    assert state["config"]["out"] == str(tmp_path / "branch") and state["run_id"] != load_checkpoint(
        run / "last.pt")["run_id"]


@pytest.mark.slow
def test_a_finished_run_resumed_into_a_new_folder_leaves_a_whole_run_there(finished_run, tmp_path):
    """Round 4: NEW held final.json and the figures but no last.pt, best.pt, metrics.csv or steps.csv."""
    run = copy_of(finished_run, tmp_path)
    done = run_train("--resume", run / "last.pt", "--out", tmp_path / "new")
    assert done.returncode == 0, done.stderr
    new = tmp_path / "new"
    assert all((new / name).stat().st_size > 0 for name in ("last.pt", "best.pt", "metrics.csv", "steps.csv",
                                                            "model.pt", "final.json", "accuracy_plots.png"))
    assert (new / "metrics.csv").read_text() == (run / "metrics.csv").read_text()
    more = run_train("--resume", new / "last.pt", "--epochs", "2")  # resumable in place: its marker names it
    assert more.returncode == 0, more.stderr
    assert [r["epoch"] for r in read_metrics(new / "metrics.csv")] == ["1", "2"]


def test_symlinked_marker_in_an_empty_out_is_never_written_through(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".s5-run").symlink_to(notes)
    done = main_in_process(capsys, "--data-dir", tmp_path / "data", "--out", out)
    assert_one_line_error(done, 2, "is not a run's marker file", "give --out a new or empty folder")
    assert notes.read_text() == "my notes"


# --- limits, signals to the whole group, torchrun's variables ----------------------------------------------------

@pytest.mark.slow
def test_out_of_memory_is_one_line_naming_the_batch_size(tmp_path, mnist_root):
    """A batch of 60,000 needs over 5 GB for the first convolution's output; with 4 GB of address space it fails."""
    def four_gb():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    done = run_train("--batch-size", "60000", "--epochs", "1", "--data-dir", mnist_root, "--out", tmp_path / "o",
                     preexec_fn=four_gb)
    assert_one_line_error(done, 1, "out of memory on cpu with batch size 60000: try a smaller --batch-size",
                          "nothing was saved")
    assert not (tmp_path / "o" / "last.pt").exists()


@pytest.mark.slow
def test_sigterm_to_the_whole_group_with_loader_workers_is_one_line(tmp_path, mnist_root):
    """SLURM, systemd and torchrun signal every process of the job: the DataLoader workers too."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--no-progress", *TINY, "--loader", "classic",
                             "--workers", "2", "--epochs", "3", "--data-dir", str(mnist_root), "--out",
                             str(tmp_path / "o")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    while "Epoch 1" not in (proc.stdout.readline() or "Epoch 1"):
        pass  # the workers are running
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), 130, "interrupted")


def test_unsearchable_data_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """chmod 000 on MNIST/raw (as a user who is not root: the tests run as root, so the OS's answer is given)."""
    import s5.mnist

    real_stat = os.stat

    def denied(path, *args, **kwargs):
        if "MNIST" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(s5.mnist.os, "stat", denied)
    done = main_in_process(capsys, "--data-dir", tmp_path / "data", "--out", tmp_path / "o")
    assert_one_line_error(done, 2, "cannot look into", "(Permission denied)")


def launch_env(**variables):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, **variables}


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a new process each
@pytest.mark.parametrize("variables, needle", [
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is out of range"),
    ({"RANK": "abc", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK='abc' is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0x"}, "MASTER_PORT='0x'"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "S5_JOIN_TIMEOUT_S": "soon"},
     "S5_JOIN_TIMEOUT_S='soon'"),
])
@pytest.mark.slow
def test_inconsistent_torchrun_variables_are_named(tmp_path, variables, needle):
    env = launch_env(**variables)
    env.setdefault("MASTER_PORT", str(free_port()))
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--out", str(tmp_path / "o")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(done, 2, needle)
    assert "--device" not in done.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow  # a new process each
def test_a_missing_process_is_waited_for_a_bounded_time(tmp_path):
    """RANK=0 of WORLD_SIZE=2 with nobody else: said after S5_JOIN_TIMEOUT_S, instead of a traceback after 5 min."""
    env = launch_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                     S5_JOIN_TIMEOUT_S="3")
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--out", str(tmp_path / "o")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(done, 2, "process 0 of 2 could not join the group at 127.0.0.1", "within 3 s")


@pytest.mark.slow
def test_a_run_with_affine_augmentation_and_tta_records_and_saves_what_it_evaluated(tmp_path, mnist_root):
    from model import Net
    from s5.checkpoints import read_resumable
    from s5.data import make_loader
    from s5.evaluation import ShiftAveraged
    from s5.loop import evaluate
    from s5.mnist import load_split
    out = tmp_path / "run"
    done = run_train("--recipe", "best", "--epochs", "2", "--train-subset", "2048", "--val-split", "1000", "--tta",
                     "--deterministic", "--no-amp", "--no-channels-last", "--data-dir", mnist_root, "--out", out)
    assert done.returncode == 0, done.stderr
    saved = read_resumable(out / "last.pt", Net())
    assert (saved.config.recipe.augment, saved.config.recipe.tta) == ("affine", True)
    final = json.loads((out / "final.json").read_text())
    assert final["tta"] is True
    model = Net()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    test = make_loader(*load_split(False, mnist_root), 256, False)
    loss, acc, _, _ = evaluate(ShiftAveraged(model), test, torch.nn.functional.nll_loss, device=torch.device("cpu"),
                               progress=False)
    plain_loss = evaluate(model, test, torch.nn.functional.nll_loss, device=torch.device("cpu"), progress=False)[0]
    # the reported figures are the shift-averaged model's (to rounding: another thread count may sum in another
    # order, and round a near-tie the other way), not the plain model's
    assert loss == pytest.approx(final["test_loss"], rel=1e-4) and acc == pytest.approx(final["test_acc"], abs=0.011)
    assert abs(plain_loss - loss) > 1e-3 * loss
    assert acc > 80  # 32 steps of the 20-epoch schedule's warm-up already learn on affine-augmented digits
