"""sweep.py, a recipe's accuracy over seeds: each run's line, a summary and a JSON line that agree, each run's log in
its seed-N.log; bad flags, a diverging run and an interruption each end with one line and their exit code."""
import json
import signal
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error

pytestmark = pytest.mark.slow  # each test starts sweep.py
TINY = ["--recipe", "fast", "--train-subset", "640", "--epochs", "1"]  # 5 one-cycle steps a run


def sweep_cmd(*flags):
    return [sys.executable, str(REPO / "sweep.py"), *map(str, flags)]


def sweep(*flags, cwd):
    return subprocess.run(sweep_cmd(*flags), capture_output=True, text=True, cwd=cwd, timeout=1200)


def test_accuracy_over_seeds_prints_each_run_then_a_consistent_summary(mnist_root, tmp_path):
    """Two seeds on a tiny real budget, with a validation split: each run's line, the summary and the JSON agree."""
    done = sweep(*TINY, "--seeds", 2, "--first-seed", 5, "--val-split", 1000, "--target", 10, "--data-dir", mnist_root,
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("2 runs of fast on ") and "(from 8 timed steps); runs in runs/sweep-fast-" in lines[0]
    figures = json.loads(lines[-1])
    runs = figures["runs"]
    assert [r["seed"] for r in runs] == [5, 6] and figures["seeds"] == [5, 6]
    for r in runs:
        assert f"seed {r['seed']}: test {r['test_acc']:.2f}%, validation {r['val_acc']:.2f}%" in done.stdout
        folder = tmp_path / r["folder"]
        assert folder.name == f"seed-{r['seed']}" and (folder / "final.json").exists()
        log = (folder.parent / f"seed-{r['seed']}.log").read_text()  # the run's lines, not shown on the screen
        assert "Epoch 1" in log and "Validation set:" in log and "Test set:" in log, log
    assert "Epoch 1" not in done.stdout and "Test set:" not in done.stdout
    accs = [r["test_acc"] for r in runs]
    assert figures["test_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert figures["test_acc"]["min"] == min(accs) and figures["test_acc"]["reached"] == sum(a >= 10 for a in accs)
    assert figures["test_acc"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert figures["val_acc"]["n"] == 2 and figures["test_acc"]["target"] == 10
    assert f"test: mean {figures['test_acc']['mean']:.2f}%" in done.stdout and "validation: mean " in done.stdout
    config = figures["config"]
    assert "seed" not in config and "out" not in config  # the seeds are the sweep's, the folders its own
    assert config["val_split"] == 1000 and config["train_subset"] == 640 and config["recipe"]["epochs"] == 1
    assert figures["seconds"]["min"] <= figures["seconds"]["mean"] <= figures["seconds"]["max"]


@pytest.mark.parametrize("flags,message", [
    (["--seeds", "0"], "argument --seeds: 0 is out of range: give 1 to 1000"),
    (["--target", "250"], "argument --target: 250 is out of range: give a number above 0 and at most 100"),
    (["--target", "nan"], "argument --target: nan is out of range"),
    (["--first-seed", "-1"], "argument --first-seed: -1 is out of range"),
    (["--recipe", "slowest"], "argument --recipe: unknown recipe 'slowest'"),  # checked by the configuration
    (["--train-subset", "64", "--epochs", "1"], "argument --epochs: a one-cycle schedule needs at least"),  # 1 step
    (["--device", "tpu"], "argument --device: unknown device 'tpu'"),
])
def test_bad_flags_are_one_line_errors_before_any_run(flags, message, tmp_path):
    done = sweep(*flags, cwd=tmp_path)
    assert_one_line_error(done, 2, message)
    assert done.stdout == "" and not (tmp_path / "runs").exists()


def test_a_diverging_run_is_one_line_and_exit_1(mnist_root, tmp_path):
    """A learning rate that makes the loss NaN (here already in the timed steps of the estimate)."""
    done = sweep(*TINY, "--seeds", 2, "--lr", "1e6", "--weight-decay", "0", "--data-dir", mnist_root, cwd=tmp_path)
    assert_one_line_error(done, 1, "training diverged", "lower the learning rate")


def test_sigterm_after_a_run_summarises_the_finished_runs(mnist_root, tmp_path):
    """Stopped during the second of three runs: the first is summarised, then `interrupted after 1 of 3 runs`."""
    proc = subprocess.Popen(sweep_cmd(*TINY, "--seeds", 3, "--data-dir", mnist_root), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[1].startswith("seed 1: test "), (lines, lines[1] or proc.communicate(timeout=60)[1])
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted after 1 of 3 runs", err
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["seeds"] == [1] and figures["test_acc"]["n"] == 1
    sweep_dir = next((tmp_path / "runs").iterdir())
    assert (sweep_dir / "seed-2.log").exists()  # the stopped run's lines are kept too


def test_two_sweeps_started_in_the_same_second_get_folders_of_their_own(mnist_root, tmp_path, monkeypatch):
    """The sweep's folder is claimed as a run's (RunDir.claim_new): never shared, even with the same time stamp."""
    import sweep as sweep_cli
    from s5 import files

    monkeypatch.setattr(files, "timestamp", lambda: "20261207-000000")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert sweep_cli.main([*TINY, "--seeds", "1", "--data-dir", str(mnist_root)]) == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["sweep-fast-20261207-000000", "sweep-fast-20261207-000000-2"]
    for folder in folders:  # each holds its own run and log, written whole
        assert sorted(p.name for p in (tmp_path / "runs" / folder).iterdir() if p.name != ".s5-run") == \
            ["seed-1", "seed-1.log"]


def test_the_estimate_counts_the_images_an_epoch_trains_on(mnist_root, monkeypatch):
    """A recipe ending mid-epoch (epoch_images) is estimated on its images, not the whole training set's."""
    monkeypatch.syspath_prepend(str(REPO))
    import sweep as sweep_py
    from s5 import loop
    from s5.config import RunConfig
    from s5.device import get_device

    monkeypatch.setattr(loop, "train_throughput", lambda *args: (1000.0, 0.0))  # a fixed speed, so only images count
    seconds = {n: sweep_py.estimate_seconds(RunConfig.build("one-epoch", epoch_images=n, data_dir=str(mnist_root)),
                                            get_device("cpu"), seeds=2) for n in (None, 20_000)}
    assert seconds == {None: 2 * (60_000 + 10_000 / 3) / 1000, 20_000: 2 * (20_000 + 10_000 / 3) / 1000}
