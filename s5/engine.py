"""Training: optimizer, scheduler, loss, recipes, the classic `train`/`test` loops and the epoch loop `fit`.

The notebook calls `train` and `test` in its own visible loop, as the original did; `fit` is the same loop with
what train.py needs around it (history, timing, a per-epoch callback for checkpoints).
"""

import math
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from s5 import distributed
from s5.device import as_device
from s5.evaluation import predict_loader

OPTIMIZERS = {
    "SGD": lambda params, lr, momentum, weight_decay, nesterov: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov),
    "Adam": lambda params, lr, momentum, weight_decay, nesterov: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay),  # Adam has no momentum/nesterov of that kind
}
LOSSES = {"nll_loss": F.nll_loss, "cross_entropy": F.cross_entropy}
SCHEDULERS = ("StepLR", "OneCycleLR")


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
    `total_steps` batches peaking at `max_lr`, stepped once per batch (`train(..., scheduler=...)`)."""
    if name == "StepLR":
        cls = _VerboseStepLR if verbose else torch.optim.lr_scheduler.StepLR
        return cls(optimizer, step_size=step_size, gamma=gamma)
    if name == "OneCycleLR":
        if not isinstance(total_steps, int) or pct_start * total_steps <= 1 or (1 - pct_start) * total_steps <= 1:
            least = math.floor(1 / min(pct_start, 1 - pct_start)) + 1
            raise ValueError(f"a one-cycle schedule needs at least {least} optimizer steps to warm up and cool down, "
                             f"and this run has {total_steps}: train on more images, for more epochs, or with a "
                             "smaller batch")
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                   pct_start=pct_start)
    raise ValueError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")


def steps_per_batch(scheduler):
    """Whether `scheduler` is stepped after every batch (one-cycle) rather than after every epoch."""
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


def get_loss(loss_name="nll_loss"):
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}: use one of {', '.join(LOSSES)}")
    return LOSSES[loss_name]


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of a training run. `seed` is the original S5 notebook's."""
    name: str
    epochs: int
    batch_size: int
    lr: float  # the StepLR start, or the OneCycleLR peak
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    scheduler: str = "StepLR"
    step_size: int = 15
    gamma: float = 0.1

    def __post_init__(self):
        for name in ("epochs", "batch_size", "step_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: give a positive whole number")
        _check_number("lr", self.lr)
        _check_number("momentum", self.momentum, low_ok=True, high=1.0)
        _check_number("weight_decay", self.weight_decay, low_ok=True)
        _check_number("gamma", self.gamma)


