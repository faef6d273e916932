"""The training loop every run, the notebook, the sweep and the benchmark share: one step, one epoch, one evaluation.

`Step` is one optimizer step on a batch, as pytorch/examples writes it. Under torchrun (`ctx` active) every figure
is summed over all processes, so every rank sees the same numbers and takes the same decisions.
"""

import itertools
import math
import time

import torch
from tqdm.auto import tqdm

from s5 import distributed
from s5.config import RECIPES
from s5.evaluation import predict_loader
from s5.optim import build_training

REFRESH_EVERY = 10  # batches between progress-bar updates, NaN checks and step records (each syncs a GPU)
# A run's history: steps.csv's columns (a row every REFRESH_EVERY batches) and metrics.csv's (a row an epoch), formats.
STEP_COLUMNS = {"step_epoch": ".4f", "step_lr": ".6g", "step_train_loss": ".6f", "step_train_acc": ".2f"}


def evaluated(evaluated_on="test"):
    """What each epoch's evaluation is called: its images ("test", or "validation" for held-out training images),
    and its loss's and accuracy's columns in the history."""
    return "validation" if evaluated_on == "val" else "test", f"{evaluated_on}_loss", f"{evaluated_on}_acc"


def epoch_columns(evaluated_on="test"):
    _, loss, acc = evaluated(evaluated_on)
    return {"epoch": "d", "lr": ".6g", "train_loss": ".6f", "train_acc": ".2f", loss: ".6f", acc: ".2f",
            "train_seconds": ".2f", "elapsed_seconds": ".2f"}


