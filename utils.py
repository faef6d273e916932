"""The classic S5 face: `from utils import *` gives a notebook the names the original S5 notebook used, plus the
few this repo adds. The code lives in the `s5` package, one module a subject (see s5/__init__.py).

The classic names keep their original call shapes, so notebooks written against the original keep working:
get_train_transforms(), get_test_transforms(), get_MNISTdataset_with_loader('train', kwargs),
GetCorrectPredCount(pred, labels), train(model, device, train_loader, optimizer, criterion, train_losses,
train_acc), test(model, device, test_loader, criterion, test_losses, test_acc), get_optimizer(model, "SGD", lr,
momentum), get_scheduler(optimizer, step_size, gamma, verbose), get_loss("nll_loss"), post_display(loader),
post_accuracyplots(train_losses, test_losses, train_acc, test_acc). Those below adapt the classic shapes (a
DataLoader-style kwargs dict, lists to fill, devices as strings) to the core's, checking every value with the
configuration's fields (s5.config); the rest are the core's own. Importing this shows the library's log lines.
"""

from s5 import loop as _loop
from s5 import optim as _optim
from s5.callbacks import TensorBoardLog
from s5.checkpoints import CheckpointError, load_checkpoint, save_weights
from s5.cli import show_logs as _show_logs
from s5.config import FIELDS, RECIPES, ConfigError, Field, Recipe, RunConfig, check, get_recipe
from s5.data import MEAN, STD, FastMNISTLoader, get_test_transforms, get_train_transforms, make_loader
from s5.demo import build_app
from s5.device import amp_dtype_for, as_device, cpu_name, get_device, keep_freed_memory, set_seed
from s5.digits import ImageInputError, load_digit, predict_digits, preprocess_digit
from s5.evaluation import confusion_matrix, misclassified, predict_loader
from s5.loop import Step, TrainingDivergedError, evaluate, new_history, train_epoch
from s5.mnist import MNIST_MD5 as _MNIST_MD5
from s5.mnist import MNISTDataError, ensure_mnist, load_split
from s5.optim import build_training, steps_per_batch
from s5.plots import (
    plot_confusion_matrix,
    plot_misclassified,
    plot_predictions,
    plot_training,
    post_accuracyplots,
    post_display,
)
from s5.receptive_field import receptive_field
from s5.run import Run

_show_logs()
_FAST_KWARGS = {"batch_size", "shuffle", "drop_last", "num_workers", "pin_memory", "persistent_workers",
                "prefetch_factor"}  # the fast loader has no workers: it accepts and ignores the last four


def get_MNISTdataset_with_loader(datasettype, kwargs=None, loader="fast", data_dir=None, device=None, subset=None,
                                 seed=None, checksums=_MNIST_MD5, shard=(0, 1), augment="classic", epoch_images=None):
    """The loader for the 'train' or 'test' split, from DataLoader-style kwargs (batch_size, shuffle, drop_last,
    num_workers, pin_memory, ...), as the original notebook called it.

    loader='fast' (default) gives a FastMNISTLoader on `device` (default: get_device(), the machine's accelerator
    when there is one), augmenting whole batches there; loader='classic' the original DataLoader with per-image PIL
    transforms. Both read the same verified files. `subset` keeps the first N images; `seed` fixes the shuffling
    and augmentation; `shard=(rank, world_size)` gives process `rank` its share of every global batch; `augment`
    names the training augmentation (a recipe's: "classic", or with the fast loader "affine", "elastic");
    `epoch_images` (the fast loader's, a recipe's: sprint's 24,000) ends each epoch after the first N of its shuffled
    images, None every image.
    """
    Field(str, choices=("train", "test")).check("datasettype", datasettype)
    options = dict(kwargs or {})
    batch_size = check("batch_size", options.pop("batch_size", 512 if check("loader", loader) == "fast" else 1))
    if loader == "fast" and set(options) - _FAST_KWARGS:
        raise ConfigError("kwargs", f"the fast loader does not take {sorted(set(options) - _FAST_KWARGS)}: use "
                                    "loader='classic' for those")
    workers = FIELDS["workers"].check("num_workers", options.pop("num_workers", 0))
    if check("epoch_images", epoch_images) and (loader == "classic" or datasettype == "test"):
        raise ConfigError("epoch_images", "the classic loader trains on whole epochs, and the test split is read "
                                          "whole: give it to the fast loader of the 'train' split")
    if loader == "classic" and batch_size % shard[1]:
        raise ConfigError("batch_size", f"{batch_size} does not split evenly over {shard[1]} processes: give a "
                                        f"multiple of {shard[1]} for the classic loader")
    images, labels = load_split(datasettype == "train", data_dir, checksums)
    subset = Field(int, 1, len(labels), none=True).check("subset", subset)  # None: all
    shuffle, drop_last, pin = options.pop("shuffle", False), options.pop("drop_last", False), \
        options.pop("pin_memory", False)
    return make_loader(images[:subset], labels[:subset], batch_size, datasettype == "train", loader,
                       get_device(None) if device is None else as_device(device), seed=seed, num_workers=workers,
                       pin_memory=pin, drop_last=drop_last, shuffle=shuffle, shard=shard,
                       augment=check("augment", augment), **(options if loader == "classic" else {}),
                       limit=epoch_images)


