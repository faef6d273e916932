"""Training: optimizer, scheduler and loss from a recipe, one training epoch, one evaluation, and the epoch loop.

`train_epoch` and `evaluate` return their figures; `fit` loops over epochs and keeps the run's history. The
classic notebook's `train`/`test`, which fill lists and print, are thin adapters over these in utils.py. Where
the process stands among several (torchrun) is the `ctx` the entry point passes; nothing here looks it up.
"""

import functools
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from s5 import distributed
from s5.config import SCHEDULERS
from s5.evaluation import predict_loader

SINGLE = distributed.Context()  # one process, no group
OPTIMIZERS = {
    "SGD": lambda params, lr, momentum, weight_decay, nesterov: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov),
    "Adam": lambda params, lr, momentum, weight_decay, nesterov: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay),  # Adam has no momentum/nesterov of that kind
    "AdamW": lambda params, lr, momentum, weight_decay, nesterov: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay),
}
LOSSES = {"nll_loss": F.nll_loss, "cross_entropy": F.cross_entropy}
# Schedulers that move the learning rate every batch; the others move it every epoch.
PER_BATCH = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _check_number(name, value, low=0.0, low_ok=False, high=math.inf):
    """ValueError unless `value` is a real number within (low, high] (or [low, high] with low_ok)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value >= low if low_ok else value > low) or value > high:
        bound = f"{'at least' if low_ok else 'above'} {low:g}" + (f" and at most {high:g}" if high < math.inf else "")
        raise ValueError(f"{name}={value!r}: give a number {bound}")
    return value


def get_optimizer(model, optimizer_name="SGD", lr=0.01, momentum=0.9, weight_decay=0.0, nesterov=False):
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer_name!r}: use one of {', '.join(OPTIMIZERS)}")
    _check_number("lr", lr)
    _check_number("momentum", momentum, low_ok=True, high=1.0)
    _check_number("weight_decay", weight_decay, low_ok=True)
    return OPTIMIZERS[optimizer_name](model.parameters(), lr, momentum, weight_decay, nesterov)


class _VerboseStepLR(torch.optim.lr_scheduler.StepLR):
    """StepLR that prints when it changes the learning rate (torch dropped `verbose=`)."""

    def step(self, epoch=None):
        before = [g["lr"] for g in self.optimizer.param_groups]
        super().step() if epoch is None else super().step(epoch)
        for i, (old, group) in enumerate(zip(before, self.optimizer.param_groups)):
            if group["lr"] != old:
                print(f"Adjusting learning rate of group {i} to {group['lr']:.4e}.")


def get_scheduler(optimizer, step_size=15, gamma=0.1, verbose=False, *, name="StepLR", max_lr=None,
                  total_steps=None, pct_start=0.25):
    """StepLR(step_size, gamma) as in the original, stepped once per epoch; or a OneCycleLR over
    `total_steps` batches peaking at `max_lr`, warming up for `pct_start` of them, stepped once per batch."""
    if name == "StepLR":
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size={step_size!r}: give a whole number of epochs, 1 or more")
        _check_number("gamma", gamma)
        cls = _VerboseStepLR if verbose else torch.optim.lr_scheduler.StepLR
        return cls(optimizer, step_size=step_size, gamma=gamma)
    if name == "OneCycleLR":
        _check_number("pct_start", pct_start, high=1.0)
        if pct_start >= 1.0:
            raise ValueError(f"pct_start={pct_start!r}: give a share of the steps above 0 and below 1")
        _check_number("max_lr", max_lr)
        if not isinstance(total_steps, int) or pct_start * total_steps <= 1 or (1 - pct_start) * total_steps <= 1:
            least = math.floor(1 / min(pct_start, 1 - pct_start)) + 1
            raise ValueError(f"a one-cycle schedule needs at least {least} optimizer steps to warm up and cool down, "
                             f"and this run has {total_steps}: train on more images, for more epochs, or with a "
                             "smaller batch")
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                   pct_start=pct_start)
    raise ValueError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")


def steps_per_batch(scheduler):
    """Whether `scheduler` moves the learning rate after every batch (one-cycle, cyclic) rather than every epoch."""
    return isinstance(scheduler, PER_BATCH)


def get_loss(loss_name="nll_loss", label_smoothing=0.0):
    """The loss by name; with `label_smoothing` > 0, cross-entropy against smoothed targets, in fp32 (the Net's
    log-probabilities are their own log-softmax, so this is the smoothed NLL)."""
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}: use one of {', '.join(LOSSES)}")
    _check_number("label_smoothing", label_smoothing, low_ok=True, high=1.0)
    if label_smoothing:
        return functools.partial(_smoothed, label_smoothing=label_smoothing)
    return LOSSES[loss_name]


def _smoothed(log_probs, target, label_smoothing):
    return F.cross_entropy(log_probs.float(), target, label_smoothing=label_smoothing)


def build_training(model, recipe, steps_per_epoch, verbose=False):
    """Optimizer, scheduler and loss for `recipe`: the notebook's get_optimizer/get_scheduler/get_loss, in one call."""
    optimizer = get_optimizer(model, recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay,
                              recipe.nesterov)
    scheduler = get_scheduler(optimizer, recipe.step_size, recipe.gamma, verbose, name=recipe.scheduler,
                              max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch,
                              pct_start=recipe.pct_start)
    return optimizer, scheduler, get_loss("nll_loss", recipe.label_smoothing)


