"""Classify your own digit images with a trained checkpoint.

    python predict.py runs/fast-.../best.pt my_digits/ seven.png
    python predict.py runs/fast-.../model.pt seven.png --json

Images may be in any format PIL reads (PNG, JPEG, BMP, GIF, WebP, TIFF, ...), any size, bit depth and colour
mode, dark ink on light paper or light on dark or drawn on a transparent canvas; they are turned upright (EXIF)
and preprocessed the way MNIST was made (s5/digits.py). Folders are searched recursively; hidden files are
skipped. One line per file; exit status 0 all classified, 1 some file could not be, 2 the checkpoint or a flag
is unusable.
"""

import json
import signal
import sys

from model import Net
from s5 import checkpoints, cli, device, digits


def shown(path):
    """A path printable on one line in any terminal encoding (odd names are shown quoted and escaped)."""
    return path if path.isprintable() else json.dumps(path)


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a job scheduler) and SIGHUP (a closed terminal) end it as Ctrl-C does


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", help="last.pt, best.pt or model.pt written by train.py")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of them")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if "" in args.paths:  # Path("") is the current folder: an empty shell variable would classify all below it
        p.error("argument PATH: an empty path; give a file or a folder (. for the current one)")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        return classify(args)
    except KeyboardInterrupt:
        sys.stdout.flush()
        cli.fail("interrupted: the lines above are the files classified so far", cli.EXIT_INTERRUPTED)


def classify(args):
    model = Net()
    try:
        dev = device.get_device(args.device)
        checkpoints.load_checkpoint(args.checkpoint, model)
    except (checkpoints.CheckpointError, ValueError) as e:
        cli.fail(e)
    seen = failed = 0
    for r in digits.iter_predictions(model.to(dev), args.paths):  # each line as soon as its file is done
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
