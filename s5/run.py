"""One training run, from claiming its folder to its final outputs, built from one `RunConfig`.

`run(config, device)` claims the run's folder (s5.files.RunDir), builds the data, model, optimizer and scheduler
from the configuration, trains with `engine.fit`, and writes, each atomically and never through a link:
last.pt every epoch and best.pt when the test accuracy is the best yet (best.pt first, so it is never behind
last.pt), metrics.csv and steps.csv, accuracy_plots.png and training_curves.png (at most every PLOT_EVERY_S),
and at the end model.pt, confusion_matrix.png and misclassified.png. Every checkpoint carries the whole
configuration and the run's id. A resume goes through the same claim: in place only into the folder of the
run that wrote the checkpoint, and only from its latest checkpoint; elsewhere into a new or empty folder.

Under torchrun every process calls `run` with its `ctx`; rank 0 alone claims, prints and writes.
"""

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
from torch.nn.parallel import DistributedDataParallel

from model import Net
from s5 import checkpoints, distributed, engine, evaluation, plots, tensorboard
from s5.config import RUNS_DIR, ConfigError
from s5.data import make_loader
from s5.device import amp_dtype_for, channels_last_for, keep_freed_memory, set_seed
from s5.files import OutputError, RunDir, timestamp
from s5.mnist import ensure_mnist, load_split

PLOT_EVERY_S = 30.0  # redraw accuracy_plots.png at most this often: a redraw can take most of a GPU epoch
TEST_BATCH = 256  # evaluation batch (rounded up to a multiple of the number of processes)


class RunResult(NamedTuple):
    """What a finished run gives back: its history, folder, and the test set's figures at the end."""
    history: dict
    folder: Path
    test_loss: float
    test_acc: float


class RunStoppedError(Exception):
    """A run ended before its last epoch: `cause` says why, `reason` names it ("interrupted", "out_of_memory",
    "diverged" or "failed": a write, a process of the group). `folder` is the run's folder and `last` its latest
    checkpoint (None when no epoch was saved).
    """

    def __init__(self, cause, folder, last):
        super().__init__(str(cause))
        self.cause, self.folder, self.last = cause, folder, last
        self.reason = ("interrupted" if isinstance(cause, KeyboardInterrupt) else
                       "out_of_memory" if isinstance(cause, OutOfMemoryError) else
                       "diverged" if isinstance(cause, engine.TrainingDivergedError) else "failed")


def check(config, ctx):
    """ConfigError for what this configuration cannot do with `ctx`'s processes (before any work)."""
    if config.loader == "classic" and config.recipe.batch_size % ctx.world_size:
        raise ConfigError("batch_size", f"{config.recipe.batch_size} does not split evenly over {ctx.world_size} "
                                        f"processes: give a multiple of {ctx.world_size} for the classic loader")


def claim_folder(config, resume=None, resume_path=None):
    """The run's folder, claimed: the resumed run's own, the configuration's `out`, or a new runs/<recipe>-<time>.

    Resuming in place needs the folder's marker to name the checkpoint's run, and the checkpoint to be the
    folder's last.pt: an older one (best.pt, a copy) would rewind the run and lose the epochs after it.
    """
    if resume is not None:
        folder = Path(resume_path).parent
        if config.out is None or Path(config.out).resolve() == folder.resolve():
            last = folder / "last.pt"
            if Path(resume_path).name != "last.pt" or not last.is_file():
                raise OutputError(f"{resume_path} is not the latest checkpoint of its run ({last} is): resuming it "
                                  "in place would rewind the run", "not_latest", last)
            return RunDir.claim(folder, run_id=resume.run_id)
    if config.out is not None:
        return RunDir.claim(config.out)
    return RunDir.claim_new(RUNS_DIR, f"{config.name}-{timestamp()}")


