"""The draw-a-digit demo: a sketchpad, the Net's prediction, its ten probabilities, and the 28x28 image it saw; the
drawing is preprocessed as predict.py's files are (s5.digits). Gradio is imported only in build_app, so the core
install does without it (requirements-demo.txt)."""

import contextlib
import logging
import os
import uuid

import torch
from PIL import Image

from s5.data import MEAN, STD
from s5.digits import ImageInputError, open_image, preprocess_digit

CANVAS = (280, 280)  # ten canvas pixels a MNIST pixel
MAX_UPLOAD_BYTES = 5 * 2**20  # a drawing is under 100 KB; a 5000x5000 photo (the pixel limit for files) fits too
QUEUE_SIZE = 64  # requests waiting at once; more are turned away instead of piling up in memory
CACHE_SECONDS = 600  # uploads and shown images are deleted this long after they were made
MAX_KEPT_BYTES, MAX_KEPT_FILES = 100 * 2**20, 1000  # uploads kept at most, the oldest deleted first: 20 of the largest
log = logging.getLogger(__name__)


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
    seen = Image.fromarray(((x[0] * STD + MEAN).clamp(0, 1) * 255).byte().numpy()).resize(CANVAS, Image.NEAREST)
    # A tag per answer: Gradio caches an output image under the hash of its bytes and rewrites that file for every
    # request, so identical answers to concurrent users shared one file, truncated while it was being sent.
    seen.info["request"] = uuid.uuid4().hex
    digit = int(probs.argmax())
    return {str(d): float(p) for d, p in enumerate(probs)}, seen, f"The Net reads a {digit} ({probs[digit]:.1%})."


class KeptUploads(set):
    """Gradio's record of an app's uploads (Blocks.upload_file_set), which its upload route updates after each: then
    the newest MAX_KEPT_FILES, up to MAX_KEPT_BYTES in all, are kept, the others deleted with the folder of each."""

    def update(self, names):
        super().update(names)
        stats = {}
        for name in list(self):
            with contextlib.suppress(OSError):  # unless Gradio deleted it for its age meanwhile
                stats[name] = os.stat(name)
        size = 0
        for i, name in enumerate(sorted(stats, key=lambda n: stats[n].st_mtime, reverse=True)):  # newest first
            size += stats[name].st_size
            if size > MAX_KEPT_BYTES or i >= MAX_KEPT_FILES:
                with contextlib.suppress(OSError):
                    os.remove(name)
                    os.rmdir(os.path.dirname(name))  # unless other files are in it
                self.discard(name)


def build_app(model, title="S5: draw a digit"):
    """The Gradio app around a trained Net; `.launch()` serves it (inline in a notebook). Bounded: QUEUE_SIZE requests,
    uploads kept CACHE_SECONDS, MAX_KEPT_FILES or MAX_KEPT_BYTES, drawings over MAX_UPLOAD_BYTES or the pixel limit
    refused before decoding (give launch max_file_size=MAX_UPLOAD_BYTES too, so they are not even stored)."""
    import gradio as gr

    def checked_drawing(payload):
        if payload is not None and payload.id is not None:  # sent in pieces (the page's way), not as an upload
            payload = pad.blob_storage.pop(payload.id, None)
        composite = getattr(payload, "composite", None)
        composite = getattr(composite, "path", composite)  # an upload's path, or the bytes of a piece
        try:
            return None if composite is None else open_image(composite, max_bytes=MAX_UPLOAD_BYTES)
        except ImageInputError as e:  # one line in the server's log, not Gradio's traceback
            log.warning("a drawing was refused: %s", e)
            raise gr.Error(f"Nothing to classify: {e}.", print_exception=False) from None

    def predict(image):
        return classify(model, image)

    with gr.Blocks(title=title, delete_cache=(60, CACHE_SECONDS)) as app:
        app.upload_file_set = app.temp_file_sets[0] = KeptUploads()  # so far its only set of files
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