def count_correct(pred, labels):
    """How many rows of `pred` have their arg-max at the label, as a tensor (no sync with a GPU)."""
    return pred.argmax(dim=1).eq(labels).sum()


REFRESH_EVERY = 10  # batches between progress-bar updates and NaN checks (each one syncs a GPU)


def train_epoch(model, loader, optimizer, criterion, *, device, ctx=SINGLE, scheduler=None, amp_dtype=None,
                scaler=None, progress=True, steps=None, epoch_before=0):
    """One training epoch on `device` (a torch.device); returns its mean loss and accuracy (%).

    `steps`, a dict with the STEP_RECORD lists (e.g. a `new_history()`), also gets a row every REFRESH_EVERY
    batches: the fractional epoch (this is epoch `epoch_before` + 1), the learning rate, and the mean loss
    and accuracy of the batches since the last row. `scheduler`, when given, is stepped after every batch
    (per-batch schedulers); epoch-wise ones are stepped by the caller. Raises TrainingDivergedError as soon
    as the loss is NaN or infinite. Under torchrun (`ctx` active) the figures are over all processes'
    batches, and each process's loss is weighted by its share of the global batch, so DDP's gradient
    average is the single-process gradient even when the shares differ (a last, smaller batch).
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    batch_idx, loss, last_row = -1, None, (0.0, 0, 0)
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    pbar = tqdm(loader, disable=not (progress and ctx.is_main), dynamic_ncols=True, leave=False)
    for batch_idx, (data, target) in enumerate(pbar):
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(data)
            loss = criterion(output, target) if len(target) else output.sum() * 0.0  # an empty share adds nothing
        step_loss = loss if not ctx.active else loss * _share_weight(ctx, len(target), device)
        if scaler is not None:
            scaler.scale(step_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            step_loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * len(target)
        correct += count_correct(output.detach(), target)
        seen += len(target)
        if (batch_idx + 1) % REFRESH_EVERY == 0:
            totals = _check_and_show(ctx, pbar, loss_sum, correct, seen, batch_idx, loss)
            if steps is not None:
                last_row = _record_step(steps, totals, last_row, epoch_before, batch_idx + 1, n_batches, optimizer)
    if batch_idx < 0:
        raise ValueError("the training loader gave no batches: nothing to train on")
    totals = _check_and_show(ctx, pbar, loss_sum, correct, seen, batch_idx, loss)
    if steps is not None and totals[2] > last_row[2]:
        _record_step(steps, totals, last_row, epoch_before, batch_idx + 1, batch_idx + 1, optimizer)
    return totals[0] / totals[2], 100 * totals[1] / totals[2]


def _share_weight(ctx, n_local, device):
    """This process's share of the global batch times the number of processes: DDP then averages to the mean."""
    n_global = distributed.all_sum(ctx, torch.tensor(n_local, device=device))[0]
    return n_local * ctx.world_size / n_global


def _record_step(steps, totals, last_row, epoch_before, done, n_batches, optimizer):
    """One STEP_RECORD row for the batches since `last_row`; returns the totals as the new last row."""
    (loss_sum, correct, seen), (loss_before, correct_before, seen_before) = totals, last_row
    n = seen - seen_before
    fraction = done / n_batches if n_batches else 1.0
    for key, value in (("step_epoch", epoch_before + min(fraction, 1.0)), ("step_lr", optimizer.param_groups[0]["lr"]),
                       ("step_train_loss", (loss_sum - loss_before) / n),
                       ("step_train_acc", 100 * (correct - correct_before) / n)):
        steps[key].append(value)
    return totals


