"""Your own digits: image files turned into 28x28 inputs the way MNIST was made, then classified.

One preprocessing serves predict.py, the notebook and anything else that shows the Net a new image. Every
way a file can fail (empty, not an image, damaged, crafted, too big, animated, blank) is an ImageInputError
for that file alone; the other files are still classified.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from s5.data import MEAN, STD
from s5.device import as_device

MAX_IMAGE_PIXELS = 25_000_000  # a 5000x5000 photo; larger files are refused before decoding


class ImageInputError(ValueError):
    """An image file cannot be turned into a digit; the message says why."""


def image_suffixes():
    """Every file suffix PIL can open here (.png, .jpg, .gif, .webp, .tiff, .jfif, ...)."""
    return {suffix.lower() for suffix in Image.registered_extensions()}


def gray_and_alpha(image):
    """The image as grey levels in [0, 1] (by its own bit depth) and its alpha in [0, 1], or None."""
    alpha = None
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0
    elif image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            raise ImageInputError("the image holds no valid pixel values")
        low, high = float(finite.min()), float(finite.max())
        if image.mode == "F":  # floats: 0-1, 0-255 or 0-65535 as saved; anything else by its own range
            scale = next((s for s in (1.0, 255.0, 65535.0) if low >= 0 and high <= s), None)
            gray = values / scale if scale else (values - low) / max(high - low, 1e-12)
        else:
            gray = values / (65535.0 if low >= 0 and high <= 65535 else max(high, 1.0))
        gray = np.nan_to_num(gray, nan=0.0).astype(np.float32)
    else:
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return np.clip(gray, 0.0, 1.0), alpha


def as_upright(image):
    """The image turned the way its EXIF Orientation says (phones store photos sideways and say so)."""
    return ImageOps.exif_transpose(image)


def preprocess_digit(image):
    """A PIL image of one digit -> normalised (1, 28, 28) tensor, made the way MNIST was made.

    Turned upright (EXIF); grayscale by the image's own bit depth; on a transparent background the opaque
    strokes are the ink, whatever their colour; otherwise inverted when the background is light (MNIST is
    light ink on black); cropped to the ink's bounding box; fitted into 20x20 keeping the aspect ratio;
    pasted into 28x28 so that the centre of mass sits at the centre; normalised with the training mean and std.
    """
    gray, alpha = gray_and_alpha(as_upright(image))
    border = lambda a: np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # noqa: E731
    if alpha is not None and np.median(border(alpha)) < 0.5:
        ink = alpha  # drawn on a transparent canvas: what is opaque is the digit
    else:
        if alpha is not None:  # an opaque picture with an alpha channel: see it on white paper
            gray = gray * alpha + (1 - alpha)
        background = float(np.median(border(gray)))
        ink = np.clip(background - gray if background > 0.5 else gray - background, 0, None)
    if ink.max() < 0.15:
        raise ImageInputError("no ink found (the image is blank or has almost no contrast)")
    ink = ink / ink.max()
    rows, cols = np.nonzero(ink > 0.2)
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = ink.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    digit = np.asarray(Image.fromarray(np.uint8(ink * 255)).resize(size, Image.Resampling.LANCZOS),
                       dtype=np.float32) / 255.0
    digit = np.clip(digit, 0, 1)
    ys, xs = np.indices(digit.shape)
    total = digit.sum()
    cy, cx = (ys * digit).sum() / total, (xs * digit).sum() / total
    top = int(np.clip(round(14 - cy), 0, 28 - digit.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - digit.shape[1]))
    canvas = np.zeros((28, 28), dtype=np.float32)
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return (torch.from_numpy(canvas).unsqueeze(0) - MEAN) / STD


def open_image(path):
    """Open and decode an image file, checked: ImageInputError says what is wrong with it."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageInputError("it is a folder")
        if path.stat().st_size == 0:
            raise ImageInputError("the file is empty")
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageInputError(f"{image.width}x{image.height} pixels is over the "
                                      f"{MAX_IMAGE_PIXELS:,}-pixel limit: scale it down first")
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise ImageInputError(f"an animated image ({frames} frames): save the frame you mean as a "
                                      "still image")
            image.load()
            return as_upright(image)  # a decoded copy, usable after the file is closed
    except ImageInputError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageInputError("not an image PIL can read (PNG, JPEG, BMP, GIF, WebP, TIFF, ... expected)") from None
    except OSError as e:
        raise ImageInputError(f"cannot read it ({e.strerror or e})") from None
    except Exception as e:  # crafted files raise ValueError, SyntaxError, struct.error, ... from PIL's decoders
        raise ImageInputError(f"cannot read it ({type(e).__name__}: {str(e).strip()[:120]})") from None


def load_digit(path):
    """Open an image file as a preprocessed digit tensor; ImageInputError says what is wrong."""
    image = open_image(path)
    try:
        return preprocess_digit(image)
    except ImageInputError:
        raise
    except Exception as e:  # an odd mode or a degenerate image that the steps above do not foresee
        raise ImageInputError(f"cannot preprocess it ({type(e).__name__}: {str(e).strip()[:120]})") from None


def expand_image_paths(paths):
    """Files as given; folders as every image file below them (any suffix PIL opens), sorted.

    Hidden files and folders (names starting with ".", such as macOS's ._x.png) are skipped inside folders.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    suffixes = image_suffixes()
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            out.append(p)
            continue
        found = []
        for folder, dirs, files in os.walk(p):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(folder) / f for f in files
                      if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
        out += sorted(found)
    return out


@torch.inference_mode()
def predict_digits(model, paths, device=None):
    """Classify image files (a path, or a list of files and folders). One result dict per file, in order:
    path, digit, probability, runner_up, runner_up_probability, input (the 28x28 tensor the model saw)
    and error (None, or why the file could not be classified)."""
    device = as_device(device) if device is not None else next(model.parameters()).device
    model.eval()
    results = []
    for path in expand_image_paths(paths):
        result = dict(path=str(path), digit=None, probability=None, runner_up=None,
                      runner_up_probability=None, input=None, error=None)
        results.append(result)
        try:
            x = load_digit(path)
        except ImageInputError as e:
            result["error"] = str(e)
            continue
        probs = model(x.unsqueeze(0).to(device)).float().exp().squeeze(0).cpu()
        if not probs.isfinite().all():
            result["error"] = "the model gave NaN or infinite scores: its weights are broken; use another checkpoint"
            continue
        top = probs.topk(2)
        result.update(digit=int(top.indices[0]), probability=float(top.values[0]),
                      runner_up=int(top.indices[1]), runner_up_probability=float(top.values[1]), input=x)
    return results
