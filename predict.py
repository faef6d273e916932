"""Classify your own digit images with a trained checkpoint.

    python predict.py runs/fast-.../best.pt my_digits/ seven.png
    python predict.py runs/fast-.../model.pt seven.png --json

Images may be PNG, JPEG or BMP of any size and colour mode, dark ink on light paper or light on dark;
they are preprocessed the way MNIST was made (see utils.preprocess_digit). One line per file; the exit
status is 1 when any file could not be classified, 2 when the checkpoint itself is unusable.
"""

import argparse
import json
import sys

import utils
from model import Net


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="last.pt, best.pt or model.pt written by train.py")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of them")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)

    model = Net()
    try:
        utils.load_checkpoint(args.checkpoint, model)
        model.to(utils.get_device(args.device))
    except (utils.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = utils.predict_digits(model, args.paths)
    if not results:
        print("error: no image files found in the given paths", file=sys.stderr)
        return 1
    for r in results:
        if args.json:
            print(json.dumps({k: v for k, v in r.items() if k != "input"}))
        elif r["error"]:
            print(f"{r['path']}: error: {r['error']}")
        else:
            print(f"{r['path']}: {r['digit']} ({r['probability']:.1%}), runner-up {r['runner_up']} "
                  f"({r['runner_up_probability']:.1%})")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
