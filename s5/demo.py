"""The draw-a-digit demo: a sketchpad, the Net's prediction, its ten probabilities, and the 28x28 image it saw.

The drawing goes through `digits.preprocess_digit`, the same preprocessing as predict.py, so what the page
shows is what the command line would answer for the same picture. Gradio is imported here only, so the core
install does not need it (`make demo` installs requirements-demo.txt).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from s5.data import MEAN, STD
from s5.digits import ImageInputError, preprocess_digit

CANVAS = (280, 280)  # ten canvas pixels a MNIST pixel


def newest_checkpoint(runs="runs"):
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


def build_app(model, title="S5: draw a digit"):
    """The Gradio Blocks app around `model` (a trained Net); `.launch()` serves it, inline in a notebook."""
    import gradio as gr

    def predict(value):
        return classify(model, drawing_as_image(value))

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nPick the pen (left of the canvas), draw one digit, large, with the mouse or a "
                    "finger, and press **Predict**. The bin icon clears the canvas.")
        with gr.Row():
            with gr.Column():
                pad = gr.Sketchpad(label="your digit", type="pil", image_mode="RGBA", canvas_size=CANVAS,
                                   brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                                   elem_id="sketchpad", layers=False)
                button = gr.Button("Predict", variant="primary", elem_id="predict")
            with gr.Column():
                note = gr.Markdown("Draw a digit.", elem_id="note")
                label = gr.Label(num_top_classes=10, label="probabilities", elem_id="probabilities")
                seen = gr.Image(label="what the Net saw (28x28, after MNIST-style preprocessing)", type="pil",
                                elem_id="seen", interactive=False, height=220)
        button.click(predict, pad, [label, seen, note])
        pad.change(predict, pad, [label, seen, note])
    return app
