"""The Net outside PyTorch: a checkpoint's weights exported as an ONNX model, checked, and run by onnxruntime.

The model's input, `image`, is float32 of shape (N, 1, 28, 28) with N free (any batch size): digits normalised as
in training, (pixel / 255 - MEAN) / STD with s5.data's MEAN and STD, which is what s5.digits.preprocess_digit
gives for an image file. Its output, `log_probs`, is float32 (N, 10): the log-probabilities of the digits 0-9, as
Net.forward returns them. ONNX opset OPSET (see below), weights inside the one file.

The exporter is torch.onnx.export's default, torch.export-based one (dynamo=True): the TorchScript exporter is
deprecated since PyTorch 2.9 and warns on every use. It needs onnxscript, and onnx to check the result;
onnxruntime runs it. None of them is in the core install: requirements-export.txt holds them (`make export`), and
each is imported only when used, so a missing one is a MissingPackageError naming that file.
"""

import copy
import importlib
from pathlib import Path

import torch

from model import INPUT_SHAPE
from s5.errors import EXIT_FAILED, UserError
from s5.files import atomic_write

# 18 is the opset torchlib (the dynamo exporter's operator library) is written in: no version conversion, and
# onnxruntime has run it since 1.14 (2023). Net needs nothing newer (Conv, MaxPool, Relu, Gemm, LogSoftmax).
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "log_probs"
REQUIREMENTS = "requirements-export.txt"
# onnxruntime and PyTorch sum the same fp32 products in different orders (other kernels, other blocking). The
# largest |difference| of log-probabilities measured on the 10,000 MNIST test images is below 1e-5 (tests/
# test_export.py prints it); 1e-4 leaves room for other CPUs' kernels and is still a thousand times smaller than
# the gap between the two likeliest digits that a 0.1% probability difference would need.
TOLERANCE = 1e-4
MAX_ONNX_BYTES = 64 * 2**20  # an exported Net is 2.4 MB; a larger file is not one, and is refused before reading
CHECK_BATCH = 16  # inputs the exported model is run on, against PyTorch, before it is written


class MissingPackageError(UserError, ImportError):
    """A package of requirements-export.txt is not installed; the message names it and the file."""


class ExportError(UserError, RuntimeError):
    """The exporter failed, or what it made does not check or does not compute what the Net computes."""

    exit_code = EXIT_FAILED


class OnnxModelError(UserError, ValueError):
    """A file is not an ONNX model of the Net (missing, too big, not ONNX, other inputs or outputs)."""


def require(name):
    """Import an optional package of requirements-export.txt, or raise MissingPackageError naming it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingPackageError(f"{name} is not installed: pip install -r {REQUIREMENTS} "
                                  "(make export does it)") from None


def onnx_bytes(model):
    """The Net `model` (left as it is) as a checked ONNX model, serialised; ExportError if that fails.

    The model is exported on the CPU in eval mode with a free batch dimension, checked with onnx.checker
    (full_check: types and shapes inferred), then run by onnxruntime on CHECK_BATCH inputs: each log-probability
    must be within TOLERANCE of PyTorch's.
    """
    onnx = require("onnx")
    require("onnxscript")  # the exporter imports it itself, with a message about the exporter, not this repo
    net = copy.deepcopy(model).cpu().float().eval()
    example = torch.zeros(2, *INPUT_SHAPE)  # 2, not 1: the exporter specialises a batch of 1 to a constant
    try:
        program = torch.onnx.export(
            net, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False, verbose=False)
        proto = program.model_proto
        onnx.checker.check_model(proto, full_check=True)
        data = proto.SerializeToString()
    except Exception as e:  # the exporter and the checker raise many types
        raise ExportError(f"the ONNX export failed ({type(e).__name__}: {_first_line(e)})") from e
    worst = max_difference(net, session_of(data), torch.randn(CHECK_BATCH, *INPUT_SHAPE,
                                                              generator=torch.Generator().manual_seed(0)))
    if not worst <= TOLERANCE:
        raise ExportError(f"the exported model's log-probabilities differ from PyTorch's by up to {worst:.3g} "
                          f"(more than {TOLERANCE:g}): it does not compute what the Net computes")
    return data


def export_onnx(model, path):
    """Write `model` (a Net) as an ONNX model at `path`, atomically: the file is there whole or not at all.

    ExportError if the export fails; OutputError (s5.files) if the file cannot be written. Returns the bytes written.
    """
    data = onnx_bytes(model)
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def session_of(data):
    """An onnxruntime session (CPU) over a serialised ONNX model, quiet on stderr but for errors."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would break the one-line error contract
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_session(session, images):
    """(N, 10) log-probabilities, a float32 torch tensor, for a (N, 1, 28, 28) tensor of normalised images."""
    x = images.detach().cpu().float().numpy()
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x})[0])


@torch.inference_mode()
def max_difference(model, session, images):
    """The largest |PyTorch - onnxruntime| log-probability of `model` and its export over `images`."""
    return float((model.cpu().eval()(images.cpu()) - run_session(session, images)).abs().max())


class OnnxNet:
    """An exported Net run by onnxruntime, called like the Net: a (N, 1, 28, 28) tensor of normalised images in,
    (N, 10) log-probabilities out (CPU tensors). OnnxModelError when `path` is not an ONNX model of the Net."""

    def __init__(self, path):
        path = Path(path)
        require("onnxruntime")
        if not path.is_file():
            raise OnnxModelError(f"no ONNX model at {path}: give a .onnx file that export.py wrote")
        size = path.stat().st_size
        if size > MAX_ONNX_BYTES:
            raise OnnxModelError(f"refusing to load {path}: at {size:,} bytes it is larger than an ONNX model of "
                                 f"this repo's Net can be ({MAX_ONNX_BYTES:,} bytes at most)")
        try:
            # Read as bytes, so a model that points at external weight files cannot make the runtime read them.
            self.session = session_of(path.read_bytes())
        except OSError as e:
            raise OnnxModelError(f"cannot read {path} ({e.strerror or e})") from None
        except Exception as e:  # onnxruntime's Fail, InvalidGraph, InvalidProtobuf, ...: damaged or not ONNX
            raise OnnxModelError(f"{path} is not an ONNX model onnxruntime can load ({_first_line(e)[:160]}): "
                                 "give a .onnx file that export.py wrote") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if not (len(inputs) == 1 and len(outputs) == 1 and inputs[0].type == "tensor(float)"
                and _fits(inputs[0].shape, (None, *INPUT_SHAPE)) and _fits(outputs[0].shape, (None, 10))):
            got = ", ".join(f"{a.name} {a.type} {a.shape}" for a in (*inputs, *outputs))
            raise OnnxModelError(f"{path} is an ONNX model but not of this repo's Net (one float input of shape "
                                 f"(N, 1, 28, 28), one output (N, 10) expected; it has {got})")
        self.path = path

    def __call__(self, images):
        return run_session(self.session, images)


def _fits(shape, expected):
    """Whether an onnxruntime shape (ints, or names/None for free dimensions) can be `expected` (None: any)."""
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