def _check_and_show(ctx, pbar, loss_sum, correct, processed, batch_idx, loss):
    """Stop on a NaN/inf loss; show the original's progress line (both sync with a GPU, hence not every batch).

    Returns the loss sum, correct count and images seen so far, over every process: all of them decide alike.
    """
    loss_sum, correct, processed = distributed.all_sum(ctx, loss_sum.clone(), correct.clone(), processed.clone())
    loss_sum, correct, processed = loss_sum.item(), correct.item(), processed.item()
    if not math.isfinite(loss_sum):
        raise TrainingDivergedError(f"training diverged: loss is {loss_sum / max(processed, 1)} at batch "
                                    f"{batch_idx}; lower the learning rate")
    pbar.set_description(f"Train: Loss={loss.item():0.4f} Batch_id={batch_idx} "
                         f"Accuracy={100 * correct / max(processed, 1):0.2f}")
    return loss_sum, correct, processed


def evaluate(model, loader, criterion, *, device, ctx=SINGLE, amp_dtype=None, progress=True):
    """Mean per-sample loss, accuracy (%), number correct and number of images of `model` over `loader`.

    Under torchrun each process evaluates its share and the sums are added up: every image counts once.
    """
    log_probs, labels, _ = predict_loader(model, loader, device, amp_dtype, progress=progress and ctx.is_main)
    # One criterion call over all outputs is the true per-sample mean (the original summed batch
    # means and divided by the dataset size, which printed 0.0000).
    local_loss = float(criterion(log_probs, labels).double()) * len(labels) if len(labels) else 0.0
    sums = torch.tensor([local_loss, float(count_correct(log_probs, labels)), len(labels)], dtype=torch.float64)
    loss_sum, n_correct, n = distributed.all_sum(ctx, sums.to(device))[0].tolist()
    if n == 0:
        raise ValueError("the evaluation loader gave no images: nothing to evaluate")
    return loss_sum / n, 100.0 * n_correct / n, int(n_correct), int(n)


def report_line(loss, n_correct, n, eval_name="test"):
    """The original notebook's line after each evaluation ("Validation set" for held-out training images)."""
    images = "Validation" if eval_name == "val" else "Test"
    return f"{images} set: Average loss: {loss:.4f}, Accuracy: {n_correct}/{n} ({100.0 * n_correct / n:.2f}%)"


COLLAPSED_BELOW = 30.0  # % training accuracy over the 10 batches after the warm-up: chance is 10%
MIN_STEPS_TO_JUDGE = 50  # fewer steps than this are too few to call a run collapsed (a 4-step epoch is at chance)


def collapse_warning(history, steps_per_epoch, warmup_steps):
    """A one-line warning if the training accuracy over the 10 batches after the warm-up was below
    COLLAPSED_BELOW (measured over 65 short one-cycle runs: every run under 28% there ended at 65% or less, every
    run at 33% or more reached 87% or more); without a warm-up (a step schedule, as the original's, whose first
    epoch is erratic: 13% at its 60th step, 88% at its end), the last 10 batches of the first epoch. None while
    that window is not recorded yet (and before MIN_STEPS_TO_JUDGE steps), or when the run learns."""
    check_at = max(warmup_steps + REFRESH_EVERY if warmup_steps else steps_per_epoch, MIN_STEPS_TO_JUDGE)
    for step_epoch, acc in zip(history["step_epoch"], history["step_train_acc"]):
        step = round(step_epoch * steps_per_epoch)
        if step >= check_at:
            if acc >= COLLAPSED_BELOW:
                return None
            when = "after the warm-up" if warmup_steps else "the end of the first epoch"
            return (f"training accuracy is {acc:.0f}% at step {step}, {when}: the run looks collapsed "
                    "(most ReLUs dead after a gradient spike at the peak learning rate) and may stay near chance; "
                    "try a lower learning rate or a longer warm-up")
    return None


# One record of a run: the history's keys are metrics.csv's columns (one row an epoch) and steps.csv's (a row
# every REFRESH_EVERY batches), with how each is written there.
def epoch_record(eval_name="test"):
    """metrics.csv's columns and formats, the per-epoch evaluation named after its images: "test", or "val" for a
    run that holds out a validation split (its test set is then evaluated once, at the end)."""
    return {"epoch": "d", "lr": ".6g", "train_loss": ".6f", "train_acc": ".2f", f"{eval_name}_loss": ".6f",
            f"{eval_name}_acc": ".2f", "train_seconds": ".2f", "elapsed_seconds": ".2f"}


EPOCH_RECORD = epoch_record("test")
STEP_RECORD = {"step_epoch": ".4f", "step_lr": ".6g", "step_train_loss": ".6f", "step_train_acc": ".2f"}
_OLD_HISTORY_KEYS = {"train_losses": "train_loss", "test_losses": "test_loss"}  # checkpoints before the rename


