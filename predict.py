"""Classify your own digit images with a trained checkpoint.

    python predict.py runs/fast-.../best.pt my_digits/ seven.png
    python predict.py runs/fast-.../model.pt seven.png --json
    python predict.py --onnx model.onnx my_digits/          # the exported model (export.py), onnxruntime alone

Images may be in any format PIL reads (PNG, JPEG, BMP, GIF, WebP, TIFF, ...), any size, bit depth and colour
mode, dark ink on light paper or light on dark or drawn on a transparent canvas; they are turned upright (EXIF)
and preprocessed the way MNIST was made (s5/digits.py). Folders are searched recursively; hidden files are
skipped. With --onnx the model exported by export.py classifies them, run by onnxruntime (requirements-export.txt)
after the same preprocessing, and no checkpoint is given. One line per file; exit status 0 all classified, 1 some
file could not be, 2 the checkpoint, the ONNX model or a flag is unusable.
"""

import json
import signal
import sys

from model import Net
from s5 import checkpoints, cli, device, digits, export


def shown(path):
    """A path printable on one line in any terminal encoding (odd names are shown quoted and escaped)."""
    return path if path.isprintable() else json.dumps(path)


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a job scheduler) and SIGHUP (a closed terminal) end it as Ctrl-C does


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                           usage="%(prog)s [-h] [--json] [--device DEVICE] CHECKPOINT PATH [PATH ...]\n"
                                 "       %(prog)s [-h] [--json] --onnx MODEL PATH [PATH ...]")
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT PATH",
                   help="last.pt, best.pt or model.pt written by train.py (not with --onnx), then image files or "
                        "folders of them")
    p.add_argument("--onnx", metavar="MODEL", help="classify with this ONNX model (export.py's) on onnxruntime "
                                                  "instead of a checkpoint")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (a checkpoint only: --onnx runs on the CPU)")
    args = p.parse_args(argv)
    if args.onnx is None:
        args.checkpoint, args.paths = args.inputs[0], args.inputs[1:]
        if not args.paths:
            p.error("the following arguments are required: PATH (after the checkpoint; or --onnx MODEL, then PATH)")
    else:
        args.checkpoint, args.paths = None, args.inputs
        if any(path.endswith(".pt") for path in args.paths):
            p.error("argument --onnx: give the ONNX model or a checkpoint, not both")
        if args.device != "cpu":
            p.error(f"argument --device: {args.device}: the ONNX model runs on onnxruntime's CPU; leave --device out")
    if "" in args.paths:  # Path("") is the current folder: an empty shell variable would classify all below it
        p.error("argument PATH: an empty path; give a file or a folder (. for the current one)")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        return classify(args)
    except KeyboardInterrupt:
        sys.stdout.flush()
        cli.fail("interrupted: the lines above are the files classified so far", cli.EXIT_INTERRUPTED)


def load_model(args):
    """The Net from the checkpoint on the device, or the ONNX model run by onnxruntime; one line if unusable."""
    if args.onnx is not None:
        try:
            return export.OnnxNet(args.onnx)
        except (export.OnnxModelError, export.MissingPackageError) as e:
            cli.fail(e)
    model = Net()
    try:
        dev = device.get_device(args.device)
        checkpoints.load_checkpoint(args.checkpoint, model)
    except (checkpoints.CheckpointError, ValueError) as e:
        cli.fail(e)
    return model.to(dev)


def classify(args):
    model = load_model(args)
    seen = failed = 0
    for r in digits.iter_predictions(model, args.paths):  # each line as soon as its file is done
        seen += 1
        failed += r["error"] is not None
        if args.json:
            print(json.dumps({k: v for k, v in r.items() if k != "input"}, allow_nan=False), flush=True)
        elif r["error"]:
            print(f"{shown(r['path'])}: error: {r['error']}", flush=True)
        else:
            print(f"{shown(r['path'])}: {r['digit']} ({r['probability']:.1%}), runner-up {r['runner_up']} "
                  f"({r['runner_up_probability']:.1%})", flush=True)
    if not seen:
        cli.fail("no image files found in the given paths", cli.EXIT_FAILED)
    return cli.EXIT_FAILED if failed else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
