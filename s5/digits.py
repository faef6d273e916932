"""Your own digits: image files turned into 28x28 inputs the way MNIST was made, then classified.

One preprocessing serves the command line, the notebook and anything else that shows the Net a new image. Every
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
from s5.errors import UserError

MAX_IMAGE_PIXELS = 25_000_000  # a 5000x5000 photo; larger files are refused before decoding


class ImageInputError(UserError, ValueError):
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


def checked_image(image):
    """A PIL image checked before decoding (pixel count, animation) and decoded, turned upright (EXIF)."""
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageInputError(f"{image.width}x{image.height} pixels is over the "
                              f"{MAX_IMAGE_PIXELS:,}-pixel limit: scale it down first")
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ImageInputError(f"an animated image ({frames} frames): save the frame you mean as a still image")
    image.load()
    return as_upright(image)  # a decoded copy, usable after the file is closed


def open_image(path, max_bytes=None):
    """Open and decode an image file, checked: ImageInputError says what is wrong with it."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageInputError("it is a folder")
        size = path.stat().st_size
        if size == 0:
            raise ImageInputError("the file is empty")
        if max_bytes is not None and size > max_bytes:
            raise ImageInputError(f"{size:,} bytes is over the {max_bytes:,}-byte limit: send a smaller file")
        with Image.open(path) as image:
            return checked_image(image)
    except ImageInputError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageInputError("not an image PIL can read (PNG, JPEG, BMP, GIF, WebP, TIFF, ... expected)") from None
    except OSError as e:
        raise ImageInputError(f"cannot read it ({e.strerror or e})") from None
    except Exception as e:  # crafted files raise ValueError, SyntaxError, struct.error, ... from PIL's decoders
        raise ImageInputError(f"cannot read it ({type(e).__name__}: {str(e).strip()[:120]})") from None


def image_from_array(array):
    """A numpy array or torch tensor of one image as a PIL image: (H, W), (H, W, C) or, as torch lays images out,
    (C, H, W) and (1, C, H, W), with C 1, 3 or 4. One channel is scaled as a deep image file is: 0-1, 0-255 or
    0-65535 by its range, anything else (a normalised MNIST tensor) from its own minimum to maximum."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    shape = array.shape
    if array.ndim == 4 and shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first, as torch has them
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or 0 in array.shape:
        raise ImageInputError(f"an array of shape {tuple(shape)} is not one image: give (H, W), (H, W, C) or "
                              "(C, H, W) with C 1, 3 or 4; for a batch, a list of its images")
    if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageInputError(f"{array.shape[1]}x{array.shape[0]} pixels is over the "
                              f"{MAX_IMAGE_PIXELS:,}-pixel limit: scale it down first")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImageInputError(f"an array of {array.dtype} is not pixel values: give numbers")
    if array.ndim == 2:  # one channel: mode F keeps the values, gray_and_alpha scales them by their range
        return Image.fromarray(array.astype(np.float32))  # mode F
    if array.dtype != np.uint8:
        high = np.nanmax(array) if np.isfinite(array).any() else 0
        array = np.nan_to_num(array.astype(np.float64) * (255.0 if high <= 1 else 1.0))
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)  # RGB or RGBA


def load_digit(source):
    """An image file (path), a PIL image, a numpy array or a torch tensor as a preprocessed digit tensor;
    ImageInputError says what is wrong."""
    try:
        if isinstance(source, Image.Image):
            image = checked_image(source)
        elif isinstance(source, (np.ndarray, torch.Tensor)):
            image = image_from_array(source)
        else:
            image = open_image(source)
        return preprocess_digit(image)
    except ImageInputError:
        raise
    except Exception as e:  # an odd mode or a degenerate image that the steps above do not foresee
        raise ImageInputError(f"cannot preprocess it ({type(e).__name__}: {str(e).strip()[:120]})") from None


IN_MEMORY = (Image.Image, np.ndarray, torch.Tensor)


def _is_one_input(inputs):
    return isinstance(inputs, (str, os.PathLike, *IN_MEMORY))


def _walk_folder(folder, suffixes):
    """(path, None) for every image file below `folder`, sorted, and (folder, why) for each that cannot be read.

    Symbolic links to folders are followed, each real folder once, so a link to a parent cannot loop.
    """
    found, unreadable, seen = [], [], set()

    def report(error):
        unreadable.append((Path(error.filename or folder), f"cannot read this folder ({error.strerror or error})"))

    for parent, dirs, files in os.walk(folder, onerror=report, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # reached again through a link
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return [(p, None) for p in sorted(found)] + unreadable


def iter_inputs(inputs):
    """(name, source, error) for each input, in order: files as given; folders as every image file below them (any
    suffix PIL opens, sorted; hidden files and folders, names starting with ".", skipped; each folder that
    cannot be read reported); PIL images, numpy arrays and torch tensors named "<image K>" by their place."""
    if _is_one_input(inputs):
        inputs = [inputs]
    suffixes = image_suffixes()
    for k, item in enumerate(inputs):
        if isinstance(item, IN_MEMORY):
            yield f"<image {k}>", item, None
        elif not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"input {k} is a {type(item).__name__}: give image file paths, folders, PIL images, "
                            "numpy arrays or torch tensors")
        elif not os.fspath(item):
            yield "", None, "the path is empty: give a file or a folder (. for the current one)"
        elif Path(item).is_dir():
            for path, error in _walk_folder(Path(item), suffixes):
                yield str(path), path, error
        else:
            yield str(Path(item)), Path(item), None


def expand_image_paths(paths):
    """Files as given; folders as every image file below them (any suffix PIL opens), sorted.

    Hidden files and folders (names starting with ".", such as macOS's ._x.png) are skipped inside folders.
    """
    return [source for _, source, error in iter_inputs(paths) if error is None]


@torch.inference_mode()
def iter_predictions(model, inputs, device=None):
    """predict_digits one input at a time: each result as soon as it is made."""
    if isinstance(model, torch.nn.Module):
        device = as_device(device) if device is not None else next(model.parameters()).device
        model.eval()
    else:  # the Net exported and run by onnxruntime (s5.export.OnnxNet): it takes CPU tensors
        device = torch.device("cpu")
    for name, source, error in iter_inputs(inputs):
        result = dict(path=name, digit=None, probability=None, runner_up=None,
                      runner_up_probability=None, input=None, error=error)
        if error is None:
            try:
                x = load_digit(source)
            except ImageInputError as e:
                result["error"] = str(e)
            else:
                probs = model(x.unsqueeze(0).to(device)).float().exp().squeeze(0).cpu()
                if not probs.isfinite().all():
                    result["error"] = ("the model gave NaN or infinite scores: its weights are broken; "
                                       "use another checkpoint")
                else:
                    top = probs.topk(2)
                    result.update(digit=int(top.indices[0]), probability=float(top.values[0]),
                                  runner_up=int(top.indices[1]), runner_up_probability=float(top.values[1]),
                                  input=x)
        yield result


def predict_digits(model, inputs, device=None):
    """Classify digit images: a path, a folder, a PIL image, a numpy array, a torch tensor, or a list mixing them.
    `model` is the Net, or anything called like it (s5.export.OnnxNet: the exported Net run by onnxruntime).
    One result dict per image, in order: path (in-memory images: "<image K>", K their place in the list), digit,
    probability, runner_up, runner_up_probability, input (the 28x28 tensor the model saw) and error (None, or
    why the image could not be classified)."""
    return list(iter_predictions(model, inputs, device))
