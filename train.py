"""Train the S5 Net from the command line: what S5.ipynb does, headless, with checkpoints.

    python train.py                      # the original recipe: 20 epochs, batch 512, SGD 0.01, StepLR
    python train.py --recipe fast        # one-cycle SGD, two epochs
    python train.py --resume runs/X/last.pt

Writes into --out (a new or empty folder): metrics.csv (one row per epoch), steps.csv (a row every 10 batches),
accuracy_plots.png (per epoch, as the original), training_curves.png (every 10 batches, with the learning rate),
last.pt (every epoch), best.pt (best test accuracy), model.pt (final weights), confusion_matrix.png,
misclassified.png.
Exit status: 0 done, 1 diverged or could not write, 2 usage or data error, 130 interrupted.
"""

import argparse
import signal
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt  # noqa: E402

plt.switch_backend("Agg")  # load it now: a Ctrl-C during its lazy first load became an ImportError traceback
import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from model import Net  # noqa: E402
from s5 import checkpoints, cli, data, device, distributed, engine, evaluation, files, plots  # noqa: E402

PLOT_EVERY_S = 30.0  # redraw accuracy_plots.png at most this often: a redraw can take most of a GPU epoch
# On --resume these may change (where the data is, where and how it runs, how long); the rest defines the run.
RESUME_MAY_CHANGE = {"epochs", "data_dir", "device", "amp", "channels_last", "progress", "workers",
                     "deterministic", "resume"}


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--recipe", choices=sorted(engine.RECIPES), default="seed",
                   help="hyperparameter set: seed = the original notebook, fast = one-cycle")
    p.add_argument("--epochs", type=cli.whole_number(1), help="epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=cli.whole_number(1), help="batch size (default: the recipe's)")
    p.add_argument("--lr", type=cli.positive_number,
                   help="learning rate; the peak for one-cycle (default: the recipe's)")
    p.add_argument("--seed", type=cli.whole_number(0, 2**32 - 1), default=1,
                   help="seed for weights, shuffling and augmentation")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (CUDA when present)")
    p.add_argument("--data-dir", default=str(data.DATA_DIR), help="MNIST root; files go in DIR/MNIST/raw")
    p.add_argument("--out", help="output folder, new or empty (default: a new runs/<recipe>-<date>-<time>)")
    p.add_argument("--train-subset", type=cli.whole_number(1, 60_000), help="train on the first N training images")
    p.add_argument("--loader", choices=data.LOADERS, default="fast",
                   help="fast = tensors on the device, batched augmentation; classic = torchvision DataLoader")
    p.add_argument("--workers", type=cli.whole_number(0), default=2, help="DataLoader workers (classic loader only)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16/fp16 mixed precision (default: on for CPUs with native bf16 and GPUs before Ampere; "
                        "newer GPUs train fp32 on TF32 tensor cores)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory layout for the model")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (its last.pt)")
    return p


def resumed_args(args, argv, checkpoint):
    """The run's own arguments, with the flags given now that may change on resume; refuses the others."""
    saved = {**vars(build_parser().parse_args([])), **checkpoint["args"]}
    given = cli.given_flags(build_parser, argv)
    for name in sorted(given - RESUME_MAY_CHANGE):
        if name == "out" and Path(args.out).resolve() == Path(args.resume).resolve().parent:
            continue
        if getattr(args, name) != saved.get(name):
            flag = "--" + name.replace("_", "-")
            cli.fail(f"{flag} cannot change when resuming (the run has {flag} {saved.get(name)}): "
                     "drop it, or start a new run")
    merged = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in given}, "resume": args.resume})
    merged.out = str(Path(args.resume).resolve().parent)
    done, planned = checkpoint["epoch"], saved["epochs"] or engine.RECIPES[merged.recipe].epochs
    merged.epochs = merged.epochs or planned
    if merged.epochs != planned:
        if merged.epochs < done:
            cli.fail(f"--epochs {merged.epochs} is fewer than the {done} epochs the run has done")
        if engine.RECIPES[merged.recipe].scheduler == "OneCycleLR":
            cli.fail(f"--epochs cannot change for a {merged.recipe!r} run: its one-cycle schedule was laid out "
                     f"over {planned} epochs; start a new run instead")
    if "data_dir" not in given and not Path(merged.data_dir).is_dir():
        cli.fail(f"the run's data folder {merged.data_dir} is gone: give --data-dir where MNIST is now")
    return merged