def make_loaders(config, device, ctx):
    """The training, validation (None without a split) and test loaders of the configuration, on `device`,
    sharded for `ctx`'s processes."""
    shard = (ctx.rank, ctx.world_size)
    images, labels = load_split(True, config.data_dir)
    held_out = None
    if config.val_split:
        (images, labels), held_out = split_images(images, labels, config.val_split, config.seed)
    if config.train_subset is not None:
        images, labels = images[:config.train_subset], labels[:config.train_subset]
    common = {"loader": config.loader, "device": device, "workers": config.workers, "pin_memory": True,
              "shard": shard}
    train_loader = make_loader(images, labels, batch_size=config.recipe.batch_size, train=True, seed=config.seed,
                               augment=config.recipe.augment, **common)
    eval_batch = -(-TEST_BATCH // ctx.world_size) * ctx.world_size
    val_loader = make_loader(*held_out, batch_size=eval_batch, train=False, **common) if held_out else None
    test_loader = make_loader(*load_split(False, config.data_dir), batch_size=eval_batch, train=False, **common)
    return train_loader, val_loader, test_loader


def split_images(images, labels, held_out, seed):
    """(kept, held out): `held_out` training images drawn by `seed` (the same ones for every run with that seed),
    both in their original order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    keep, hold = order[held_out:].sort().values, order[:held_out].sort().values
    return (images[keep], labels[keep]), (images[hold], labels[hold])


def warmup_steps(recipe, steps_per_epoch):
    """Optimizer steps before the learning rate peaks: one-cycle's warm-up; none for a step schedule."""
    return int(recipe.pct_start * recipe.epochs * steps_per_epoch) if recipe.scheduler == "OneCycleLR" else 0


def run(config, device, *, ctx=engine.SINGLE, resume=None, resume_path=None, started=None):
    """Train the run `config` describes on `device` (a torch.device); returns a RunResult.

    `resume` is a `checkpoints.Resumable` read from `resume_path` (its configuration already merged into
    `config`). Raises OutputError when the folder cannot be claimed (nothing written), ConfigError,
    MNISTDataError or ValueError before training, and RunStoppedError when training ends early.
    """
    started = time.perf_counter() if started is None else started
    check(config, ctx)
    claimed, failure = None, None
    if ctx.is_main:
        try:
            claimed = claim_folder(config, resume, resume_path)
        except OutputError as e:
            failure = e
    shared = distributed.broadcast(ctx, (str(claimed.path) if claimed else None, str(failure or ""),
                                         getattr(failure, "kind", None)))
    if failure is not None:
        raise failure
    if shared[0] is None:  # another rank's claim failed: every rank stops alike, rank 0 says why
        raise OutputError(shared[1], shared[2])
    folder = Path(shared[0])
    config = replace(config, out=str(folder))
    try:
        return RunResult(*_train(config, device, ctx, resume, resume_path, claimed, folder, started))
    except (engine.TrainingDivergedError, OutputError, KeyboardInterrupt, OutOfMemoryError) as e:
        raise RunStoppedError(e, folder, _last(claimed, folder)) from e
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, distributed.GroupError):
            cause = e
        elif _is_out_of_memory(e):
            cause = OutOfMemoryError(f"out of memory on {device} with batch size {config.recipe.batch_size}")
        elif ctx.active:  # gloo/NCCL: a peer died or timed out
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            cause = distributed.GroupError(f"another process of the group stopped or stopped answering ({reason})")
        else:
            raise
        raise RunStoppedError(cause, folder, _last(claimed, folder)) from None
    finally:
        if claimed is not None:
            claimed.release()


class OutOfMemoryError(MemoryError):
    """Training or evaluation could not allocate memory (CPU or GPU)."""


def _is_out_of_memory(error):
    text = str(error)
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "DefaultCPUAllocator: can't allocate" in text \
        or "not enough memory" in text or "out of memory" in text.lower()


def _last(run_dir, folder):
    """The run's latest checkpoint, if one was saved."""
    present = run_dir.exists("last.pt") if run_dir is not None else (folder / "last.pt").exists()
    return folder / "last.pt" if present else None


def _train(config, device, ctx, resume, resume_path, run_dir, folder, started):
    say = print if ctx.is_main else (lambda *a, **k: None)
    set_seed(config.seed, config.deterministic)
    torch.backends.cudnn.benchmark = not config.deterministic  # time convolution algorithms once, keep the fastest
    if device.type == "cpu":
        keep_freed_memory()  # reuse each step's activation buffers instead of page-faulting fresh ones
    amp_dtype = amp_dtype_for(device, config.amp)
    say(f"device {device}, precision {amp_dtype or torch.float32}, loader {config.loader}, recipe {config.recipe}"
        + (f", {ctx.world_size} processes (the batch size is global)" if ctx.active else ""))

    model = Net().to(device)
    if channels_last_for(device, config.channels_last):
        model = model.to(memory_format=torch.channels_last)
    if ctx.local_rank == 0:
        ensure_mnist(config.data_dir)  # one fetch a machine, before its other processes read
    distributed.barrier(ctx)
    train_loader, val_loader, test_loader = make_loaders(config, device, ctx)
    eval_name = "val" if val_loader is not None else "test"  # what each epoch is measured on (and best.pt chosen by)
    optimizer, scheduler, criterion = engine.build_training(model, config.recipe, len(train_loader),
                                                            verbose=ctx.is_main)
    history, start_epoch = engine.new_history(eval_name=eval_name), 1
    if resume is not None:
        model.load_state_dict(resume.state["model"])
        optimizer.load_state_dict(resume.state["optimizer"])
        scheduler.load_state_dict(resume.state["scheduler"])
        checkpoints.set_rng_state(resume.state["rng"])
        history, start_epoch = resume.history, resume.epoch + 1
        say(f"resuming {resume_path} at epoch {start_epoch}" if start_epoch <= config.epochs else
            f"{resume_path} has all {config.epochs} epochs done: writing the final outputs")
    board = None
    if run_dir is not None and config.tensorboard:  # rank 0: the points a resumed run already logged stay once
        board = tensorboard.TensorBoardLog(folder, resume.history if resume is not None else None)
    try:
        return _fit_and_finish(config, device, ctx, model, optimizer, scheduler, criterion, train_loader, val_loader,
                               test_loader, eval_name, history, start_epoch, amp_dtype, run_dir, folder, started,
                               board, say)
    finally:
        if board is not None:
            board.close()


