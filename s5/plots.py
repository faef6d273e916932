"""Figures: the sample grid, the loss/accuracy curves, the confusion matrix, the mistakes, your predictions. Each
returns a matplotlib Figure (Jupyter shows it inline) and, given `save_path`, also writes it as a PNG atomically."""

import contextlib
import io
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from s5.data import MEAN, STD
from s5.digits import ImageInputError, gray_and_alpha, open_image
from s5.files import atomic_write


def png_bytes(fig):
    """`fig` as PNG bytes (100 dpi, tight), rendered before any file is opened."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _finish(fig, save_path):
    fig.tight_layout()
    if save_path:
        data = png_bytes(fig)  # rendered before the file is opened, written whole or not at all
        atomic_write(save_path, lambda f: f.write(data))
    return fig


def _grid(rows, cols, figsize, digits=(), column=0, **title):
    """Axes without axis lines, (normalised (1, 28, 28) digit, title) pairs shown row by row from `column` on."""
    fig, axes = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, text) in zip(axes[:, column:].flat, digits):
        ax.imshow((image.detach().float().cpu() * STD + MEAN).clamp(0, 1).numpy().squeeze(0), cmap="gray")
        ax.set_title(text, **title)
    return fig, axes


def post_display(train_loader, save_path=None):
    """4x4 grid of the first batch, denormalised, with labels as titles."""
    images, labels = next(iter(train_loader))
    return _finish(_grid(4, 4, (6, 6.5), zip(images, map(int, labels)))[0], save_path)


def post_accuracyplots(train_losses, test_losses, train_acc, test_acc, save_path=None, *, evaluated_on="Test"):
    """The original 2x2 figure: training loss and accuracy, then the test set's (or `evaluated_on`'s: Validation)."""
    fig, axs = plt.subplots(2, 2, figsize=(15, 10))
    titles = ["Training Loss", "Training Accuracy", f"{evaluated_on} Loss", f"{evaluated_on} Accuracy"]
    for ax, values, title in zip(axs.flat, (train_losses, train_acc, test_losses, test_acc), titles):
        ax.plot(range(1, len(values) + 1), values, marker="o" if len(values) < 30 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set(title=title, xlabel="epoch", ylabel="accuracy (%)" if "Accuracy" in title else "loss")
    return _finish(fig, save_path)


def plot_training(steps, test_losses, test_acc, save_path=None, *, evaluated_on="test"):
    """Loss and accuracy every few batches (`steps`: a history's step lists) and each epoch's (dots); the lr."""
    fig, axs = plt.subplots(1, 3, figsize=(16, 4.5))
    x, epochs = steps["step_epoch"], range(1, len(test_acc) + 1)
    for ax, key, test, title, unit in ((axs[0], "step_train_loss", test_losses, "Loss", "loss"),
                                       (axs[1], "step_train_acc", test_acc, "Accuracy", "accuracy (%)")):
        ax.plot(x, steps[key], lw=1, label="train (every few batches)")
        ax.plot(epochs, test, "o-", label=f"{evaluated_on} (each epoch)")
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.legend()
    if test_acc:  # the interesting end of the scale: the evaluated points and the later half of training
        axs[1].set_ylim(max(0.0, min([*test_acc, *steps["step_train_acc"][len(x) // 2:]]) - 1), 100.2)
    axs[2].plot(x, steps["step_lr"])
    axs[2].set(title="Learning rate", xlabel="epoch", ylabel="lr")
    return _finish(fig, save_path)


def plot_confusion_matrix(cm, save_path=None):
    cm = torch.as_tensor(cm)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm.float().log1p().numpy(), cmap="Blues")  # log colour scale, so the few mistakes show
    for (i, j), v in np.ndenumerate(cm.numpy()):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if i == j else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"Confusion matrix ({int(cm.trace())}/{int(cm.sum())} correct)")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    return _finish(fig, save_path)


def plot_misclassified(mistakes, save_path=None, cols=8):
    rows = max(1, math.ceil(len(mistakes) / cols))
    fig, _ = _grid(rows, cols, (cols * 1.6, rows * 2.2), fontsize=8, digits=[
        (m["image"], f"true {m['true']}\npred {m['predicted']} ({m['probability']:.0%})") for m in mistakes])
    fig.suptitle("Most confident mistakes")
    return _finish(fig, save_path)


def plot_predictions(results, save_path=None):
    """Each classified image next to the 28x28 digit the model saw, titled with its prediction."""
    ok = [r for r in results if r["error"] is None]
    fig, axes = _grid(max(1, len(ok)), 2, (4, 2 * max(1, len(ok))), column=1, fontsize=8, digits=[
        (r["input"], f"{r['digit']} ({r['probability']:.0%}), then {r['runner_up']}") for r in ok])
    for left, r in zip(axes[:, 0], ok):
        with contextlib.suppress(ImageInputError):  # gone since it was classified: the model's input still shows
            gray, alpha = gray_and_alpha(open_image(r["path"]))  # as preprocessing read it, transparency kept
            left.imshow(np.dstack([gray] * 3 + [alpha if alpha is not None else np.ones_like(gray)]))
        left.set_title(Path(r["path"]).name, fontsize=8)
    return _finish(fig, save_path)
