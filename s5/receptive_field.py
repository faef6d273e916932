"""How far each layer of a network sees, derived from the conv/pool calls (functional ones too) of a forward pass."""

import logging

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)
_SPATIAL_OPS = {F.conv2d: "conv", F.max_pool2d: "max-pool", F.avg_pool2d: "avg-pool"}


class _SpatialOpRecorder(TorchFunctionMode):
    """Appends each conv/pool call of a forward pass to `ops`: its layer (a Conv2d's name in `names`, by its weight),
    kernel, stride, padding, dilation and output shape."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SPATIAL_OPS:
            conv, side = func is F.conv2d, lambda v: v[0] if isinstance(v, (tuple, list)) else v  # square sizes
            names = ("input", "weight", "bias") if conv else ("input", "kernel_size")
            p = dict(zip((*names, "stride", "padding", "dilation"), args), **(kwargs or {}))
            kernel = side(p["weight"].shape[-1] if conv else p["kernel_size"])
            self.ops.append(dict(layer=self.names.get(id(p.get("weight")), _SPATIAL_OPS[func]), kernel=kernel,
                                 stride=side(p.get("stride") or (1 if conv else kernel)),
                                 padding=side(p.get("padding", 0)), dilation=side(p.get("dilation", 1)),
                                 out=tuple(out.shape[1:])))
        return out


def receptive_field(model, input_shape=(1, 28, 28), verbose=True):
    """Output size, jump and receptive field after each conv/pool, from a forward pass of one zero image on the
    model's device (nothing hard-coded): a list of row dicts, also logged as a table when verbose. For Net: RF 3,
    5, 6, 10, 14, 16."""
    recorder = _SpatialOpRecorder()
    recorder.ops = []
    recorder.names = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    rows, jump, rf = [], 1, 1
    for op in recorder.ops:
        rf += (op["kernel"] - 1) * op["dilation"] * jump
        jump *= op["stride"]
        rows.append(dict(op, jump=jump, rf=rf))
    header = dict(layer="layer", kernel="kernel", stride="stride", out="output", jump="jump", rf="RF")
    for r in [header, *(dict(r, out=" x ".join(map(str, r["out"]))) for r in rows)] if verbose else []:
        log.info(f"{r['layer']:<10}{r['kernel']:>7}{r['stride']:>7}  {r['out']:<14}{r['jump']:>5}{r['rf']:>5}")
    return rows
