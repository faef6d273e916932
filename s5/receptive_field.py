"""How far each layer of a network sees: output size, jump and receptive field, derived by running it.

A forward pass of one zero image is watched for conv2d/max_pool2d/avg_pool2d calls (functional ones
included), so nothing is hard-coded and any small CNN can be inspected.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SPATIAL_OPS = {F.conv2d: "conv", F.max_pool2d: "max-pool", F.avg_pool2d: "avg-pool"}


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) else v  # square kernels, strides, paddings


class _SpatialOpRecorder(TorchFunctionMode):
    """Records every conv/pool call of a forward pass with its kernel, stride, padding, dilation."""

    def __init__(self):
        super().__init__()
        self.ops, self.module = [], None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SPATIAL_OPS:
            if func is F.conv2d:
                names = ("input", "weight", "bias", "stride", "padding", "dilation")
                p = {**dict(zip(names, args)), **kwargs}
                kernel = p["weight"].shape[-1]
                stride, padding, dilation = (p.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
            else:
                names = ("input", "kernel_size", "stride", "padding", "dilation")
                p = {**dict(zip(names, args)), **kwargs}
                kernel = p["kernel_size"]
                stride = p.get("stride") or kernel
                padding, dilation = p.get("padding", 0), p.get("dilation", 1)
            self.ops.append(dict(layer=self.module if func is F.conv2d else _SPATIAL_OPS[func],
                                 kernel=_first(kernel), stride=_first(stride), padding=_first(padding),
                                 dilation=_first(dilation), out=tuple(out.shape[1:])))
        return out


def receptive_field(model, input_shape=(1, 28, 28), verbose=True):
    """Output size, jump and receptive field after each conv/pool, derived by running the model.

    Runs on the model's device. Returns a list of row dicts and, when verbose, prints them as a table.
    For Net: RF 3, 5, 6, 10, 14, 16.
    """
    recorder = _SpatialOpRecorder()
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: setattr(recorder, "module", name))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rows, jump, rf = [], 1, 1
    for op in recorder.ops:
        rf += (op["kernel"] - 1) * op["dilation"] * jump
        jump *= op["stride"]
        rows.append(dict(op, jump=jump, rf=rf))
    if verbose:
        print(f"{'layer':<10}{'kernel':>7}{'stride':>7}  {'output':<14}{'jump':>5}{'RF':>5}")
        for r in rows:
            out = " x ".join(map(str, r["out"]))
            print(f"{r['layer']:<10}{r['kernel']:>7}{r['stride']:>7}  {out:<14}{r['jump']:>5}{r['rf']:>5}")
    return rows
