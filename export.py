"""Export a trained checkpoint as an ONNX model, checked, that runs without PyTorch (s5/export.py says which).

    python export.py runs/fast-.../best.pt --out mnist.onnx   # default: model.onnx
    python predict.py --onnx mnist.onnx my_digits/            # classify with it (onnxruntime)

Needs requirements-export.txt (`make export`). Exit status: 0 written; 1 the export failed or the file could not be
written (nothing is left behind); 2 the checkpoint, a flag or a package is missing or unusable; 130 interrupted.
"""

import s5.startup  # noqa: F401  # isort: skip  (first: a signal while torch imports is one line, exit 130)
import os
import sys
from pathlib import Path

from model import Net
from s5 import checkpoints, cli, errors, export, files


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="last.pt, best.pt or model.pt written by train.py")
    p.add_argument("--out", default="model.onnx", help="the ONNX file to write (default: model.onnx; replaced)")
    args = p.parse_args(argv)
    out = Path(args.out)  # checked before any work; the folders that would be made stop at the first that exists:
    folder = next(f for f in (out.parent, *out.parent.parents) if f.exists() or f == f.parent)
    if not args.out.strip():
        p.error("argument --out: an empty path: give a file name such as model.onnx")
    if out.is_dir():
        p.error(f"argument --out: {out} is a folder: give a file name in it, such as {out / 'model.onnx'}")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        p.error(f"argument --out: {out} cannot be written: {folder} is not "
                f"{'writable' if folder.is_dir() else 'a folder'}")
    with cli.stop_like_ctrl_c():
        try:
            for name in ("onnx", "onnxscript", "onnxruntime"):  # all before any work
                export.require(name)
            checkpoints.load_checkpoint(args.checkpoint, model := Net())
            size = export.export_onnx(model, args.out)
        except errors.UserError as e:  # a file that cannot be written is a failed export (1), not a usage error
            cli.fail(e, cli.EXIT_FAILED if isinstance(e, files.OutputError) else e.exit_code)
        except KeyboardInterrupt:
            cli.fail("interrupted: nothing was written", cli.EXIT_INTERRUPTED)
    print(f"wrote {args.out} ({size / 1e6:.1f} MB, opset {export.OPSET}): onnx.checker passes and onnxruntime "
          f"agrees with PyTorch within {export.TOLERANCE:g}; run it with python predict.py --onnx {args.out} PATH")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
