"""What a trained model does on a whole loader: its outputs (`predict_loader`, the one evaluation loop), the confusion
matrix, its worst mistakes; and `ShiftAveraged`, test-time augmentation as a model wrapper."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from s5.config import Field
from s5.data import MEAN, STD
from s5.device import as_device

SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # (dx, dy): a view reads pixel (i + dy, j + dx) at (i, j)


class ShiftAveraged(torch.nn.Module):
    """Test-time augmentation: `model`'s (B, classes) log-probabilities averaged, as probabilities, over each image
    and its four one-pixel shifts, in one pass of 5 B images; `background` (a normalised 0 pixel) shifts in."""

    def __init__(self, model, background=-MEAN / STD):
        super().__init__()
        self.model, self.background = model, background

    def forward(self, x):
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), value=self.background)
        views = torch.cat([padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dx, dy in SHIFTS])
        log_probs = self.model(views).float().unflatten(0, (len(SHIFTS), len(x)))  # also for an empty batch
        return torch.logsumexp(log_probs, 0) - math.log(len(SHIFTS))


class Predictions(NamedTuple):
    log_probs: torch.Tensor  # (N, 10) fp32, on the CPU
    labels: torch.Tensor  # (N,)
    images: torch.Tensor | None = None  # when kept


@torch.no_grad()  # not inference_mode: the returned images stay usable with autograd
def predict_loader(model, loader, device, amp_dtype=None, *, keep_images=False, progress=False):
    """Model outputs and labels for every batch of `loader` (and the images if asked), as Predictions."""
    device = as_device(device)
    model.eval()
    batches = []
    for data, target in tqdm(loader, disable=not progress, desc="Test", dynamic_ncols=True, leave=False):
        data = data.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            batches.append((model(data).float().cpu(), target.cpu(), data.cpu() if keep_images else None))
    if not batches:
        raise ValueError("the loader gave no batches: nothing to evaluate")
    log_probs, labels, images = zip(*batches)
    return Predictions(torch.cat(log_probs), torch.cat(labels), torch.cat(images) if keep_images else None)


def confusion_matrix(predictions):
    """10x10 counts from a `predict_loader` result: row = true digit, column = predicted digit."""
    return torch.bincount(predictions.labels * 10 + predictions.log_probs.argmax(1), minlength=100).reshape(10, 10)


def misclassified(predictions, k=16):
    """The k most confident mistakes (dicts of image, true, predicted, probability) of a result with its images."""
    Field(int, 0).check("k", k)  # a negative slice would silently drop the last mistakes instead
    if predictions.images is None:
        raise ValueError("misclassified needs the images: use predict_loader(..., keep_images=True)")
    probs, preds = predictions.log_probs.exp().max(1)
    wrong = (preds != predictions.labels).nonzero().squeeze(1)
    worst = wrong[probs[wrong].argsort(descending=True)][:k]
    return [dict(image=predictions.images[i], true=int(predictions.labels[i]), predicted=int(preds[i]),
                 probability=float(probs[i])) for i in worst.tolist()]
