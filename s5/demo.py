"""The draw-a-digit demo: a sketchpad, the Net's prediction, its ten probabilities, and the 28x28 image it saw.
The drawing is preprocessed as predict.py's files are (s5.digits). Gradio is imported only in build_app, so the core
install does without it (requirements-demo.txt).
"""

import socket
import uuid
from pathlib import Path

import torch
from PIL import Image

from s5.config import RUNS_DIR
from s5.data import MEAN, STD
from s5.digits import ImageInputError, open_image, preprocess_digit
from s5.errors import UserError

CANVAS = (280, 280)  # ten canvas pixels a MNIST pixel
MAX_UPLOAD_BYTES = 5 * 2**20  # a drawing is under 100 KB; a 5000x5000 photo (the pixel limit for files) fits too
QUEUE_SIZE = 64  # requests waiting at once; more are turned away instead of piling up in memory
CACHE_SECONDS = 600  # uploads and shown images are deleted this long after they were made


class HostError(UserError, ValueError):
    """The address to serve on cannot be used; the message says why."""


def check_host(host):
    """The first address `host` resolves to, if this machine can serve on it; HostError otherwise."""
    try:
        family, _, _, _, (address, *_) = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise HostError(f"cannot resolve {host!r} ({getattr(e, 'strerror', None) or e}): give an address of this "
                        "machine, such as 127.0.0.1, or 0.0.0.0 for every interface") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))  # any free port: this checks the address, the server checks its port
        except OSError as e:
            raise HostError(f"{host!r} ({address}) is not an address of this machine ({e.strerror or e}): give "
                            "one of its addresses, such as 127.0.0.1, or 0.0.0.0 for every interface") from None
    return address


def newest_checkpoint(runs=RUNS_DIR):
    """The newest runs/*/best.pt, or None."""
    return max(Path(runs).glob("*/best.pt"), key=lambda p: p.stat().st_mtime, default=None)


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
    probs = model(x.unsqueeze(0).to(next(model.parameters()).device)).float().exp().squeeze(0).cpu()
    seen = Image.fromarray(((x[0] * STD + MEAN).clamp(0, 1) * 255).to(torch.uint8).numpy())
    seen = seen.resize(CANVAS, Image.Resampling.NEAREST)
    # A tag per answer: Gradio caches an output image under the hash of its bytes and rewrites that file for every
    # request, so identical answers to concurrent users shared one file, truncated while it was being sent.
    seen.info["request"] = uuid.uuid4().hex
    digit = int(probs.argmax())
    return {str(d): float(p) for d, p in enumerate(probs)}, seen, f"The Net reads a {digit} ({probs[digit]:.1%})."


def drawing_from_payload(component, payload):
    """The sketchpad's composite as a PIL image, or None, checked before decoding as files are (ImageInputError)."""
    if payload is None:
        return None
    if payload.id is not None:  # sent in pieces (the page's own upload path); only the composite is read
        blobs = component.blob_storage.pop(payload.id, None)
        composite = blobs.composite if blobs else None
    else:
        composite = payload.composite.path if payload.composite is not None else None
    return None if composite is None else open_image(composite, max_bytes=MAX_UPLOAD_BYTES)


def build_app(model, title="S5: draw a digit"):
    """The Gradio app around a trained Net; `.launch()` serves it (inline in a notebook). Bounded: QUEUE_SIZE requests,
    cached files kept CACHE_SECONDS, drawings over MAX_UPLOAD_BYTES or the pixel limit refused before decoding (give
    launch max_file_size=MAX_UPLOAD_BYTES too, so they are not even stored)."""
    import gradio as gr

    def checked_drawing(payload):
        try:
            return drawing_from_payload(pad, payload)
        except ImageInputError as e:
            raise gr.Error(f"Nothing to classify: {e}.") from None

    def predict(image):
        return classify(model, image)

    with gr.Blocks(title=title, delete_cache=(60, CACHE_SECONDS)) as app:
        gr.Markdown(f"# {title}\nPick the pen (left of the canvas), draw one digit, large, with the mouse or a "
                    "finger, and press **Predict**. The bin icon clears the canvas.")
        with gr.Row():
            with gr.Column():
                pad = gr.Sketchpad(label="your digit", type="pil", image_mode="RGBA", canvas_size=CANVAS,
                                   brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                                   elem_id="sketchpad", layers=False)
                # Only the composite, checked before decoding (Gradio's own decodes every layer: a 150 KB PNG of
                # 12000x12000 took 4.9 GB); on the instance, as a subclass makes Gradio write a .pyi stub beside us.
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
