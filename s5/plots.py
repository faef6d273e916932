"""Figures: the sample grid, the loss/accuracy curves, the confusion matrix, the mistakes, your predictions.

Each function returns a matplotlib Figure (Jupyter shows it inline) and, given `save_path`, also writes it as
a PNG atomically.
"""

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


def _denormalise(images):
    return (images.detach().float().cpu() * STD + MEAN).clamp(0, 1).numpy()


def png_bytes(fig):
    """`fig` as PNG bytes (100 dpi, tight): rendered before any file is opened."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(fig, path):
    """Save `fig` as PNG atomically (no half-written image if the run is killed)."""
    data = png_bytes(fig)
    atomic_write(path, lambda f: f.write(data))


def _finish(fig, save_path):
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig


def post_display(train_loader, save_path=None):
    """4x4 grid of the first batch, denormalised, with labels as titles. Returns the Figure."""
    images, labels = next(iter(train_loader))
    n = min(16, len(labels))
    fig, axes = plt.subplots(4, 4, figsize=(6, 6.5))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(_denormalise(images[i]).squeeze(0), cmap="gray")
            ax.set_title(int(labels[i]))
    return _finish(fig, save_path)


def post_accuracyplots(train_losses, test_losses, train_acc, test_acc, save_path=None, *, evaluated_on="Test"):
    """The original 2x2 figure: training loss, training accuracy, test loss, test accuracy (`evaluated_on`
    "Validation" names the bottom row for a run that evaluated held-out training images each epoch)."""
    fig, axs = plt.subplots(2, 2, figsize=(15, 10))
    panels = [(train_losses, "Training Loss"), (train_acc, "Training Accuracy"),
              (test_losses, f"{evaluated_on} Loss"), (test_acc, f"{evaluated_on} Accuracy")]
    for ax, (values, title) in zip(axs.flat, panels):
        ax.plot(range(1, len(values) + 1), values, marker="o" if len(values) < 30 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)" if "Accuracy" in title else "loss")
    return _finish(fig, save_path)


def plot_training(steps, test_losses, test_acc, save_path=None, *, evaluated_on="test"):
    """Loss and accuracy every few batches (lines) with the test set's after each epoch (dots), and the
    learning rate, on a fractional-epoch axis. `steps` holds the STEP_RECORD lists (a history, or the dict
    given to `train(..., steps=)`); the test lists have one value per epoch, drawn at the epoch's end."""
    fig, axs = plt.subplots(1, 3, figsize=(16, 4.5))
    x, epochs = steps["step_epoch"], range(1, len(test_acc) + 1)
    for ax, key, test, title, unit in ((axs[0], "step_train_loss", test_losses, "Loss", "loss"),
                                       (axs[1], "step_train_acc", test_acc, "Accuracy", "accuracy (%)")):
        ax.plot(x, steps[key], lw=1, label="train (every few batches)")
        ax.plot(epochs, test, "o-", label=f"{evaluated_on} (each epoch)")
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.legend()
    if test_acc:  # the interesting end of the scale: the test points and the later half of training
        low = min([*test_acc, *steps["step_train_acc"][len(x) // 2:]])
        axs[1].set_ylim(max(0.0, low - 1), 100.2)
    axs[2].plot(x, steps["step_lr"])
    axs[2].set(title="Learning rate", xlabel="epoch", ylabel="lr")
    return _finish(fig, save_path)


def plot_confusion_matrix(cm, save_path=None):
    cm = torch.as_tensor(cm)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm.float().log1p().numpy(), cmap="Blues")  # log colour scale, so the few mistakes show
    for (i, j), v in np.ndenumerate(cm.numpy()):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if i == j else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"Confusion matrix ({int(cm.trace())}/{int(cm.sum())} correct)")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    return _finish(fig, save_path)


def plot_misclassified(mistakes, save_path=None, cols=8):
    rows = max(1, math.ceil(len(mistakes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes):
        ax.imshow(_denormalise(m["image"]).squeeze(0), cmap="gray")
        ax.set_title(f"true {m['true']}\npred {m['predicted']} ({m['probability']:.0%})", fontsize=8)
    fig.suptitle("Most confident mistakes")
    return _finish(fig, save_path)


def plot_predictions(results, save_path=None):
    """Each classified image next to the 28x28 digit the model saw, titled with its prediction."""
    ok = [r for r in results if r["error"] is None]
    fig, axes = plt.subplots(max(1, len(ok)), 2, figsize=(4, 2 * max(1, len(ok))), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for (left, right), r in zip(axes, ok):
        try:  # the picture as preprocessing read it: grey by its own bit depth, transparency kept
            gray, alpha = gray_and_alpha(open_image(r["path"]))
            left.imshow(np.dstack([gray] * 3 + [alpha if alpha is not None else np.ones_like(gray)]))
        except ImageInputError:  # changed since it was classified: the digit the model saw is still shown
            pass
        left.set_title(Path(r["path"]).name, fontsize=8)
        right.imshow(_denormalise(r["input"]).squeeze(0), cmap="gray")
        right.set_title(f"{r['digit']} ({r['probability']:.0%}), then {r['runner_up']}", fontsize=8)
    return _finish(fig, save_path)
