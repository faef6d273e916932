"""The classic S5 face: `from utils import *` gives a notebook the names the original S5 notebook used, plus the
few this repo adds. The code lives in the `s5` package, one module a subject (see s5/__init__.py).

The classic names keep their original call shapes, so notebooks written against the original keep working:
get_train_transforms(), get_test_transforms(), get_MNISTdataset_with_loader('train', kwargs),
GetCorrectPredCount(pred, labels), train(model, device, train_loader, optimizer, criterion, train_losses,
train_acc), test(model, device, test_loader, criterion, test_losses, test_acc), get_optimizer(model, "SGD", lr,
momentum), get_scheduler(optimizer, step_size, gamma, verbose), get_loss("nll_loss"), post_display(loader),
post_accuracyplots(train_losses, test_losses, train_acc, test_acc).
"""

from s5.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from s5.data import (
    MEAN,
    STD,
    FastMNISTLoader,
    MNISTDataError,
    ensure_mnist,
    get_MNISTdataset_with_loader,
    get_test_transforms,
    get_train_transforms,
)
from s5.demo import build_app
from s5.device import amp_dtype_for, cpu_name, get_device, keep_freed_memory, set_seed
from s5.digits import ImageInputError, load_digit, predict_digits, preprocess_digit
from s5.engine import (
    RECIPES,
    GetCorrectPredCount,
    Recipe,
    TrainingDivergedError,
    build_training,
    fit,
    get_loss,
    get_optimizer,
    get_recipe,
    get_scheduler,
    new_history,
    steps_per_batch,
    test,
    train,
)
from s5.evaluation import confusion_matrix, misclassified, predict_loader
from s5.plots import (
    plot_confusion_matrix,
    plot_misclassified,
    plot_predictions,
    plot_training,
    post_accuracyplots,
    post_display,
)
from s5.receptive_field import receptive_field

__all__ = [
    # the original S5 notebook's names
    "get_train_transforms", "get_test_transforms", "get_MNISTdataset_with_loader", "GetCorrectPredCount",
    "train", "test", "get_optimizer", "get_scheduler", "get_loss", "post_display", "post_accuracyplots",
    # set-up: recipes, seeds, device and precision, data
    "Recipe", "RECIPES", "get_recipe", "set_seed", "get_device", "amp_dtype_for", "keep_freed_memory",
    "cpu_name",
    "MEAN", "STD", "ensure_mnist", "FastMNISTLoader",
    # training beyond the classic loop
    "build_training", "steps_per_batch", "fit", "new_history",
    # after the run
    "plot_training", "predict_loader", "confusion_matrix", "misclassified", "plot_confusion_matrix",
    "plot_misclassified",
    "receptive_field", "save_checkpoint", "load_checkpoint",
    # your own digits
    "preprocess_digit", "load_digit", "predict_digits", "plot_predictions", "build_app",
    # what can go wrong, each with a one-line message
    "MNISTDataError", "CheckpointError", "ImageInputError", "TrainingDivergedError",
]
