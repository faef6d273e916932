"""Export a trained checkpoint as an ONNX model, checked, that runs without PyTorch.

    python export.py runs/fast-.../best.pt                    # writes model.onnx
    python export.py runs/fast-.../best.pt --out mnist.onnx
    python predict.py --onnx model.onnx my_digits/            # classify with it (onnxruntime)

The model takes `image`, float32 (N, 1, 28, 28) normalised as in training, for any batch size N, and gives
`log_probs`, float32 (N, 10); ONNX opset 18 (s5/export.py says more). Needs requirements-export.txt (`make export`
installs it). Exit status: 0 written; 1 the export failed or the file could not be written (nothing is left
behind); 2 the checkpoint, a flag or a package is missing or unusable; 130 interrupted.
"""

import os
import sys
from pathlib import Path

from model import Net
from s5 import checkpoints, cli, export
from s5.files import OutputError


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", help="last.pt, best.pt or model.pt written by train.py")
    p.add_argument("--out", default="model.onnx", help="the ONNX file to write (replaced if it exists)")
    args = p.parse_args(argv)
    problem = out_problem(Path(args.out))
    if problem:
        p.error(f"argument --out: {problem}")

    model = Net()
    try:
        for name in ("onnx", "onnxscript", "onnxruntime"):  # all before any work
            export.require(name)
        checkpoints.load_checkpoint(args.checkpoint, model)
    except (checkpoints.CheckpointError, export.MissingPackageError) as e:
        cli.fail(e)
    try:
        size = export.export_onnx(model, args.out)
    except (export.ExportError, OutputError) as e:
        cli.fail(e, cli.EXIT_FAILED)
    except KeyboardInterrupt:
        cli.fail("interrupted: nothing was written", cli.EXIT_INTERRUPTED)
    print(f"wrote {args.out} ({size / 1e6:.1f} MB, opset {export.OPSET}): onnx.checker passes and onnxruntime "
          f"agrees with PyTorch within {export.TOLERANCE:g}; run it with python predict.py --onnx {args.out} PATH")
    return cli.EXIT_OK


def out_problem(out):
    """Why `out` cannot be written, found before any work (None: it can be tried)."""
    if not str(out).strip():
        return "an empty path: give a file name such as model.onnx"
    if out.is_dir():
        return f"{out} is a folder: give a file name in it, such as {out / 'model.onnx'}"
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # the folders that would be made
        folder = folder.parent
    if not folder.is_dir():
        return f"{out} cannot be written: {folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{out} cannot be written: {folder} is not writable"
    return None


if __name__ == "__main__":
    sys.exit(main())
