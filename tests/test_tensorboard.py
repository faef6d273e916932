"""s5.callbacks.TensorBoardLog: a run's history in TensorBoard's event files, each point once, across a resume, read
back with TensorBoard's own reader."""
import os
import socket
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from s5 import loop
from s5.callbacks import EPOCH_TAGS, STEP_TAGS, TensorBoardLog, TensorBoardMissingError, global_step

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

STEP_ROWS = 4  # a row every 10 of 47 batches: 10/47, 20/47, 30/47 and the epoch's end


def fake_history(epochs, seed=0):
    """loop.new_history() as `epochs` epochs of a run fill it: one value a key an epoch, STEP_ROWS step rows."""
    rng = np.random.default_rng(seed)
    history = loop.new_history()
    for e in range(1, epochs + 1):
        for done in (10, 20, 30, 47):
            history["step_epoch"].append(e - 1 + done / 47)
            history["step_lr"].append(0.01 * 0.9 ** e)
            history["step_train_loss"].append(float(rng.uniform(0, 2)))
            history["step_train_acc"].append(float(rng.uniform(50, 100)))
        for key in loop.epoch_columns():
            history[key].append(e if key == "epoch" else float(rng.uniform(0, 100)))
    return history


def first(history, epochs):
    """The history as it was after `epochs` epochs (what a checkpoint of that epoch holds)."""
    return {k: v[:epochs] if k in loop.epoch_columns() else v[:epochs * STEP_ROWS] for k, v in history.items()}


def read(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0,
                                                                         event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


def expected_points(history):
    points = {tag: [(global_step(e), np.float32(v)) for e, v in zip(history["epoch"], history[key])]
              for key, tag in EPOCH_TAGS.items() if key in history}
    points |= {tag: [(global_step(s), np.float32(v)) for s, v in zip(history["step_epoch"], history[key])]
               for key, tag in STEP_TAGS.items()}
    return points


@pytest.mark.parametrize("crashed", [False, True], ids=["resumed", "resumed-after-a-crash"])
def test_two_sessions_write_each_point_once(tmp_path, crashed):
    history = fake_history(3)
    figure = plt.figure(figsize=(2, 2))
    plt.plot([1, 2, 3])

    log = TensorBoardLog(tmp_path)  # session 1: epochs 1 and 2, the same growing dict each time
    growing = first(history, 1)
    log.epoch(growing)
    log.epoch(growing)  # called again with nothing new: nothing written
    log.epoch(first(history, 2))
    log.figures(curves=figure)
    if crashed:  # it logged epoch 3 (other values: another path) and died before saving the checkpoint
        log.epoch(first(fake_history(3, seed=1), 3))
    log.close()

    with TensorBoardLog(tmp_path, first(history, 2)) as log:  # session 2: resumed from epoch 2's checkpoint
        log.epoch(history)
        log.figures(curves=figure)
    assert plt.fignum_exists(figure.number)  # the caller's figure stays open

    acc = read(tmp_path)
    tags = acc.Tags()
    assert set(tags["scalars"]) == set(expected_points(history))  # test_*, not val_*: this run has no split
    for tag, points in expected_points(history).items():
        got = [(s.step, s.value) for s in acc.Scalars(tag)]
        assert got == points, tag  # every value once, in order, at steps that continue across the resume
    assert [s.step for s in acc.Scalars("epoch/test_acc")] == [1000, 2000, 3000]
    assert [s.step for s in acc.Scalars("step/train_loss")][:4] == [213, 426, 638, 1000]

    assert tags["images"] == ["figures/curves"]
    images = acc.Images("figures/curves")
    assert [i.step for i in images] == [2000, 3000]
    assert all(i.encoded_image_string.startswith(b"\x89PNG") and i.width > 0 and i.height > 0 for i in images)


def test_a_new_run_in_an_empty_folder(tmp_path):
    history = fake_history(2)
    log = TensorBoardLog(tmp_path / "run")  # the folder is made if missing
    log.epoch(history)
    log.close()
    acc = read(tmp_path / "run")
    assert [(s.step, s.value) for s in acc.Scalars("epoch/lr")] == expected_points(history)["epoch/lr"]
    assert len(acc.Scalars("step/lr")) == 2 * STEP_ROWS


def test_an_event_file_is_never_written_through_a_link_planted_under_its_name(tmp_path, monkeypatch):
    """Issue 26: SummaryWriter opens its event file by path (events.out.tfevents.<time>.<host>.<pid>.<n>): a link
    planted there, in a run's folder resumed in place, must not lead it to write over a file outside."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer.time, "time", lambda: 1_700_000_000.0)  # the name made predictable
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))
    outside = tmp_path / "notes.txt"
    outside.write_bytes(b"my notes")
    run = tmp_path / "run"
    run.mkdir()
    planted = run / f"events.out.tfevents.1700000000.{socket.gethostname()}.{os.getpid()}.0"
    planted.symlink_to(outside)
    with TensorBoardLog(run, first(fake_history(2), 1)) as log:
        log.epoch(fake_history(2))
    assert outside.read_bytes() == b"my notes" and planted.is_symlink()
    written = [p for p in run.iterdir() if p != planted]
    assert len(written) == 1 and written[0].is_file() and not written[0].is_symlink()
    planted.unlink()  # TensorBoard's reader would follow it
    assert [s.step for s in read(run).Scalars("epoch/lr")] == [2000]


def test_without_the_tensorboard_package_one_line_names_the_requirements(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    with pytest.raises(TensorBoardMissingError) as err:
        TensorBoardLog(tmp_path)
    assert "requirements-tensorboard.txt" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_train_py_logs_what_metrics_csv_holds(tmp_path, mnist_root):
    """train.py --tensorboard: the event files hold every metrics.csv value (and the final figures), once."""
    from conftest import read_metrics, run_train

    out = tmp_path / "run"
    done = run_train("--recipe", "seed", "--train-subset", "512", "--batch-size", "64", "--epochs", "2",
                     "--tensorboard", "--data-dir", mnist_root, "--out", out)
    assert done.returncode == 0, done.stderr
    acc = read(out)
    rows = read_metrics(out / "metrics.csv")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        logged = [(e.step, e.value) for e in acc.Scalars(EPOCH_TAGS[key])]
        decimals = int(loop.epoch_columns()[key].strip(".fg")) if key != "lr" else 5  # as metrics.csv rounds
        assert logged == [(global_step(int(r["epoch"])), pytest.approx(float(r[key]), rel=1e-5,
                                                                        abs=0.5 * 10 ** -decimals + 1e-7))
                          for r in rows], key
    steps = read_metrics(out / "steps.csv")
    assert len(acc.Scalars("step/train_loss")) == len(steps)
    assert {"figures/confusion_matrix", "figures/misclassified"} <= set(acc.Tags()["images"])
