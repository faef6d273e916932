"""The Net outside PyTorch: a checkpoint's weights exported as one ONNX file, checked, and run by onnxruntime.
Input `image`: float32 (N, 1, 28, 28), any N, normalised as in training; output `log_probs`: float32 (N, 10), as
Net.forward. Exported with dynamo=True (TorchScript's exporter is deprecated since PyTorch 2.9) by packages imported
when used: requirements-export.txt, not the core install, holds onnx, onnxscript and onnxruntime."""

import copy
import importlib
from pathlib import Path

import torch

from model import INPUT_SHAPE
from s5.errors import EXIT_FAILED, UserError, first_line
from s5.files import atomic_write

OPSET = 18  # torchlib's own (no conversion), run by onnxruntime since 1.14; the Net needs nothing newer
INPUT_NAME, OUTPUT_NAME = "image", "log_probs"
REQUIREMENTS = "requirements-export.txt"
# onnxruntime and PyTorch add fp32 products in other orders: on the 10,000 test images their log-probabilities differ
# by under 1e-5 (tests/test_export.py); 1e-4 leaves room for other CPUs, far below what could change a printed 0.1%.
TOLERANCE = 1e-4
MAX_ONNX_BYTES = 64 * 2**20  # an exported Net is 2.4 MB; a larger file is not one, and is refused before reading
CHECK_BATCH = 16  # inputs the export is run on, against PyTorch, before it is written


class ExportError(UserError, RuntimeError):
    """The exporter failed, or what it made does not check or does not compute what the Net computes."""
    exit_code = EXIT_FAILED


class OnnxModelError(UserError, ValueError):
    """A file is not an ONNX model of the Net (missing, too big, not ONNX, other inputs or outputs, fails when run)."""


def require(name):
    """Import a package of requirements-export.txt, or raise a UserError naming it and the file."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{name} is not installed: pip install -r {REQUIREMENTS} (make export does it)") from None


def export_onnx(model, path):
    """Write the Net `model` (left as it is) at `path` as ONNX, atomically, once onnx.checker passes and onnxruntime
    agrees with PyTorch within TOLERANCE (else ExportError); returns its size. OutputError if it cannot be written."""
    onnx = require("onnx")
    require("onnxscript")  # the exporter imports it itself, with a message about the exporter, not this repo
    net = copy.deepcopy(model).cpu().float().eval()
    try:  # an example batch of 2, not 1: the exporter specialises a batch of 1 to a constant
        proto = torch.onnx.export(net, (torch.zeros(2, *INPUT_SHAPE),), dynamo=True, opset_version=OPSET,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False).model_proto
        onnx.checker.check_model(proto, full_check=True)
        data = proto.SerializeToString()
    except Exception as e:  # the exporter and the checker raise many types
        raise ExportError(f"the ONNX export failed ({type(e).__name__}: {first_line(e)})") from e
    images = torch.randn(CHECK_BATCH, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = torch.from_numpy(session_of(data).run(None, {INPUT_NAME: images.numpy()})[0])
        worst = float((net(images) - got).abs().max())
    if not worst <= TOLERANCE:
        raise ExportError(f"the exported model's log-probabilities differ from PyTorch's by up to {worst:.3g} "
                          f"(more than {TOLERANCE:g}): it does not compute what the Net computes")
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def session_of(data):
    """An onnxruntime session (CPU) over a serialised ONNX model, silent: its failures are raised, and said once."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: its warnings and error lines would break the one-line contract
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class OnnxNet:
    """An exported Net run by onnxruntime, called like the Net on CPU tensors: (N, 1, 28, 28) normalised images in,
    (N, 10) log-probabilities out. OnnxModelError when `path` is not an ONNX model of the Net, at load or when run."""

    def __init__(self, path):
        self.path = path = Path(path)
        require("onnxruntime")
        if not path.is_file():
            raise OnnxModelError(f"no ONNX model at {path}: give a .onnx file that export.py wrote")
        if (size := path.stat().st_size) > MAX_ONNX_BYTES:
            raise OnnxModelError(f"refusing to load {path}: at {size:,} bytes it is larger than an ONNX model of "
                                 f"this repo's Net can be ({MAX_ONNX_BYTES:,} bytes at most)")
        try:  # as bytes, so a model that points at external weight files cannot make the runtime read them
            self.session = session_of(path.read_bytes())
        except OSError as e:
            raise OnnxModelError(f"cannot read {path} ({e.strerror or e})") from None
        except Exception as e:  # onnxruntime's Fail, InvalidGraph, InvalidProtobuf, ...: damaged or not ONNX
            raise OnnxModelError(f"{path} is not an ONNX model onnxruntime can load ({first_line(e, 160)}): "
                                 "give a .onnx file that export.py wrote") from None
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if not (len(ins) == len(outs) == 1 and ins[0].type == outs[0].type == "tensor(float)"
                and [list(a.shape[1:]) for a in (*ins, *outs)] == [list(INPUT_SHAPE), [10]]):  # any batch size
            got = ", ".join(f"{a.name} {a.type} {a.shape}" for a in (*ins, *outs))
            raise OnnxModelError(f"{path} is an ONNX model but not of this repo's Net (one float input of shape "
                                 f"(N, 1, 28, 28), one float output (N, 10) expected; it has {got})")

    def __call__(self, images):
        x = images.detach().cpu().float().numpy()
        try:  # a model can compute other shapes than it declares (from the data), which only a run shows
            y = self.session.run(None, {self.session.get_inputs()[0].name: x})[0]
        except Exception as e:  # onnxruntime's Fail, RuntimeException, ...
            raise OnnxModelError(f"{self.path} failed when run by onnxruntime ({first_line(e, 160)}): "
                                 "give a .onnx file that export.py wrote") from None
        if y.shape != (len(x), 10):
            raise OnnxModelError(f"{self.path} is not an ONNX model of this repo's Net: it gave shape {y.shape} for "
                                 f"{len(x)} images, not ({len(x)}, 10)")
        return torch.from_numpy(y)