def GetCorrectPredCount(pPrediction, pLabels):
    """Number of rows of `pPrediction` whose arg-max equals the label."""
    return int(_loop.count_correct(pPrediction, pLabels))


def train(model, device, train_loader, optimizer, criterion, train_losses, train_acc, *, scheduler=None,
          amp_dtype=None, progress=True, steps=None):
    """One training epoch of `model`, its batches moved to the model's device; appends the epoch's mean loss and
    accuracy (%) to the lists given.

    `scheduler`, when given, is stepped after every batch (one-cycle); the epoch-wise StepLR is stepped by the
    caller, as in the original. `steps` (e.g. a `new_history()`) also gets a row every few batches: the
    fractional epoch, the learning rate, the loss and accuracy since the last row.
    """
    step = Step(model, optimizer, criterion, scheduler, amp_dtype)
    loss, acc = train_epoch(step, train_loader, progress=progress, history=steps, epoch_before=len(train_losses))
    train_losses.append(loss)
    train_acc.append(acc)


def test(model, device, test_loader, criterion, test_losses, test_acc, *, amp_dtype=None, progress=True):
    """Evaluate; appends the mean per-sample loss and accuracy (%) to the lists given and prints the original's
    line."""
    loss, acc, n_correct, n = evaluate(model, test_loader, criterion, as_device(device), amp_dtype=amp_dtype,
                                       progress=progress)
    test_losses.append(loss)
    test_acc.append(acc)
    print(_loop.report_line(loss, n_correct, n))


def get_optimizer(model, optimizer_name="SGD", lr=0.01, momentum=0.9, weight_decay=0.0, nesterov=False):
    """SGD (the original's), Adam, AdamW or Muon (the hidden layers' weights by Muon, the rest by AdamW); for all
    but SGD `momentum` is their first beta."""
    return _optim.get_optimizer(model, Recipe("custom", 1, 1, lr, optimizer_name, momentum, weight_decay, nesterov))


def get_scheduler(optimizer, step_size=15, gamma=0.1, verbose=False, *, name="StepLR", max_lr=None, total_steps=None,
                  pct_start=0.25):
    """StepLR(step_size, gamma) as in the original, stepped once per epoch (printing its drops when `verbose`); or
    a OneCycleLR over `total_steps` batches peaking at `max_lr`, warming up for `pct_start` of them, every batch, its
    momentum (beta1) dipping 0.1 below the optimizer's own as the learning rate peaks."""
    group = optimizer.param_groups[0]
    recipe = Recipe("custom", 1, 1, max_lr or group["lr"], momentum=group["betas"][0] if "betas" in group else
                    group.get("momentum", 0.0), scheduler=name, step_size=step_size, gamma=gamma, pct_start=pct_start)
    return _optim.get_scheduler(optimizer, recipe, Field(int, 1, none=True).check("total_steps", total_steps), verbose)


def get_loss(loss_name="nll_loss", label_smoothing=0.0):
    """The loss by name (nll_loss, the original's, or cross_entropy); label smoothing makes it the smoothed NLL."""
    Field(str, choices=tuple(_optim.LOSSES)).check("loss_name", loss_name)
    return _optim.get_loss(loss_name, check("label_smoothing", label_smoothing))


__all__ = [
    # the original S5 notebook's names
    "get_train_transforms", "get_test_transforms", "get_MNISTdataset_with_loader", "GetCorrectPredCount",
    "train", "test", "get_optimizer", "get_scheduler", "get_loss", "post_display", "post_accuracyplots",
    # set-up: recipes and run configurations, seeds, device and precision, data
    "Recipe", "RECIPES", "get_recipe", "RunConfig", "set_seed", "get_device", "amp_dtype_for", "keep_freed_memory",
    "cpu_name", "MEAN", "STD", "ensure_mnist", "load_split", "make_loader", "FastMNISTLoader",
    # training beyond the classic loop: the core the adapters above call, and a whole run
    "build_training", "steps_per_batch", "Step", "train_epoch", "evaluate", "new_history", "Run",
    # after the run
    "plot_training", "TensorBoardLog", "predict_loader", "confusion_matrix", "misclassified", "plot_confusion_matrix",
    "plot_misclassified", "receptive_field", "save_weights", "load_checkpoint",
    # your own digits
    "preprocess_digit", "load_digit", "predict_digits", "plot_predictions", "build_app",
    # what can go wrong, each with a one-line message
    "MNISTDataError", "CheckpointError", "ImageInputError", "TrainingDivergedError", "ConfigError",
]
