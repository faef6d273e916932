"""Classify your own digit images with a trained checkpoint.

    python predict.py runs/fast-.../best.pt my_digits/ seven.png
    python predict.py runs/fast-.../model.pt seven.png --json
    python predict.py --onnx model.onnx my_digits/          # the exported model (export.py), onnxruntime alone

Images in any format PIL reads, any size, bit depth and colour mode, dark ink on light paper, light on dark or on a
transparent canvas, are turned upright (EXIF) and preprocessed as MNIST was (s5/digits.py); folders are searched
recursively, hidden files skipped. --onnx needs requirements-export.txt. One line per file; exit status 0 all
classified, 1 some file could not be, 2 the checkpoint, the ONNX model or a flag is unusable, 130 interrupted.
"""

import s5.startup  # noqa: F401  # isort: skip  (first: a signal while torch imports is one line, exit 130)
import json
import sys

from model import Net
from s5 import checkpoints, cli, device, digits, export
from s5.errors import UserError


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           usage="%(prog)s [-h] [--json] [--device DEVICE] CHECKPOINT PATH [PATH ...]\n"
                                 "       %(prog)s [-h] [--json] --onnx MODEL PATH [PATH ...]")
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT PATH", help="last.pt, best.pt or model.pt written by "
                   "train.py (not with --onnx), then image files or folders of them")
    p.add_argument("--onnx", metavar="MODEL", help="classify with this ONNX model (export.py's) on onnxruntime "
                                                  "instead of a checkpoint")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu; --onnx runs on the CPU)")
    args = p.parse_args(argv)
    onnx = args.onnx is not None
    checkpoint, paths = (None, args.inputs) if onnx else (args.inputs[0], args.inputs[1:])
    if not paths:
        p.error("the following arguments are required: PATH (after the checkpoint; or --onnx MODEL, then PATH)")
    if onnx and any(path.endswith(".pt") for path in paths):
        p.error("argument --onnx: give the ONNX model or a checkpoint, not both")
    if onnx and args.device != "cpu":
        p.error(f"argument --device: {args.device}: the ONNX model runs on onnxruntime's CPU; leave --device out")
    if "" in paths:  # Path("") is the current folder: an empty shell variable would classify all below it
        p.error("argument PATH: an empty path; give a file or a folder (. for the current one)")
    with cli.stop_like_ctrl_c():
        try:
            if onnx:
                return classify(export.OnnxNet(args.onnx), paths, args.json)
            model, dev = Net(), device.get_device(args.device)
            checkpoints.load_checkpoint(checkpoint, model)
            return classify(model.to(dev), paths, args.json)
        except UserError as e:
            cli.fail(cli.message(e), e.exit_code)
        except KeyboardInterrupt:
            sys.stdout.flush()
            cli.fail("interrupted: the lines above are the files classified so far", cli.EXIT_INTERRUPTED)


def classify(model, paths, as_json):
    """One line per image, printed as soon as it is done; the exit status."""
    seen = failed = 0
    for r in digits.iter_predictions(model, paths):
        seen, failed = seen + 1, failed + (r["error"] is not None)
        name = r["path"] if r["path"].isprintable() else json.dumps(r["path"])  # one line in any terminal encoding
        if as_json:
            print(json.dumps({k: v for k, v in r.items() if k != "input"}, allow_nan=False), flush=True)
        elif r["error"]:
            print(f"{name}: error: {r['error']}", flush=True)
        else:
            print(f"{name}: {r['digit']} ({r['probability']:.1%}), runner-up {r['runner_up']} "
                  f"({r['runner_up_probability']:.1%})", flush=True)
    if not seen:
        cli.fail("no image files found in the given paths", cli.EXIT_FAILED)
    return cli.EXIT_FAILED if failed else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
