"""Your own digits: files, PIL images, arrays and tensors made into 28x28 inputs as MNIST was, then classified. What
makes one input unusable (empty, not an image, crafted, too big, animated, blank) is an ImageInputError for it alone.
"""

import io
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from s5.data import MEAN, STD
from s5.device import as_device
from s5.errors import UserError, first_line

MAX_IMAGE_PIXELS = 25_000_000  # a 5000x5000 photo; larger images are refused before decoding
IN_MEMORY = (Image.Image, np.ndarray, torch.Tensor)
NOT_FILES = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
             stat.S_IFCHR: "a device file", stat.S_IFBLK: "a device file"}
_PIL_LIMIT = threading.Lock()  # one open at a time under catch_warnings, whose filters are the whole process's


class ImageInputError(UserError, ValueError):
    """An image cannot be turned into a digit; the message says why."""


def gray_and_alpha(image):
    """The image as grey levels in [0, 1] (by its own bit depth) and its alpha in [0, 1], or None."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            raise ImageInputError("the image holds no valid pixel values")
        low, high = finite.min(), finite.max()
        scales = (1.0, 255.0, 65535.0) if image.mode == "F" else (65535.0,)  # as saved; else by its own range
        scale = next((s for s in scales if low >= 0 and high <= s), None)
        gray = values / scale if scale else (values - low) / max(high - low, 1e-12)
        return np.clip(np.nan_to_num(gray, nan=0.0).astype(np.float32), 0.0, 1.0), None
    if not image.has_transparency_data:
        return np.asarray(image.convert("L"), np.float32) / 255, None
    rgba = image.convert("RGBA")
    return np.asarray(rgba.convert("L"), np.float32) / 255, np.asarray(rgba.getchannel("A"), np.float32) / 255


def preprocess_digit(image):
    """A PIL image of one digit -> normalised (1, 28, 28) tensor, made as MNIST was: upright (EXIF), the ink (light on
    black) cropped, fitted into 20x20 and pasted into 28x28 with its centre of mass at the centre."""
    gray, alpha = gray_and_alpha(ImageOps.exif_transpose(image))
    border = lambda a: np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # noqa: E731
    if alpha is not None and np.median(border(alpha)) < 0.5:
        ink = alpha  # drawn on a transparent canvas: what is opaque is the digit, whatever its colour
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
    size = [max(1, round(n * 20.0 / max(ink.shape))) for n in ink.shape[::-1]]
    digit = np.asarray(Image.fromarray(np.uint8(ink * 255)).resize(size, Image.Resampling.LANCZOS), np.float32) / 255
    centre = [(i * digit).sum() / digit.sum() for i in np.indices(digit.shape)]
    top, left = (int(np.clip(round(14 - c), 0, 28 - n)) for c, n in zip(centre, digit.shape))
    canvas = np.pad(digit, ((top, 28 - top - digit.shape[0]), (left, 28 - left - digit.shape[1])))
    return (torch.from_numpy(canvas).unsqueeze(0) - MEAN) / STD


def check_pixels(w, h):
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageInputError(f"{w}x{h} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit: scale it down first")


def checked_image(image):
    """A PIL image checked before decoding (pixel count, animation), then decoded and turned upright (EXIF)."""
    check_pixels(image.width, image.height)
    if getattr(image, "n_frames", 1) > 1:
        raise ImageInputError(f"an animated image ({image.n_frames} frames): save the frame you mean as a still image")
    image.load()
    return ImageOps.exif_transpose(image)  # a decoded copy, usable after the file is closed


def open_image(source, max_bytes=None):
    """An image file (its path, or its bytes) opened, checked and decoded; ImageInputError says what is wrong."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            size, source = len(source), io.BytesIO(source)
        else:
            info = os.stat(source)  # what it is before it is opened: opening a FIFO would wait for a writer
            if not stat.S_ISREG(info.st_mode):
                kind = NOT_FILES.get(stat.S_IFMT(info.st_mode), "a special file")
                raise ImageInputError(f"it is {kind}, not an image file")
            size = info.st_size
        if size == 0:
            raise ImageInputError("the file is empty")
        if max_bytes is not None and size > max_bytes:
            raise ImageInputError(f"{size:,} bytes is over the {max_bytes:,}-byte limit: send a smaller file")
        with _PIL_LIMIT, warnings.catch_warnings():  # PIL's limit is higher than ours, which follows at once
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        with image:
            return checked_image(image)
    except ImageInputError:
        raise
    except Image.DecompressionBombError:  # over twice PIL's limit: raised by Image.open itself
        raise ImageInputError(f"the image is over the {MAX_IMAGE_PIXELS:,}-pixel limit: scale it down first") from None
    except Image.UnidentifiedImageError:
        raise ImageInputError("not an image PIL can read (PNG, JPEG, BMP, GIF, WebP, TIFF, ... expected)") from None
    except OSError as e:
        raise ImageInputError(f"cannot read it ({e.strerror or e})") from None
    except Exception as e:  # crafted files raise ValueError, SyntaxError, struct.error, ... from PIL's decoders
        raise ImageInputError(f"cannot read it ({type(e).__name__}: {first_line(e, 120)})") from None


