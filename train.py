"""Train the S5 Net from the command line: what S5.ipynb does, headless, with checkpoints.

    python train.py                      # the original recipe: 20 epochs, batch 512, SGD 0.01, StepLR
    python train.py --recipe fast        # one-cycle SGD: >= 99.3% in under 150 s on a 2-core CPU
    python train.py --resume runs/X/last.pt

Writes into --out: metrics.csv (one row per epoch), accuracy_plots.png, last.pt (every epoch),
best.pt (best test accuracy), model.pt (final weights), confusion_matrix.png, misclassified.png.
"""

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import utils  # noqa: E402
from model import Net  # noqa: E402

PLOT_EVERY_S = 30.0  # redraw accuracy_plots.png at most this often (a redraw costs ~0.4 s: most of a GPU epoch)
METRICS_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_seconds",
                   "elapsed_seconds"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=utils.HelpFormatter)
    p.add_argument("--recipe", choices=sorted(utils.RECIPES), default="seed",
                   help="hyperparameter set: seed = the original notebook, fast = one-cycle")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="learning rate; the peak for one-cycle (default: the recipe's)")
    p.add_argument("--seed", type=int, default=1, help="seed for weights, shuffling and augmentation")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (CUDA when present)")
    p.add_argument("--data-dir", default=str(utils.DATA_DIR), help="MNIST root; files go in DIR/MNIST/raw")
    p.add_argument("--out", help="output folder (default: runs/<recipe>-<date>-<time>)")
    p.add_argument("--train-subset", type=int, help="train on the first N training images only")
    p.add_argument("--loader", choices=utils.LOADERS, default="fast",
                   help="fast = tensors on the device, batched augmentation; classic = torchvision DataLoader")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (classic loader only)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16/fp16 mixed precision (default: on for CPUs with native bf16 and GPUs before Ampere; "
                        "newer GPUs train fp32 on TF32 tensor cores, which measured faster for this net)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory layout for the model")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (its last.pt)")
    return p.parse_args(argv)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def write_metrics(path, history):
    """metrics.csv rewritten whole from the history each epoch: one row per epoch, even after a resume."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(METRICS_COLUMNS)
    for i, epoch in enumerate(history["epoch"]):
        writer.writerow([epoch, f"{history['lr'][i]:.6g}", f"{history['train_losses'][i]:.6f}",
                         f"{history['train_acc'][i]:.2f}", f"{history['test_losses'][i]:.6f}",
                         f"{history['test_acc'][i]:.2f}", f"{history['train_seconds'][i]:.2f}",
                         f"{history['elapsed_seconds'][i]:.2f}"])
    utils.atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    checkpoint = None
    if args.resume:
        try:
            checkpoint = utils.load_checkpoint(args.resume, Net())  # read once; architecture checked here
        except utils.CheckpointError as e:
            fail(e)
        if not checkpoint.get("args"):
            fail(f"{args.resume} holds weights only, not a run to resume: give the run's last.pt")
        # Same run, same hyperparameters: only how it is shown may change.
        defaults = vars(parse_args([]))
        args = argparse.Namespace(**{**defaults, **checkpoint["args"], "progress": args.progress,
                                     "resume": args.resume})
        args.out = str(Path(args.resume).resolve().parent)
    out = Path(args.out or f"runs/{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    if checkpoint is None and (out / "last.pt").exists():
        fail(f"{out} already holds a run: resume it with --resume {out / 'last.pt'}, or pick another --out")

    utils.set_seed(args.seed, args.deterministic)
    try:
        device = utils.get_device(args.device)
    except ValueError as e:
        fail(e)
    recipe = utils.get_recipe(args.recipe, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    amp_dtype = utils.amp_dtype_for(device, args.amp)
    print(f"device {device}, precision {amp_dtype or torch.float32}, loader {args.loader}, recipe {recipe}")

    model = Net().to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    kwargs = {"batch_size": recipe.batch_size, "shuffle": True, "num_workers": args.workers, "pin_memory": True}
    test_kwargs = {**kwargs, "shuffle": False}
    if args.loader == "fast":
        kwargs = {"batch_size": recipe.batch_size, "shuffle": True}
        test_kwargs = {"batch_size": 256, "shuffle": False}  # fastest evaluation batch on a 2-core CPU
    try:
        train_loader = utils.get_MNISTdataset_with_loader("train", kwargs, args.loader, args.data_dir, device,
                                                          subset=args.train_subset, seed=args.seed)
        test_loader = utils.get_MNISTdataset_with_loader("test", test_kwargs, args.loader, args.data_dir, device)
    except utils.MNISTDataError as e:
        fail(e)
    optimizer, scheduler, criterion = utils.build_training(model, recipe, len(train_loader), verbose=True)

    history, start_epoch, elapsed_before = utils.new_history(), 1, 0.0
    history["elapsed_seconds"] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        utils.set_rng_state(checkpoint["rng"])
        history = checkpoint["history"]
        start_epoch = checkpoint["epoch"] + 1
        elapsed_before = history["elapsed_seconds"][-1] if history["elapsed_seconds"] else 0.0
        print(f"resuming {args.resume} at epoch {start_epoch}")
    run_args = vars(args) | {"out": str(out)}
    plotted_at = -PLOT_EVERY_S

    def on_epoch_end(epoch, hist):
        nonlocal plotted_at
        now = time.perf_counter()
        hist["elapsed_seconds"].append(elapsed_before + now - started)  # data loading included
        utils.save_checkpoint(out / "last.pt", model, optimizer, scheduler, epoch, hist, run_args)
        if hist["test_acc"][-1] > max(hist["test_acc"][:-1], default=-1.0):  # improved
            utils.save_checkpoint(out / "best.pt", model, optimizer, scheduler, epoch, hist, run_args)
        write_metrics(out / "metrics.csv", hist)
        if epoch == recipe.epochs or now - plotted_at >= PLOT_EVERY_S:
            plotted_at = now
            plt.close(utils.post_accuracyplots(hist["train_losses"], hist["test_losses"], hist["train_acc"],
                                               hist["test_acc"], save_path=out / "accuracy_plots.png"))

    try:
        utils.fit(model, device, train_loader, test_loader, optimizer, scheduler, criterion, recipe.epochs,
                  history, start_epoch, amp_dtype, on_epoch_end, args.progress)
    except utils.TrainingDivergedError as e:
        kept = f"; the last good epoch is in {out / 'last.pt'}" if (out / "last.pt").exists() else ""
        print(f"error: {e} (try --lr below {recipe.lr:g}){kept}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with python train.py --resume {out / 'last.pt'}", file=sys.stderr)
        raise SystemExit(130) from None

    utils.atomic_write(out / "model.pt", lambda f: torch.save(model.state_dict(), f))
    predictions = utils.predict_loader(model, test_loader, device, amp_dtype, keep_images=True)  # one pass, two plots
    plt.close(utils.plot_confusion_matrix(utils.confusion_matrix(model, test_loader, device, predictions=predictions),
                                          out / "confusion_matrix.png"))
    plt.close(utils.plot_misclassified(utils.misclassified(model, test_loader, device, 24, predictions=predictions),
                                       out / "misclassified.png"))
    print(f"final test accuracy {history['test_acc'][-1]:.2f}% (best {max(history['test_acc']):.2f}%), "
          f"{history['elapsed_seconds'][-1]:.0f} s; outputs in {out}/")


if __name__ == "__main__":
    main()