def new_history(evaluated_on="test"):
    """An empty history: a list for every column of metrics.csv and steps.csv."""
    return {k: [] for k in {**epoch_columns(evaluated_on), **STEP_COLUMNS}}


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Step:
    """One optimizer step of `model` on a batch: zero the gradients, forward under autocast, loss, backward, step,
    and a per-batch schedule. The gradient scaler is on for fp16 only (elsewhere it passes everything through)."""

    def __init__(self, model, optimizer, loss_fn, scheduler=None, amp_dtype=None):
        self.model, self.optimizer, self.loss_fn, self.scheduler = model, optimizer, loss_fn, scheduler
        self.amp_dtype = amp_dtype
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)

    def __call__(self, data, target):
        """Train on one batch; returns the model's output and the loss, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            output = self.model(data)
            loss = self.loss_fn(output, target)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return output.detach(), loss.detach()


def train_epoch(step, loader, ctx=distributed.SINGLE, progress=True, history=None, epoch_before=0):
    """One training epoch of `step` over `loader`; returns its mean loss and accuracy (%). Every REFRESH_EVERY
    batches the sums so far (over every process) are checked (TrainingDivergedError for a NaN or infinite loss)
    and shown, and `history`, if given, gets a step row: the fractional epoch (this is epoch `epoch_before` + 1),
    the learning rate, the mean loss and accuracy since the last row."""
    step.model.train()
    bar = tqdm(loader, disable=not (progress and ctx.is_main), dynamic_ncols=True, leave=False)
    tally = _Tally(step, ctx, bar, history, epoch_before, len(loader) if hasattr(loader, "__len__") else None)
    for data, target in bar:
        data, target = data.to(step.device, non_blocking=True), target.to(step.device, non_blocking=True)
        output, loss = step(data, target)
        tally.add(output, target, loss)
    if tally.batches == 0:
        raise ValueError("the training loader gave no batches: nothing to train on")
    loss_sum, correct, seen = tally.sync(final=True)
    return loss_sum / seen, 100 * correct / seen


class _Tally:
    """An epoch's running sums (loss, correct, seen): on the device, read and added up over every process by
    `sync`."""

    def __init__(self, step, ctx, bar, history, epoch_before, n_batches):
        self.step, self.ctx, self.bar, self.history, self.epoch_before = step, ctx, bar, history, epoch_before
        self.n_batches, self.batches, self.last_loss, self.last_row = n_batches, 0, None, (0.0, 0, 0)
        self.loss_sum = torch.zeros((), device=step.device)
        self.correct, self.seen = torch.zeros(2, dtype=torch.int64, device=step.device)

    def add(self, output, target, loss):
        self.loss_sum += loss.float() * len(target)
        self.correct += count_correct(output, target)
        self.seen += len(target)
        self.batches, self.last_loss = self.batches + 1, loss
        if self.batches % REFRESH_EVERY == 0:
            self.sync()

    def sync(self, final=False):
        totals = loss_sum, correct, seen = distributed.all_sum(
            self.ctx, torch.stack((self.loss_sum, self.correct, self.seen)))[0].tolist()
        if not math.isfinite(loss_sum):
            raise TrainingDivergedError(f"training diverged: loss is {loss_sum / max(seen, 1)} at batch "
                                        f"{self.batches - 1}; lower the learning rate")
        self.bar.set_description(f"Train: Loss={self.last_loss.item():0.4f} Batch_id={self.batches - 1} "
                                 f"Accuracy={100 * correct / max(seen, 1):0.2f}")
        if self.history is not None and seen > self.last_row[2]:
            done = 1.0 if final or not self.n_batches else min(self.batches / self.n_batches, 1.0)
            n = seen - self.last_row[2]
            row = (self.epoch_before + done, self.step.optimizer.param_groups[0]["lr"],
                   (loss_sum - self.last_row[0]) / n, 100 * (correct - self.last_row[1]) / n)
            for key, value in zip(STEP_COLUMNS, row):
                self.history[key].append(value)
            self.last_row = totals
        return totals


def count_correct(pred, labels):
    """How many rows of `pred` have their arg-max at the label, as a tensor (no sync with a GPU)."""
    return pred.argmax(dim=1).eq(labels).sum()


def evaluate(model, loader, loss_fn, device, ctx=distributed.SINGLE, amp_dtype=None, progress=True):
    """Mean per-sample loss, accuracy (%), number correct and number of images of `model` over `loader`.

    Under torchrun each process evaluates its share and the sums are added up: every image counts once.
    """
    log_probs, labels, _ = predict_loader(model, loader, device, amp_dtype, progress=progress and ctx.is_main)
    # One loss call over all outputs is the true per-sample mean (the original summed batch means and divided by
    # the dataset size, which printed 0.0000).
    local_loss = float(loss_fn(log_probs, labels).double()) * len(labels) if len(labels) else 0.0
    sums = torch.tensor([local_loss, float(count_correct(log_probs, labels)), len(labels)], dtype=torch.float64)
    loss_sum, n_correct, n = distributed.all_sum(ctx, sums.to(device))[0].tolist()
    if n == 0:
        raise ValueError("the evaluation loader gave no images: nothing to evaluate")
    return loss_sum / n, 100.0 * n_correct / n, int(n_correct), int(n)


def report_line(loss, n_correct, n, evaluated_on="test"):
    """The original notebook's line after each evaluation ("Validation set" for held-out training images)."""
    return (f"{evaluated(evaluated_on)[0].capitalize()} set: Average loss: {loss:.4f}, Accuracy: {n_correct}/{n} "
            f"({100.0 * n_correct / n:.2f}%)")


def train_throughput(model, loader, amp_dtype, batches, recipe=RECIPES["seed"], warmup=3):
    """(img/s, warm-up seconds) of train_epoch with `recipe`'s optimizer and loss (bench.py's rows, sweep.py's
    estimate): `batches` batches, epoch after epoch, after `warmup` untimed ones (where a compiled model compiles)."""
    optimizer, _, loss_fn = build_training(model, recipe, len(loader))
    step = Step(model, optimizer, loss_fn, amp_dtype=amp_dtype)
    stream, timings = itertools.chain.from_iterable(itertools.repeat(loader)), []
    for n in (warmup, batches):  # train_epoch ends with .item(): a GPU is synchronised
        sizes, start = [], time.perf_counter()
        train_epoch(step, ((sizes.append(len(y)), (x, y))[1] for x, y in itertools.islice(stream, n)), progress=False)
        timings.append((time.perf_counter() - start, sum(sizes)))
    return timings[1][1] / timings[1][0], timings[0][0]