RECIPES = {
    "seed": Recipe("seed", epochs=20, batch_size=512, lr=0.01),
    "fast": Recipe("fast", epochs=2, batch_size=128, lr=0.15, weight_decay=5e-4, nesterov=True,
                   scheduler="OneCycleLR"),
}
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def get_recipe(name, **overrides):
    """RECIPES[name] with the overrides that are not None (e.g. from command-line flags), checked."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    unknown = set(overrides) - set(RECIPE_FIELDS)
    if unknown:
        raise ValueError(f"get_recipe got {sorted(unknown)}: a recipe has {', '.join(RECIPE_FIELDS[1:])}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def build_training(model, recipe, steps_per_epoch, verbose=False):
    """Optimizer, scheduler and loss for `recipe`: the notebook's get_optimizer/get_scheduler/get_loss, in one call."""
    optimizer = get_optimizer(model, "SGD", recipe.lr, recipe.momentum, recipe.weight_decay, recipe.nesterov)
    scheduler = get_scheduler(optimizer, recipe.step_size, recipe.gamma, verbose, name=recipe.scheduler,
                              max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    return optimizer, scheduler, get_loss("nll_loss")


def _correct(pred, labels):
    return pred.argmax(dim=1).eq(labels).sum()


def GetCorrectPredCount(pPrediction, pLabels):
    """Number of rows of `pPrediction` whose arg-max equals the label."""
    return int(_correct(pPrediction, pLabels).item())


REFRESH_EVERY = 10  # batches between progress-bar updates and NaN checks (each one syncs a GPU)


def train(model, device, train_loader, optimizer, criterion, train_losses, train_acc, *, scheduler=None,
          amp_dtype=None, scaler=None, progress=True, steps=None):
    """One training epoch; appends the epoch's mean loss and accuracy (%) to the lists given.

    `steps`, a dict with the STEP_RECORD lists (e.g. a `new_history()`), also gets a row every REFRESH_EVERY
    batches: the fractional epoch (this is epoch len(train_losses) + 1), the learning rate, and the mean loss
    and accuracy of the batches since the last row.

    `scheduler`, when given, is stepped after every batch (OneCycleLR); epoch-wise schedulers are
    stepped by the caller. Raises TrainingDivergedError as soon as the loss is NaN or infinite.
    In a process group (torchrun) the figures are over all processes' batches, and each process's loss is
    weighted by its share of the global batch, so DistributedDataParallel's gradient average is the
    single-process gradient even when the shares differ (a last, smaller batch).
    """
    device = as_device(device)
    ctx = distributed.current()
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    processed = torch.zeros((), dtype=torch.int64, device=device)
    batch_idx, loss = -1, None
    n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
    last_row = (0.0, 0, 0)  # loss sum, correct, processed at the last step row
    epoch_before = len(train_losses)
    pbar = tqdm(train_loader, disable=not (progress and ctx.is_main), dynamic_ncols=True, leave=False)
    for batch_idx, (data, target) in enumerate(pbar):
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(data)
            loss = criterion(output, target) if len(target) else output.sum() * 0.0  # an empty share adds nothing
        step_loss = loss
        if ctx.active:
            n_global = distributed.all_sum(torch.tensor(len(target), device=device))[0]
            step_loss = loss * (len(target) * ctx.world_size / n_global)
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
        correct += _correct(output.detach(), target)
        processed += len(target)
        if (batch_idx + 1) % REFRESH_EVERY == 0:
            totals = _check_and_show(pbar, loss_sum, correct, processed, batch_idx, loss)
            if steps is not None:
                last_row = _record_step(steps, totals, last_row, epoch_before, batch_idx + 1, n_batches, optimizer)
    if batch_idx < 0:
        raise ValueError("the training loader gave no batches: nothing to train on")
    totals = _check_and_show(pbar, loss_sum, correct, processed, batch_idx, loss)
    if steps is not None and totals[2] > last_row[2]:
        _record_step(steps, totals, last_row, epoch_before, batch_idx + 1, batch_idx + 1, optimizer)
    train_losses.append(totals[0] / totals[2])
    train_acc.append(100 * totals[1] / totals[2])


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


def _check_and_show(pbar, loss_sum, correct, processed, batch_idx, loss):
    """Stop on a NaN/inf loss; show the original's progress line (both sync with a GPU, hence not every batch).

    Returns the loss sum, correct count and images seen so far, over every process: all of them decide alike.
    """
    loss_sum, correct, processed = distributed.all_sum(loss_sum.clone(), correct.clone(), processed.clone())
    loss_sum, correct, processed = loss_sum.item(), correct.item(), processed.item()
    if not math.isfinite(loss_sum):
        raise TrainingDivergedError(f"training diverged: loss is {loss_sum / max(processed, 1)} at batch "
                                    f"{batch_idx}; lower the learning rate")
    pbar.set_description(f"Train: Loss={loss.item():0.4f} Batch_id={batch_idx} "
                         f"Accuracy={100 * correct / max(processed, 1):0.2f}")
    return loss_sum, correct, processed


def test(model, device, test_loader, criterion, test_losses, test_acc, *, amp_dtype=None, progress=True):
    """Evaluate; appends the mean per-sample loss and accuracy (%) to the lists given.

    In a process group each process evaluates its share and the sums are added up: every image counts once.
    """
    device = as_device(device)
    ctx = distributed.current()
    log_probs, labels, _ = predict_loader(model, test_loader, device, amp_dtype, progress=progress and ctx.is_main)
    # One criterion call over all outputs is the true per-sample mean (the original summed batch
    # means and divided by the dataset size, which printed 0.0000).
    local_loss = criterion(log_probs, labels).double() * len(labels) if len(labels) else torch.zeros(())
    sums = torch.tensor([float(local_loss), GetCorrectPredCount(log_probs, labels), len(labels)], dtype=torch.float64)
    loss_sum, n_correct, n = distributed.all_sum(sums.to(device))[0].tolist()
    test_loss, n_correct, n = loss_sum / n, int(n_correct), int(n)
    test_losses.append(test_loss)
    test_acc.append(100.0 * n_correct / n)
    if ctx.is_main:
        print(f"Test set: Average loss: {test_loss:.4f}, Accuracy: {n_correct}/{n} ({100.0 * n_correct / n:.2f}%)")


# One record of a run: the history's keys are metrics.csv's columns (one row an epoch) and steps.csv's (a row
# every REFRESH_EVERY batches), with how each is written there.
EPOCH_RECORD = {"epoch": "d", "lr": ".6g", "train_loss": ".6f", "train_acc": ".2f", "test_loss": ".6f",
                "test_acc": ".2f", "train_seconds": ".2f", "elapsed_seconds": ".2f"}
STEP_RECORD = {"step_epoch": ".4f", "step_lr": ".6g", "step_train_loss": ".6f", "step_train_acc": ".2f"}
_OLD_HISTORY_KEYS = {"train_losses": "train_loss", "test_losses": "test_loss"}  # checkpoints before the rename


def new_history(saved=None):
    """An empty history, or a saved one (older spellings renamed) checked to have one value per epoch and step."""
    history = {k: [] for k in {**EPOCH_RECORD, **STEP_RECORD}}
    for key, values in (saved or {}).items():
        history[_OLD_HISTORY_KEYS.get(key, key)] = list(values)
    if len({len(history[k]) for k in EPOCH_RECORD}) != 1:
        raise ValueError("the saved history does not have one value of each metric per epoch")
    if len({len(history[k]) for k in STEP_RECORD}) != 1:
        raise ValueError("the saved history does not have one value of each metric per step")
    return history


def fit(model, device, train_loader, test_loader, optimizer, scheduler, criterion, epochs, *, history=None,
        start_epoch=1, amp_dtype=None, on_epoch_end=None, progress=True, started=None):
    """The epoch loop of train.py and the tests: train, test, step an epoch-wise scheduler, record.

    Appends one value of each EPOCH_RECORD key per epoch to `history` (a new one when None) and returns it,
    then calls `on_epoch_end(epoch, history)` (train.py saves checkpoints there). Starting at `start_epoch`
    with a restored `history` continues a run. `elapsed_seconds` counts from `started` (a time.perf_counter()
    value; default: now), plus the elapsed time the restored history already holds.
    """
    device = as_device(device)
    for name, value in (("epochs", epochs), ("start_epoch", start_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: give a positive whole number")
    history = new_history() if history is None else history
    started = time.perf_counter() if started is None else started
    elapsed_before = history["elapsed_seconds"][-1] if history["elapsed_seconds"] else 0.0
    per_batch = steps_per_batch(scheduler)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    main = distributed.is_main()
    for epoch in range(start_epoch, epochs + 1):
        for shuffler in (train_loader, getattr(train_loader, "sampler", None)):  # ours, or a DistributedSampler
            if hasattr(shuffler, "set_epoch"):
                shuffler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        if main:
            print(f"Epoch {epoch}  lr {lr:.4g}")
        t0 = time.perf_counter()
        train(model, device, train_loader, optimizer, criterion, history["train_loss"], history["train_acc"],
              scheduler=scheduler if per_batch else None, amp_dtype=amp_dtype, scaler=scaler, progress=progress,
              steps=history)
        history["train_seconds"].append(time.perf_counter() - t0)
        test(model, device, test_loader, criterion, history["test_loss"], history["test_acc"], amp_dtype=amp_dtype,
             progress=progress)
        if scheduler is not None and not per_batch:
            scheduler.step()
        history["epoch"].append(epoch)
        history["lr"].append(lr)
        history["elapsed_seconds"].append(elapsed_before + time.perf_counter() - started)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    return history
