"""The classic S5 face: `from utils import *` gives a notebook the names the original S5 notebook used, plus the
few this repo adds. The code lives in the `s5` package, one module a subject (see s5/__init__.py).

The classic names keep their original call shapes, so notebooks written against the original keep working:
get_train_transforms(), get_test_transforms(), get_MNISTdataset_with_loader('train', kwargs),
GetCorrectPredCount(pred, labels), train(model, device, train_loader, optimizer, criterion, train_losses,
train_acc), test(model, device, test_loader, criterion, test_losses, test_acc), get_optimizer(model, "SGD", lr,
momentum), get_scheduler(optimizer, step_size, gamma, verbose), get_loss("nll_loss"), post_display(loader),
post_accuracyplots(train_losses, test_losses, train_acc, test_acc). The first four below adapt those shapes (a
DataLoader-style kwargs dict, lists to fill, devices as strings) to the core's; the rest are the core's own.
"""

from s5 import engine as _engine
from s5.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from s5.config import LOADERS as _LOADERS
from s5.config import RECIPES, ConfigError, Recipe, RunConfig, get_recipe
from s5.data import (
    MEAN,
    STD,
    FastMNISTLoader,
    get_test_transforms,
    get_train_transforms,
    make_loader,
)
from s5.demo import build_app
from s5.device import amp_dtype_for, as_device, cpu_name, get_device, keep_freed_memory, set_seed
from s5.digits import ImageInputError, load_digit, predict_digits, preprocess_digit
from s5.engine import (
    TrainingDivergedError,
    build_training,
    evaluate,
    fit,
    get_loss,
    get_optimizer,
    get_scheduler,
    new_history,
    steps_per_batch,
    train_epoch,
)
from s5.evaluation import confusion_matrix, misclassified, predict_loader
from s5.mnist import MNIST_MD5 as _MNIST_MD5
from s5.mnist import MNISTDataError, ensure_mnist, load_split
from s5.plots import (
    plot_confusion_matrix,
    plot_misclassified,
    plot_predictions,
    plot_training,
    post_accuracyplots,
    post_display,
)
from s5.receptive_field import receptive_field
from s5.tensorboard import TensorBoardLog

_FAST_KWARGS = {"batch_size", "shuffle", "drop_last", "num_workers", "pin_memory", "persistent_workers",
                "prefetch_factor"}  # the fast loader has no workers: it accepts and ignores the last four


def get_MNISTdataset_with_loader(datasettype, kwargs=None, loader="fast", data_dir=None, device=None, subset=None,
                                 seed=None, checksums=_MNIST_MD5, shard=(0, 1), augment="classic"):
    """The loader for the 'train' or 'test' split, from DataLoader-style kwargs (batch_size, shuffle, drop_last,
    num_workers, pin_memory, ...), as the original notebook called it.

    loader='fast' (default) gives a FastMNISTLoader on `device` (default: CUDA when present, else the CPU),
    augmenting whole batches there; loader='classic' the original DataLoader with per-image PIL transforms.
    Both read the same verified files. `subset` keeps the first N images; `seed` fixes the shuffling and
    augmentation; `shard=(rank, world_size)` gives process `rank` its share of every global batch; `augment` names
    the training augmentation (a recipe's: "classic", the original's, or with the fast loader "affine", "elastic").
    """
    if datasettype not in ("train", "test"):
        raise ValueError(f"unknown datasettype {datasettype!r}: use 'train' or 'test'")
    if loader not in _LOADERS:
        raise ValueError(f"unknown loader {loader!r}: use one of {', '.join(_LOADERS)}")
    options = dict(kwargs or {})
    batch_size = options.pop("batch_size", 512 if loader == "fast" else 1)  # 1: DataLoader's default
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give a positive whole number")
    if loader == "fast" and set(options) - _FAST_KWARGS:
        raise ValueError(f"the fast loader does not take {sorted(set(options) - _FAST_KWARGS)}: use "
                         "loader='classic' for those")
    workers = options.pop("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"num_workers={workers!r}: give 0 (load in the main process) or more")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"subset={subset!r}: give a positive whole number")
    rank, world_size = shard
    if loader == "classic" and batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} does not split evenly over {world_size} processes: give a "
                         f"multiple of {world_size} for the classic loader")
    images, labels = load_split(datasettype == "train", data_dir, checksums)
    if subset is not None:
        if subset > len(labels):
            raise ValueError(f"subset={subset} is more than the {len(labels):,} images of the {datasettype} "
                             "split: give at most that, or None for all")
        images, labels = images[:subset], labels[:subset]
    device = get_device(None) if device is None else as_device(device)
    shuffle, drop_last, pin = options.pop("shuffle", False), options.pop("drop_last", False), \
        options.pop("pin_memory", False)
    if loader == "fast":
        options = {}
    return make_loader(images, labels, batch_size=batch_size, train=datasettype == "train", loader=loader,
                       device=device, seed=seed, workers=workers, pin_memory=pin, drop_last=drop_last,
                       shuffle=shuffle, shard=shard, augment=augment, **options)