def _fit_and_finish(config, device, ctx, model, optimizer, scheduler, criterion, train_loader, val_loader,
                    test_loader, eval_name, history, start_epoch, amp_dtype, run_dir, folder, started, board, say):
    """The epoch loop with the per-epoch files, then the final evaluation and outputs."""
    plotted_at = -PLOT_EVERY_S

    def on_epoch_end(epoch, hist):
        nonlocal plotted_at
        if run_dir is None:
            return
        save = lambda name: run_dir.write(name, checkpoints.checkpoint_bytes(  # noqa: E731
            model, optimizer, scheduler, epoch, hist, config, run_dir.run_id))
        if hist[f"{eval_name}_acc"][-1] > max(hist[f"{eval_name}_acc"][:-1], default=-1.0):
            save("best.pt")  # before last.pt: a kill between the two never leaves best.pt behind last.pt
        save("last.pt")
        run_dir.write("metrics.csv", csv_bytes(hist, engine.epoch_record(eval_name)))
        run_dir.write("steps.csv", csv_bytes(hist, engine.STEP_RECORD))
        if board is not None:
            board.epoch(hist)  # after the checkpoint: the logs are never ahead of what a resume restores
        now = time.perf_counter()
        if epoch == config.epochs or now - plotted_at >= PLOT_EVERY_S:
            plotted_at = now
            draw_curves(run_dir, hist, eval_name)

    evaluated = evaluation.ShiftAveraged(model) if config.recipe.tta else model  # what every accuracy is of
    # Data-parallel: gradients averaged across processes; checkpoints save the plain `model` (no "module.").
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.active else model
    engine.fit(trained, device, train_loader, val_loader or test_loader, optimizer, scheduler, criterion,
               config.epochs, ctx=ctx, history=history, start_epoch=start_epoch, amp_dtype=amp_dtype,
               on_epoch_end=on_epoch_end, progress=config.progress, started=started, eval_name=eval_name,
               warmup_steps=warmup_steps(config.recipe, len(train_loader)), eval_model=evaluated)
    if val_loader is not None:  # the test set, once, for the final figure (choices were made on validation)
        test_loss, test_acc, n_correct, n = engine.evaluate(evaluated, test_loader, torch.nn.functional.nll_loss,
                                                             device=device, ctx=ctx, amp_dtype=amp_dtype,
                                                             progress=False)
        say(engine.report_line(test_loss, n_correct, n, "test") + " (the test set, evaluated once, at the end)")
    else:
        test_loss, test_acc = history["test_loss"][-1], history["test_acc"][-1]
    if run_dir is not None:
        run_dir.write("final.json", (json.dumps({"test_loss": test_loss, "test_acc": test_acc, "epochs": config.epochs,
                                                 "evaluated_on": eval_name, "tta": config.recipe.tta}) + "\n").encode())
    if ctx.active:
        if not distributed.same_on_every_rank(ctx, list(model.parameters())):
            raise distributed.GroupError("the processes ended with different weights: a bug, please report it")
        say(f"weights identical in all {ctx.world_size} processes")
        if run_dir is None:
            return history, folder, test_loss, test_acc
        test_loader = make_loaders(config, device, engine.SINGLE)[2]  # the gallery needs every test image
    if start_epoch > config.epochs:  # a finished run resumed: its curves are drawn again with the rest
        draw_curves(run_dir, history, eval_name)
    run_dir.write("model.pt", checkpoints.weights_bytes(model))
    predictions = evaluation.predict_loader(evaluated, test_loader, device, amp_dtype, keep_images=True)  # 2 plots
    figures = {"confusion_matrix": plots.plot_confusion_matrix(evaluation.confusion_matrix(predictions)),
               "misclassified": plots.plot_misclassified(evaluation.misclassified(predictions, 24))}
    if board is not None:
        board.figures(**figures)
    for name, fig in figures.items():
        _write_figure(run_dir, f"{name}.png", fig)
    return history, folder, test_loss, test_acc


def csv_bytes(history, record):
    """metrics.csv (record EPOCH_RECORD) or steps.csv (STEP_RECORD) from the whole history: one row an epoch or
    a step, even after a resume."""
    rows = [",".join(record)]
    for i in range(len(history[next(iter(record))])):
        rows.append(",".join(format(history[k][i], fmt) for k, fmt in record.items()))
    return ("\n".join(rows) + "\n").encode()


def _write_figure(run_dir, name, fig):
    try:
        run_dir.write(name, plots.png_bytes(fig))
    finally:
        plt.close(fig)


def draw_curves(run_dir, history, eval_name="test"):
    """accuracy_plots.png (the original 2x2 per-epoch figure) and training_curves.png (every few batches)."""
    losses, accs = history[f"{eval_name}_loss"], history[f"{eval_name}_acc"]
    label = "validation" if eval_name == "val" else "test"
    _write_figure(run_dir, "accuracy_plots.png", plots.post_accuracyplots(
        history["train_loss"], losses, history["train_acc"], accs, evaluated_on=label.capitalize()))
    _write_figure(run_dir, "training_curves.png", plots.plot_training(history, losses, accs, evaluated_on=label))