def image_from_array(array):
    """One image as an array or tensor, (H, W), (H, W, C), (C, H, W) or (1, C, H, W) with C 1, 3 or 4, as a PIL image.
    One channel is kept as floats for gray_and_alpha to scale by their range (a normalised MNIST tensor too)."""
    array = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    shape = array.shape
    array = array[0] if array.ndim == 4 and shape[0] == 1 else array
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first, as torch has them
    array = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or 0 in array.shape:
        raise ImageInputError(f"an array of shape {tuple(shape)} is not one image: give (H, W), (H, W, C) or "
                              "(C, H, W) with C 1, 3 or 4; for a batch, a list of its images")
    check_pixels(array.shape[1], array.shape[0])
    if array.dtype.kind not in "buif":
        raise ImageInputError(f"an array of {array.dtype} is not pixel values: give numbers")
    if array.ndim == 2:
        return Image.fromarray(array.astype(np.float32))  # mode F
    if array.dtype != np.uint8:  # colours in 0-1 or 0-255
        array = np.nan_to_num(array.astype(np.float64))
        array = np.clip(array * (255.0 if array.max() <= 1 else 1.0), 0, 255)
    return Image.fromarray(array.astype(np.uint8))  # RGB or RGBA


def load_digit(source):
    """An image file (path), a PIL image, a numpy array or a torch tensor as a preprocessed digit tensor."""
    try:
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return preprocess_digit(image_from_array(source))
        return preprocess_digit(checked_image(source) if isinstance(source, Image.Image) else open_image(source))
    except ImageInputError:
        raise
    except Exception as e:  # an odd mode or a degenerate image that the steps above do not foresee
        raise ImageInputError(f"cannot preprocess it ({type(e).__name__}: {first_line(e, 120)})") from None


def iter_inputs(inputs):
    """(name, source, error) for each input, in order: files as given; folders as every image file below them (any
    suffix PIL opens, sorted, hidden names skipped, unreadable folders reported); in-memory images as "<image K>"."""
    suffixes = {suffix.lower() for suffix in Image.registered_extensions()}
    for k, item in enumerate([inputs] if isinstance(inputs, (str, os.PathLike, *IN_MEMORY)) else inputs):
        if isinstance(item, IN_MEMORY):
            yield f"<image {k}>", item, None
        elif not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"input {k} is a {type(item).__name__}: give image file paths, folders, PIL images, "
                            "numpy arrays or torch tensors")
        elif not os.fspath(item):
            yield "", None, "the path is empty: give a file or a folder (. for the current one)"
        elif not Path(item).is_dir():
            yield str(Path(item)), Path(item), None
        else:  # links followed, each real folder once, so a link to a parent cannot loop
            found, errors, seen = [], [], set()
            for parent, dirs, files in os.walk(item, onerror=errors.append, followlinks=True):
                real = os.path.realpath(parent)
                dirs[:] = [] if real in seen else [d for d in dirs if not d.startswith(".")]
                if real not in seen:
                    seen.add(real)
                    found += [Path(parent, f) for f in files if Path(f).suffix.lower() in suffixes and f[0] != "."]
            yield from ((str(path), path, None) for path in sorted(found))
            for e in errors:
                yield str(Path(e.filename or item)), None, f"cannot read this folder ({e.strerror or e})"


@torch.inference_mode()
def iter_predictions(model, inputs, device=None):
    """predict_digits one input at a time: each result as soon as it is made."""
    if isinstance(model, torch.nn.Module):
        device = as_device(device) if device is not None else next(model.parameters()).device
        model.eval()
    else:  # s5.export.OnnxNet takes CPU tensors
        device = torch.device("cpu")
    for name, source, error in iter_inputs(inputs):
        try:
            x = load_digit(source) if error is None else None
        except ImageInputError as e:
            x, error = None, str(e)
        probs = None if x is None else model(x.unsqueeze(0).to(device)).float().exp().squeeze(0).cpu()
        if probs is not None and not probs.isfinite().all():
            x, error = None, "the model gave NaN or infinite scores: its weights are broken; use another checkpoint"
        (p, q), (d, r) = [t.tolist() for t in probs.topk(2)] if x is not None else [(None, None)] * 2
        yield dict(path=name, digit=d, probability=p, runner_up=r, runner_up_probability=q, input=x, error=error)


def predict_digits(model, inputs, device=None):
    """Classify a path, a folder, a PIL image, an array, a tensor or a list of them with the Net (or s5.export.OnnxNet).
    One dict per image, in order: path ("<image K>" in memory), digit, probability, runner_up, runner_up_probability,
    input (the 28x28 tensor the model saw) and error (None, or why the image could not be classified)."""
    return list(iter_predictions(model, inputs, device))
