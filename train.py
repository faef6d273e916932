"""Train the S5 Net from the command line: what S5.ipynb does, headless, with checkpoints.

    python train.py                      # the original recipe: 20 epochs, batch 512, SGD 0.01, StepLR
    python train.py --recipe fast        # one-cycle AdamW, two epochs
    python train.py --resume runs/X/last.pt

Writes into --out (a new or empty folder): metrics.csv, steps.csv, accuracy_plots.png, training_curves.png,
last.pt (every epoch), best.pt, model.pt, confusion_matrix.png, misclassified.png, final.json (docs/checkpoints.md).
Exit status: 0 done, 1 diverged or could not write, 2 usage or data error, 130 interrupted.
"""

import s5.startup  # noqa: F401  # isort: skip  (first: a signal while torch imports is one line, exit 130)
import argparse
import os
import time
from pathlib import Path

import matplotlib
import torch

from model import Net
from s5 import callbacks, checkpoints, cli, config, distributed, loop, mnist
from s5.device import get_device
from s5.errors import UserError
from s5.run import Run

RUN_FIELDS = ("seed", "deterministic", "device", "data_dir", "out", "train_subset", "val_split", "loader", "workers",
              "amp", "channels_last", "progress", "tensorboard")


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    cli.add_flags(p, ["name"], {"name": "seed"})  # absent flags leave no value: the configuration's apply
    cli.add_flags(p.add_argument_group("the recipe's values (default: the recipe's)"), config.RECIPE_FIELDS)
    default = config.RunConfig(config.RECIPES["seed"]).to_dict()
    cli.add_flags(p, RUN_FIELDS, {k: v for k, v in default.items() if v not in (None, False)})
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (its last.pt)")
    return p


def configure(given, ctx):
    """The run's configuration and, for --resume, its checkpoint: checked, before anything is claimed."""
    if "resume" not in given:
        return config.RunConfig.build(given.pop("name", "seed"), **given), None
    resume = checkpoints.read_resumable(Path(given.pop("resume")).expanduser(), Net())
    run_config, changed = resume.config.resumed({"recipe" if k == "name" else k: v for k, v in given.items()},
                                                resume.epoch)
    if "data_dir" not in given and not os.path.isdir(mnist.raw_dir(run_config.data_dir)):  # never fetch there
        why = "holds no MNIST" if os.path.isdir(run_config.data_dir) else "is gone"
        raise UserError(f"the run's data folder {run_config.data_dir} {why}: give --data-dir where MNIST is now")
    if changed and ctx.is_main:
        print("changed for the resumed run: " + ", ".join(f"{cli.flag(k)} {old} -> {new}"
                                                          for k, (old, new) in changed.items()))
    return run_config, resume


def main(argv=None):
    started = time.perf_counter()
    matplotlib.use("Agg")  # headless: figures go to files (pyplot is first imported when the first one is drawn)
    given = vars(build_parser().parse_args(argv))  # only the flags written
    ctx = distributed.SINGLE
    try:
        with cli.stop_like_ctrl_c():
            ctx = distributed.context_from_env()  # under torchrun: this process's rank; rank 0 alone speaks
            cli.show_logs(ctx.is_main)
            run_config, resume = configure(given, ctx)
            if run_config.tensorboard:
                callbacks.check_installed()
            device = distributed.setup(ctx, get_device(run_config.device))
            with Run(run_config, device, ctx, resume, started) as run:
                try:
                    run.fit()
                except (KeyboardInterrupt, FloatingPointError, MemoryError, torch.OutOfMemoryError, UserError) as e:
                    if ctx.is_main and isinstance(e, KeyboardInterrupt):
                        print(flush=True)  # end the progress bar's line
                    cli.fail(*cli.stopped_message(e, run), speak=ctx.is_main)  # ended part-way: what was kept
    except UserError as e:
        cli.fail(cli.message(e), e.exit_code, speak=ctx.is_main)
    except KeyboardInterrupt:
        cli.fail("interrupted before the run started", cli.EXIT_INTERRUPTED, speak=ctx.is_main)
    finally:
        distributed.teardown()
    if ctx.is_main:
        best = max(run.history[loop.evaluated(run_config.evaluated_on)[2]])
        print(f"final test accuracy {run.test_acc:.2f}% ({'best validation' if run_config.val_split else 'best'} "
              f"{best:.2f}%), {run.history['elapsed_seconds'][-1]:.0f} s; outputs in {run.folder}/")


if __name__ == "__main__":
    main()