def GetCorrectPredCount(pPrediction, pLabels):
    """Number of rows of `pPrediction` whose arg-max equals the label."""
    return int(_engine.count_correct(pPrediction, pLabels))


def train(model, device, train_loader, optimizer, criterion, train_losses, train_acc, *, scheduler=None,
          amp_dtype=None, scaler=None, progress=True, steps=None):
    """One training epoch; appends its mean loss and accuracy (%) to the lists given.

    `scheduler`, when given, is stepped after every batch (one-cycle); the epoch-wise StepLR is stepped by the
    caller, as in the original. `steps` (e.g. a `new_history()`) also gets a row every few batches: the
    fractional epoch, the learning rate, the loss and accuracy since the last row.
    """
    loss, acc = train_epoch(model, train_loader, optimizer, criterion, device=as_device(device), scheduler=scheduler,
                            amp_dtype=amp_dtype, scaler=scaler, progress=progress, steps=steps,
                            epoch_before=len(train_losses))
    train_losses.append(loss)
    train_acc.append(acc)


def test(model, device, test_loader, criterion, test_losses, test_acc, *, amp_dtype=None, progress=True):
    """Evaluate; appends the mean per-sample loss and accuracy (%) to the lists given and prints the original's
    line."""
    loss, acc, n_correct, n = evaluate(model, test_loader, criterion, device=as_device(device), amp_dtype=amp_dtype,
                                       progress=progress)
    test_losses.append(loss)
    test_acc.append(acc)
    print(_engine.report_line(loss, n_correct, n))


__all__ = [
    # the original S5 notebook's names
    "get_train_transforms", "get_test_transforms", "get_MNISTdataset_with_loader", "GetCorrectPredCount",
    "train", "test", "get_optimizer", "get_scheduler", "get_loss", "post_display", "post_accuracyplots",
    # set-up: recipes and run configurations, seeds, device and precision, data
    "Recipe", "RECIPES", "get_recipe", "RunConfig", "set_seed", "get_device", "amp_dtype_for", "keep_freed_memory",
    "cpu_name",
    "MEAN", "STD", "ensure_mnist", "load_split", "make_loader", "FastMNISTLoader",
    # training beyond the classic loop: the core the adapters above call
    "build_training", "steps_per_batch", "train_epoch", "evaluate", "fit", "new_history",
    # after the run
    "plot_training", "TensorBoardLog", "predict_loader", "confusion_matrix", "misclassified", "plot_confusion_matrix",
    "plot_misclassified",
    "receptive_field", "save_checkpoint", "load_checkpoint",
    # your own digits
    "preprocess_digit", "load_digit", "predict_digits", "plot_predictions", "build_app",
    # what can go wrong, each with a one-line message
    "MNISTDataError", "CheckpointError", "ImageInputError", "TrainingDivergedError", "ConfigError",
]
