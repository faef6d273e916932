"""The draw-a-digit demo: a sketchpad, the Net's prediction, its ten probabilities, and the 28x28 image it saw.

The drawing goes through `digits.preprocess_digit`, the same preprocessing as `predict_digits`, so what the page
shows is what the command line would answer for the same picture. Gradio is imported here only, so the core
install does not need it (`make demo` installs requirements-demo.txt).
"""

import io
import socket
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from s5.config import RUNS_DIR
from s5.data import MEAN, STD
from s5.errors import UserError
from s5.digits import ImageInputError, checked_image, open_image, preprocess_digit

CANVAS = (280, 280)  # ten canvas pixels a MNIST pixel
MAX_UPLOAD_BYTES = 5 * 2**20  # a drawing is under 100 KB; a 5000x5000 photo (the pixel limit for files) fits too
QUEUE_SIZE = 64  # requests waiting at once; more are turned away instead of piling up in memory
CACHE_SECONDS = 600  # uploads and shown images are deleted this long after they were made


class HostError(UserError, ValueError):
    """The address to serve on cannot be used; the message says why."""


def check_host(host):
    """The first address `host` resolves to, if it is one this machine can serve on; HostError otherwise."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise HostError(f"cannot resolve {host!r} ({getattr(e, 'strerror', None) or e}): give an address of this "
                        "machine, such as 127.0.0.1, or 0.0.0.0 for every interface") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((address[0], 0))  # any free port: this checks the address, the server checks its port
        except OSError as e:
            raise HostError(f"{host!r} ({address[0]}) is not an address of this machine ({e.strerror or e}): give "
                            "one of its addresses, such as 127.0.0.1, or 0.0.0.0 for every interface") from None
    return address[0]


def newest_checkpoint(runs=RUNS_DIR):
    """The newest runs/*/best.pt, or None."""
    found = sorted(Path(runs).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def drawing_as_image(value):
    """What the sketchpad sends (a dict with the composite, or a plain image) as a PIL image, or None if empty."""
    if isinstance(value, dict):
        value = value.get("composite")
    if value is None:
        return None
    return value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value))


@torch.inference_mode()
def classify(model, image):
    """({digit: probability} for all ten digits, the 28x28 input as an 8-bit image, a one-line note)."""
    if image is None:
        return {}, None, "Draw a digit."
    try:
        x = preprocess_digit(image)
    except ImageInputError as e:
        return {}, None, f"Nothing to classify: {e}."
    model.eval()
    device = next(model.parameters()).device
    probs = model(x.unsqueeze(0).to(device)).float().exp().squeeze(0).cpu()
    seen = ((x[0] * STD + MEAN).clamp(0, 1) * 255).to(torch.uint8).numpy()
    digit = int(probs.argmax())
    return ({str(d): float(p) for d, p in enumerate(probs)},
            Image.fromarray(seen).resize(CANVAS, Image.Resampling.NEAREST),
            f"The Net reads a {digit} ({float(probs[digit]):.1%}).")


def drawing_from_payload(component, payload):
    """The sketchpad's composite as a checked PIL image, or None: size and pixel count are checked before anything
    is decoded, as files are checked. ImageInputError says what is wrong."""
    if payload is None:
        return None
    if payload.id is not None:  # sent in pieces (the page's own upload path); only the composite is read
        blobs = component.blob_storage.pop(payload.id, None)
        composite = blobs.composite if blobs else None
    else:
        composite = payload.composite
    if composite is None:
        return None
    if isinstance(composite, (bytes, bytearray, memoryview)):
        if len(composite) > MAX_UPLOAD_BYTES:
            raise ImageInputError(f"{len(composite):,} bytes is over the {MAX_UPLOAD_BYTES:,}-byte limit")
        try:
            with Image.open(io.BytesIO(composite)) as image:
                return checked_image(image)
        except ImageInputError:
            raise
        except Exception as e:
            raise ImageInputError(f"cannot read it ({type(e).__name__})") from None
    if composite.path is None:
        return None
    return open_image(composite.path, max_bytes=MAX_UPLOAD_BYTES)


def with_unique_name(image):
    """The image with a per-request tag in its PNG text: Gradio caches an output image under the hash of its bytes
    and rewrites that file for every request, so identical answers to concurrent users shared one file that was
    truncated while it was being sent ("Too much data for declared Content-Length")."""
    if image is not None:
        image.info["request"] = uuid.uuid4().hex
    return image


def build_app(model, title="S5: draw a digit"):
    """The Gradio Blocks app around `model` (a trained Net); `.launch()` serves it, inline in a notebook.

    Bounded: a queue of QUEUE_SIZE, cached files deleted after CACHE_SECONDS, drawings over MAX_UPLOAD_BYTES or
    the pixel limit for files refused before they are decoded (pass max_file_size=MAX_UPLOAD_BYTES to launch too,
    so larger uploads are not even stored).
    """
    import gradio as gr

    def checked_drawing(payload):
        try:
            return drawing_from_payload(pad, payload)
        except ImageInputError as e:
            raise gr.Error(f"Nothing to classify: {e}.") from None

    def predict(image):
        probs, seen, note = classify(model, image)
        return probs, with_unique_name(seen), note

    with gr.Blocks(title=title, delete_cache=(60, CACHE_SECONDS)) as app:
        gr.Markdown(f"# {title}\nPick the pen (left of the canvas), draw one digit, large, with the mouse or a "
                    "finger, and press **Predict**. The bin icon clears the canvas.")
        with gr.Row():
            with gr.Column():
                pad = gr.Sketchpad(label="your digit", type="pil", image_mode="RGBA", canvas_size=CANVAS,
                                   brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                                   elem_id="sketchpad", layers=False)
                # Only the composite, checked before decoding: Gradio's own preprocess decodes every layer whatever
                # its size (a 150 KB PNG of 12000x12000 took 4.9 GB). Set on the instance, as a subclass of a
                # component makes Gradio write a .pyi stub beside this module.
                pad.preprocess = checked_drawing
                button = gr.Button("Predict", variant="primary", elem_id="predict")
            with gr.Column():
                note = gr.Markdown("Draw a digit.", elem_id="note")
                label = gr.Label(num_top_classes=10, label="probabilities", elem_id="probabilities")
                seen = gr.Image(label="what the Net saw (28x28, after MNIST-style preprocessing)", type="pil",
                                format="png", elem_id="seen", interactive=False, height=220)
        button.click(predict, pad, [label, seen, note], api_name="predict")
        pad.change(predict, pad, [label, seen, note])
    return app.queue(max_size=QUEUE_SIZE)
