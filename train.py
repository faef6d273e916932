"""Train the S5 Net from the command line: what S5.ipynb does, headless, with checkpoints.

    python train.py                      # the original recipe: 20 epochs, batch 512, SGD 0.01, StepLR
    python train.py --recipe fast        # one-cycle AdamW, two epochs
    python train.py --resume runs/X/last.pt

Writes into --out (a new or empty folder): metrics.csv, steps.csv, accuracy_plots.png, training_curves.png,
last.pt (every epoch), best.pt, model.pt, confusion_matrix.png, misclassified.png, final.json (docs/checkpoints.md).
Exit status: 0 done, 1 diverged or could not write, 2 usage or data error, 130 interrupted.
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt  # noqa: E402

plt.switch_backend("Agg")  # load it now: a Ctrl-C during its lazy first load became an ImportError traceback
from model import Net  # noqa: E402
from s5 import checkpoints, cli, config, device, distributed, files, mnist, run, tensorboard  # noqa: E402

DEFAULT = config.RunConfig(config.RECIPES["seed"])


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                           argument_default=argparse.SUPPRESS)  # absent flags leave no value: the config's apply
    p.add_argument("--recipe", choices=sorted(config.RECIPES), help="seed = the original notebook; fast = AdamW "
                   "one-cycle, 2 epochs; one-epoch = fast for 1 epoch at batch 64 on rotated, scaled, sheared, "
                   "shifted digits; best = fast for 20 epochs on those digits (default: seed)")
    p.add_argument("--epochs", type=cli.whole_number(1), help="epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=cli.whole_number(1, config.TRAIN_IMAGES), help="batch size (default: the "
                   "recipe's)")
    p.add_argument("--lr", type=cli.positive_number, help="learning rate; the peak for one-cycle (default: the "
                   "recipe's)")
    p.add_argument("--augment", choices=config.AUGMENTATIONS, help="training augmentation: classic = the "
                   "original's rotation and zoom; affine = rotation, scale, shear and shift; elastic = affine plus "
                   "Simard's elastic distortion (default: the recipe's)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help="evaluate each image with its four one-pixel "
                   "shifts, averaged (default: the recipe's)")
    p.add_argument("--seed", type=cli.whole_number(0, 2**32 - 1), help=f"seed for weights, shuffling and "
                   f"augmentation (default: {DEFAULT.seed})")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps, xpu, or auto: the machine's accelerator when there is "
                   "one, else the CPU (default: auto)")
    p.add_argument("--data-dir", help=f"MNIST root; files go in DIR/MNIST/raw (default: {DEFAULT.data_dir})")
    p.add_argument("--out", help="output folder, new or empty (default: a new runs/<recipe>-<date>-<time>); with "
                   "--resume, continue the run there instead of in its own folder")
    p.add_argument("--train-subset", type=cli.whole_number(1, config.TRAIN_IMAGES),
                   help="train on the first N training images (after --val-split)")
    p.add_argument("--val-split", type=cli.whole_number(0, config.TRAIN_IMAGES - 1),
                   help="hold out N training images, drawn by --seed, to evaluate every epoch (and choose best.pt) "
                   "on; the test set is then evaluated once, at the end (default: 0, the test set every epoch, as "
                   "the original)")
    p.add_argument("--loader", choices=config.LOADERS, help="fast = tensors on the device, batched augmentation; "
                   "classic = torchvision DataLoader (default: fast)")
    p.add_argument("--workers", type=cli.whole_number(0, 256), help=f"DataLoader workers, classic loader only "
                   f"(default: {DEFAULT.workers})")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16/fp16 mixed precision (default: on "
                   "for CPUs with native bf16 and GPUs before Ampere; newer GPUs train fp32 on TF32 tensor cores)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory layout for the model (default: on for CPUs and CUDA, measured faster "
                   "there; off on other accelerators)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="tqdm bars (default: on)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, help="also write TensorBoard logs into "
                   "the run's folder: make tensorboard shows runs/ (default: off)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (its last.pt)")
    return p


def main(argv=None):
    started = time.perf_counter()
    given = vars(build_parser().parse_args(argv))  # only the flags written
    resume_path = given.pop("resume", None)
    ctx = distributed.Context()
    try:
        ctx = distributed.context_from_env()  # under torchrun: this process's rank; rank 0 alone speaks
        resume = checkpoints.read_resumable(resume_path, Net()) if resume_path else None
        if resume:
            run_config, changed = resume.config.resumed(given, resume.epoch)
            if "data_dir" not in given and not Path(run_config.data_dir).is_dir():
                cli.fail(f"the run's data folder {run_config.data_dir} is gone: give --data-dir where MNIST is now")
            if changed and ctx.is_main:
                print("changed for the resumed run: " + ", ".join(f"{cli.flag(k)} {old} -> {new}"
                                                                  for k, (old, new) in changed.items()))
        else:
            run_config = config.RunConfig.build(**given)
        if run_config.tensorboard:
            tensorboard.check_installed()
        dev = distributed.setup(ctx, device.get_device(run_config.device))
    except config.ConfigError as e:
        cli.fail(cli.config_message(e), speak=ctx.is_main)
    except (checkpoints.CheckpointError, distributed.LaunchError, tensorboard.TensorBoardMissingError) as e:
        cli.fail(e, speak=ctx.is_main)
    except ValueError as e:  # the device
        cli.fail(f"argument --device: {e}", speak=ctx.is_main)
    try:
        with cli.stop_like_ctrl_c():
            result = run.run(run_config, dev, ctx=ctx, resume=resume, resume_path=resume_path, started=started)
    except run.RunStoppedError as e:
        if ctx.is_main and e.reason == "interrupted":
            print(flush=True)  # end the progress bar's line
        cli.fail(*cli.stopped_message(e, run_config.recipe.lr, run_config.device), speak=ctx.is_main)
    except files.OutputError as e:
        cli.fail(cli.output_error_message(e), speak=ctx.is_main)
    except config.ConfigError as e:
        cli.fail(cli.config_message(e), speak=ctx.is_main)
    except (mnist.MNISTDataError, ValueError) as e:
        cli.fail(e, speak=ctx.is_main)
    except KeyboardInterrupt:
        cli.fail("interrupted before the run started", cli.EXIT_INTERRUPTED, speak=ctx.is_main)
    finally:
        distributed.teardown()
    if ctx.is_main:
        history, evaluated = result.history, "val" if run_config.val_split else "test"
        print(f"final test accuracy {result.test_acc:.2f}% ({'best validation' if run_config.val_split else 'best'} "
              f"{max(history[evaluated + '_acc']):.2f}%), {history['elapsed_seconds'][-1]:.0f} s; outputs in "
              f"{result.folder}/")


if __name__ == "__main__":
    main()