def new_history(saved=None, eval_name="test"):
    """An empty history, or a saved one (older spellings renamed) checked: one number per epoch and step."""
    record = epoch_record(eval_name)
    history = {k: [] for k in {**record, **STEP_RECORD}}
    if saved is not None and not isinstance(saved, dict):
        raise ValueError("the history is not a mapping")
    for key, values in (saved or {}).items():
        key = _OLD_HISTORY_KEYS.get(key, key)
        if key not in history or not isinstance(values, (list, tuple)):
            raise ValueError(f"the history's {key!r} is not a list of a known metric")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"the history's {key!r} holds values that are not numbers")
        history[key] = list(values)
    if not all(isinstance(e, int) for e in history["epoch"]):
        raise ValueError("the history's epochs are not whole numbers")
    if len({len(history[k]) for k in record}) != 1:
        raise ValueError("the saved history does not have one value of each metric per epoch")
    if len({len(history[k]) for k in STEP_RECORD}) != 1:
        raise ValueError("the saved history does not have one value of each metric per step")
    return history


def fit(model, device, train_loader, test_loader, optimizer, scheduler, criterion, epochs, *, ctx=SINGLE,
        history=None, start_epoch=1, amp_dtype=None, on_epoch_end=None, progress=True, started=None,
        eval_name="test", warmup_steps=0, eval_model=None):
    """The epoch loop of every run: train, evaluate, step an epoch-wise scheduler, record.

    Appends one value of each EPOCH_RECORD key per epoch to `history` (a new one when None) and returns it,
    then calls `on_epoch_end(epoch, history)` (a run saves checkpoints there). Starting at `start_epoch`
    with a restored `history` continues a run. `elapsed_seconds` counts from `started` (a time.perf_counter()
    value; default: now), plus the elapsed time the restored history already holds. Per-batch schedulers are
    stepped every batch, ReduceLROnPlateau with the epoch's test loss, the others once an epoch. The evaluation
    (always the plain NLL) is recorded as `eval_name`_loss/_acc: "val" when `test_loader` holds validation images.
    After `warmup_steps` (and 10 more), a run still at chance gets a warning (see `collapse_warning`).
    `eval_model`, when given, is what is evaluated instead of `model` (e.g. `model` under test-time augmentation).
    """
    device = torch.device(device)
    for name, value in (("epochs", epochs), ("start_epoch", start_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: give a positive whole number")
    history = new_history(eval_name=eval_name) if history is None else history
    warned = False
    started = time.perf_counter() if started is None else started
    elapsed_before = history["elapsed_seconds"][-1] if history["elapsed_seconds"] else 0.0
    per_batch = steps_per_batch(scheduler)
    on_plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    say = print if ctx.is_main else (lambda *a, **k: None)
    evaluated = model if eval_model is None else eval_model
    for epoch in range(start_epoch, epochs + 1):
        for shuffler in (train_loader, getattr(train_loader, "sampler", None)):  # ours, or a DistributedSampler
            if hasattr(shuffler, "set_epoch"):
                shuffler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        say(f"Epoch {epoch}  lr {lr:.4g}")
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(model, train_loader, optimizer, criterion, device=device, ctx=ctx,
                                            scheduler=scheduler if per_batch else None, amp_dtype=amp_dtype,
                                            scaler=scaler, progress=progress, steps=history,
                                            epoch_before=epoch - 1)
        train_seconds = time.perf_counter() - t0
        test_loss, test_acc, n_correct, n = evaluate(evaluated, test_loader, F.nll_loss, device=device, ctx=ctx,
                                                     amp_dtype=amp_dtype, progress=progress)
        say(report_line(test_loss, n_correct, n, eval_name))
        if not warned:
            warning = collapse_warning(history, len(train_loader), warmup_steps)
            if warning:
                warned = True
                if ctx.is_main:
                    print(f"warning: {warning}", file=sys.stderr, flush=True)
        if on_plateau:
            scheduler.step(test_loss)
        elif scheduler is not None and not per_batch:
            scheduler.step()
        for key, value in (("epoch", epoch), ("lr", lr), ("train_loss", train_loss), ("train_acc", train_acc),
                           (f"{eval_name}_loss", test_loss), (f"{eval_name}_acc", test_acc),
                           ("train_seconds", train_seconds),
                           ("elapsed_seconds", elapsed_before + time.perf_counter() - started)):
            history[key].append(value)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    return history