def write_csv(path, history, record):
    """metrics.csv (record EPOCH_RECORD) or steps.csv (STEP_RECORD), rewritten whole from the history each epoch:
    one row per epoch or step, even after a resume."""
    rows = [",".join(record)]
    for i in range(len(history[next(iter(record))])):
        rows.append(",".join(format(history[k][i], fmt) for k, fmt in record.items()))
    files.atomic_write(path, lambda f: f.write(("\n".join(rows) + "\n").encode()))


def draw_curves(out, history):
    """accuracy_plots.png (the original 2x2 per-epoch figure) and training_curves.png (every few batches)."""
    plt.close(plots.post_accuracyplots(history["train_loss"], history["test_loss"], history["train_acc"],
                                       history["test_acc"], save_path=out / "accuracy_plots.png"))
    plt.close(plots.plot_training(history, history["test_loss"], history["test_acc"],
                                  save_path=out / "training_curves.png"))


def main(argv=None):
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    checkpoint = None
    if args.resume:
        try:
            checkpoint = checkpoints.load_checkpoint(args.resume, Net())  # read once; architecture checked here
            checkpoints.check_resumable(checkpoint, args.resume)
            checkpoint["history"] = engine.new_history(checkpoint["history"])
        except checkpoints.CheckpointError as e:
            cli.fail(e)
        except ValueError as e:  # a history that does not add up
            cli.fail(f"{args.resume}: {e}")
        args = resumed_args(args, argv, checkpoint)
    try:
        dev = device.get_device(args.device)  # checked in every process, before a group forms
        ctx, group_device = distributed.setup(dev)
        dev = group_device or dev  # under torchrun on CUDA: the GPU of this process's LOCAL_RANK
    except ValueError as e:
        cli.fail(f"--device: {e}")
    try:
        recipe = engine.get_recipe(args.recipe, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
        run_dir = claim_output_folder(args, recipe, resume=checkpoint is not None) if ctx.is_main else None
    except (ValueError, files.OutputError) as e:
        cli.fail(e)
    out = Path(distributed.broadcast(str(run_dir.path) if run_dir else None))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        history = train_run(args, dev, ctx, recipe, checkpoint, out, started)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if run_dir:
            run_dir.release()
        distributed.teardown()
    if ctx.is_main:
        print(f"final test accuracy {history['test_acc'][-1]:.2f}% (best {max(history['test_acc']):.2f}%), "
              f"{history['elapsed_seconds'][-1]:.0f} s; outputs in {out}/")


def claim_output_folder(args, recipe, resume):
    """The run's folder, held by this process: the resumed run's, --out, or a new runs/<recipe>-<date>-<time>."""
    if resume or args.out:
        return files.RunDir.claim(args.out, resume=resume)
    return files.RunDir.claim_new("runs", f"{recipe.name}-{files.timestamp()}")


def train_run(args, dev, ctx, recipe, checkpoint, out, started):
    """Data, model, the epoch loop and the final outputs, in the claimed folder `out`; returns the history.

    Under torchrun every process runs this; rank 0 alone prints, writes files and draws.
    """
    say = print if ctx.is_main else (lambda *a, **k: None)
    try:
        device.set_seed(args.seed, args.deterministic)
        torch.backends.cudnn.benchmark = not args.deterministic  # time convolution algorithms once, keep the fastest
        if dev.type == "cpu":
            device.keep_freed_memory()  # reuse each step's activation buffers instead of page-faulting fresh ones
        amp_dtype = device.amp_dtype_for(dev, args.amp)
        say(f"device {dev}, precision {amp_dtype or torch.float32}, loader {args.loader}, recipe {recipe}"
            + (f", {ctx.world_size} processes (the batch size is global)" if ctx.active else ""))

        model = Net().to(dev)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader_kwargs = {"batch_size": recipe.batch_size, "shuffle": True, "num_workers": args.workers,
                         "pin_memory": True}
        shard = (ctx.rank, ctx.world_size)
        test_kwargs = {**loader_kwargs, "batch_size": 256, "shuffle": False}
        try:
            if ctx.local_rank == 0:
                data.ensure_mnist(args.data_dir)  # one fetch a machine, before its other processes read
            distributed.barrier()
            train_loader = data.get_MNISTdataset_with_loader("train", loader_kwargs, args.loader, args.data_dir, dev,
                                                             subset=args.train_subset, seed=args.seed, shard=shard)
            test_loader = data.get_MNISTdataset_with_loader("test", test_kwargs, args.loader, args.data_dir, dev,
                                                            shard=shard)
            optimizer, scheduler, criterion = engine.build_training(model, recipe, len(train_loader),
                                                                    verbose=ctx.is_main)
        except (data.MNISTDataError, ValueError) as e:
            cli.fail(e)

        history, start_epoch = engine.new_history(), 1
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            checkpoints.set_rng_state(checkpoint["rng"])
            history, start_epoch = checkpoint["history"], checkpoint["epoch"] + 1
            say(f"resuming {args.resume} at epoch {start_epoch}" if start_epoch <= recipe.epochs else
                  f"{args.resume} has all {recipe.epochs} epochs done: writing the final outputs")
        run_args = vars(args) | {"out": str(out), "epochs": recipe.epochs}
        plotted_at = -PLOT_EVERY_S

        def on_epoch_end(epoch, hist):
            nonlocal plotted_at
            if not ctx.is_main:
                return
            # best.pt before last.pt: a kill between the two never leaves best.pt behind the history in last.pt.
            if hist["test_acc"][-1] > max(hist["test_acc"][:-1], default=-1.0):
                checkpoints.save_checkpoint(out / "best.pt", model, optimizer, scheduler, epoch, hist, run_args)
            checkpoints.save_checkpoint(out / "last.pt", model, optimizer, scheduler, epoch, hist, run_args)
            write_csv(out / "metrics.csv", hist, engine.EPOCH_RECORD)
            write_csv(out / "steps.csv", hist, engine.STEP_RECORD)
            now = time.perf_counter()
            if epoch == recipe.epochs or now - plotted_at >= PLOT_EVERY_S:
                plotted_at = now
                draw_curves(out, hist)

        # Data-parallel: gradients averaged across processes; checkpoints save the plain `model` (no "module.").
        trained = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
            if ctx.active else model
        engine.fit(trained, dev, train_loader, test_loader, optimizer, scheduler, criterion, recipe.epochs,
                   history=history, start_epoch=start_epoch, amp_dtype=amp_dtype, on_epoch_end=on_epoch_end,
                   progress=args.progress, started=started)
        if ctx.active:
            if not distributed.same_on_every_rank(list(model.parameters())):
                cli.fail("the processes ended with different weights: a bug, please report it", cli.EXIT_FAILED)
            say(f"weights identical in all {ctx.world_size} processes")
            if not ctx.is_main:
                return history
            test_loader = data.get_MNISTdataset_with_loader("test", test_kwargs, args.loader, args.data_dir, dev)
        if start_epoch > recipe.epochs:  # a finished run resumed: its curves are drawn again with the rest
            draw_curves(out, history)
        checkpoints.save_weights(out / "model.pt", model)
        predictions = evaluation.predict_loader(model, test_loader, dev, amp_dtype, keep_images=True)  # 1 pass, 2 plots
        plt.close(plots.plot_confusion_matrix(evaluation.confusion_matrix(predictions), out / "confusion_matrix.png"))
        plt.close(plots.plot_misclassified(evaluation.misclassified(predictions, 24), out / "misclassified.png"))
        return history
    except engine.TrainingDivergedError as e:
        kept = f"; the last good epoch is in {out / 'last.pt'}" if (out / "last.pt").exists() else ""
        _fail(ctx, f"{e} (try a new run with --lr below {recipe.lr:g}){kept}", cli.EXIT_FAILED)
    except files.OutputError as e:
        _fail(ctx, f"{e}{_resume_hint(out)}", cli.EXIT_FAILED)
    except KeyboardInterrupt:
        if ctx.is_main:
            print(file=sys.stderr)  # end the progress bar's line
        _fail(ctx, f"interrupted{_resume_hint(out)}", cli.EXIT_INTERRUPTED)


def _fail(ctx, message, code):
    """One line from rank 0; the other processes of a group end with the same code, silently."""
    if ctx.is_main:
        cli.fail(message, code)
    raise SystemExit(code)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a job scheduler) ends a run as Ctrl-C does: cleanly, with a message


def _resume_hint(out):
    last = out / "last.pt"
    if last.exists():
        return f"; the last finished epoch is safe in {last}: continue with python train.py --resume {last}"
    return f" before the first epoch ended, so nothing was saved: run again (--out {out} can be reused)"


if __name__ == "__main__":
    main()
