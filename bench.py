"""Throughput of the classic and the fast pipeline, side by side in one run on one machine.

    python bench.py                    # training and evaluation img/s, ratios
    python bench.py --time-to-target   # also: the fast recipe's wall-clock time to 99.3% (runs train.py)
    python bench.py --compile          # also: torch.compile (inductor) against eager, and whether it pays back
    python bench.py --recipe fast --seeds 10 [--val-split 10000]   # a recipe's accuracy over 10 seeds

Training: the same Net and SGD step, fed by (1) the classic torchvision DataLoader with per-image PIL
augmentation, 2 workers, fp32, with glibc's default malloc settings: the original notebook's pipeline;
(2) the same with `keep_freed_memory()` on, as train.py and the notebook have it on the CPU; (3) the fast
tensor loader in fp32; (4) the fast loader with mixed precision (bf16 autocast where the hardware has
it) and channels_last. Evaluation: the original pipeline against the fastest one. Last, each convolution
alone in the fastest setting (forward, weight gradient, input gradient), which bounds what any pipeline
can reach on this machine. Prints a table and, last, one JSON line with every figure and the machine.

With --seeds N it measures accuracy instead: the recipe trained with seeds 1..N (or from --first-seed), one run
after another in runs/sweep-<recipe>-<time>/seed-N, each run's final test accuracy and seconds, then the mean,
standard deviation, minimum and how many reached --target; a JSON line last.
"""

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model import INPUT_SHAPE, Net
from s5 import cli, config, data, engine, evaluation, files, mnist, run, sweep
from s5.device import amp_dtype_for, cpu_name, get_device, keep_freed_memory


def endless(loader):
    """The loader's batches, epoch after epoch (a timing window may cross an epoch boundary)."""
    while True:
        yield from loader


def train_throughput(model, device, loader, amp_dtype, batches, warmup=3, warmup_seconds=None):
    """Images/s of engine.train, the loop every run uses, over `batches` batches after `warmup` untimed ones (whose
    seconds are appended to the list `warmup_seconds` when given: a compiled model compiles there)."""
    optimizer = engine.get_optimizer(model, "SGD", 0.01, 0.9)
    stream = endless(loader)

    seen = []

    def run(n):
        counted = ((seen.append(len(y)), (x, y))[1] for x, y in itertools.islice(stream, n))
        engine.train_epoch(model, counted, optimizer, engine.get_loss(), device=device, amp_dtype=amp_dtype,
                           progress=False)  # ends with .item(): a GPU is synchronised

    start = time.perf_counter()
    run(warmup)
    if warmup_seconds is not None:
        warmup_seconds.append(time.perf_counter() - start)
    seen.clear()
    start = time.perf_counter()
    run(batches)
    return sum(seen) / (time.perf_counter() - start)


def eval_throughput(model, device, loader, amp_dtype):
    """Images/s of evaluation.predict_loader (what `test` runs) over the whole test set, after one warm-up batch."""
    evaluation.predict_loader(model, itertools.islice(loader, 1), device, amp_dtype)
    start = time.perf_counter()
    labels = evaluation.predict_loader(model, loader, device, amp_dtype).labels
    return len(labels) / (time.perf_counter() - start)


def timed(fn, device, repeats=5, warmup=2):
    """Mean seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def conv_passes(model, device, batch_size, dtype, channels_last):
    """Seconds per batch for each convolution's three training passes alone, with their GFLOP/s.

    Returns [(name, shape text, {pass: (seconds, GFLOP/s)})]. The first layer's input gradient is left
    out, as in training (the images need none). The sum of the seconds is the convolutions' share of one
    training step; batch_size divided by it is the most img/s any loader or loop could reach.
    """
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    inputs = {}

    def record(module, args, output):  # returns None: the output is left as it is
        inputs[module] = args[0].shape

    hooks = [m.register_forward_hook(record) for _, m in convs]
    with torch.no_grad():
        model(torch.zeros(1, *INPUT_SHAPE, device=device))
    for h in hooks:
        h.remove()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype = dtype or torch.float32
    rows = []
    for i, (name, conv) in enumerate(convs):
        x = torch.randn(batch_size, *inputs[conv][1:], device=device, dtype=dtype).contiguous(memory_format=fmt)
        w = conv.weight.detach().to(dtype).contiguous(memory_format=fmt)
        x.requires_grad_(i > 0)
        w.requires_grad_()

        def forward(x=x, w=w, conv=conv):
            return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

        y = forward()
        g = torch.randn_like(y)
        gflop = 2 * y.numel() * w[0].numel() / 1e9  # one multiply-add per output element and weight tap
        passes = {"forward": forward,
                  "grad weight": lambda y=y, w=w, g=g: torch.autograd.grad(y, w, g, retain_graph=True)}
        if i > 0:
            passes["grad input"] = lambda y=y, x=x, g=g: torch.autograd.grad(y, x, g, retain_graph=True)
        figures = {}
        for pass_name, fn in passes.items():
            seconds = timed(fn, device)
            figures[pass_name] = (seconds, gflop / seconds)
        shape = f"{conv.in_channels}->{conv.out_channels} @{inputs[conv][2]}x{inputs[conv][3]}"
        rows.append((name, shape, figures))
    return rows


def compile_payback(fresh_model, device, loader, amp_dtype, batches):
    """torch.compile (inductor) against eager on the fast path: figures for the training step either way.

    Returns {eager_img_s, compiled_img_s, compile_seconds (the compiled model's first 3 steps less eager's),
    payback_steps (steps until the compile time is won back; None when a compiled step is not faster)}.
    """
    eager_warmup, compiled_warmup = [], []
    eager = train_throughput(fresh_model(True), device, loader, amp_dtype, batches, warmup_seconds=eager_warmup)
    compiled = train_throughput(torch.compile(fresh_model(True)), device, loader, amp_dtype, batches,
                                warmup_seconds=compiled_warmup)
    compile_seconds = max(0.0, compiled_warmup[0] - eager_warmup[0])
    saved_a_step = loader.batch_size / eager - loader.batch_size / compiled
    return {"eager_img_s": round(eager, 1), "compiled_img_s": round(compiled, 1),
            "compile_seconds": round(compile_seconds, 1),
            "payback_steps": math.ceil(compile_seconds / saved_a_step) if saved_a_step > 0 else None}


def time_to_target(target, data_dir):
    """Run `train.py --recipe fast` and return (seconds to reach target %, accuracy then, final)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--recipe", "fast", "--no-progress",
               "--data-dir", str(data_dir), "--out", out + "/run"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out + "/run/metrics.csv") as f:
            rows = list(csv.DictReader(f))
    hit = next((r for r in rows if float(r["test_acc"]) >= target), None)
    return (float(hit["elapsed_seconds"]) if hit else None,
            float(hit["test_acc"]) if hit else None, float(rows[-1]["test_acc"]), float(rows[-1]["elapsed_seconds"]))


MIN_BATCHES = 10


def accuracy_percent(text):
    """An argparse type: a test accuracy in percent, above 0 and at most 100."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 100:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a percentage above 0 and at most 100")
    return value


accuracy_percent.__name__ = "percentage"


def seeds_main(args):
    """The recipe over --seeds seeds: each run's figures as it ends, then the summary and one JSON line."""
    try:
        run_config = config.RunConfig.build(args.recipe, epochs=args.epochs, batch_size=args.batch_size,
                                            train_subset=args.train_subset, val_split=args.val_split,
                                            device=args.device, data_dir=args.data_dir, progress=False)
        device = get_device(args.device)
        seconds = sweep.estimate_seconds(run_config, device, args.seeds)
    except config.ConfigError as e:
        cli.fail(cli.config_message(e))
    except (ValueError, mnist.MNISTDataError) as e:
        cli.fail(e)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    folder = Path(config.RUNS_DIR) / f"sweep-{run_config.name}-{files.timestamp()}"
    print(f"{args.seeds} runs of {run_config.recipe} on {cpu_name() if device.type == 'cpu' else device}: about "
          f"{seconds / 60:.0f} min (from 8 timed steps); runs in {folder}/", flush=True)
    try:
        results = sweep.sweep(run_config, device, seeds, folder)
    except KeyboardInterrupt:
        cli.fail(f"interrupted; the finished runs are in {folder}/", cli.EXIT_INTERRUPTED)
    except (run.RunStoppedError, files.OutputError, config.ConfigError, ValueError) as e:
        cli.fail(f"a run of the sweep stopped: {e}", cli.EXIT_FAILED)
    for r in results:
        val = f", validation {r['val_acc']:.2f}%" if r["val_acc"] is not None else ""
        print(f"seed {r['seed']}: test {r['test_acc']:.2f}%{val}, {r['seconds']:.0f} s")
    seconds = [r["seconds"] for r in results]
    stats = {"test_acc": sweep.summary([r["test_acc"] for r in results], args.target),
             "seconds": {"mean": sum(seconds) / len(seconds), "min": min(seconds), "max": max(seconds)}}
    if args.val_split:
        stats["val_acc"] = sweep.summary([r["val_acc"] for r in results], args.target)
        print(sweep.format_summary("validation", stats["val_acc"]))
    print(sweep.format_summary("test", stats["test_acc"]))
    print(f"seconds a run: mean {stats['seconds']['mean']:.0f}, min {stats['seconds']['min']:.0f}, max "
          f"{stats['seconds']['max']:.0f}")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps({"config": run_config.to_dict(), "seeds": list(seeds), "runs": results, **stats, **machine},
                     allow_nan=False))
    return 0


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--batch-size", type=cli.whole_number(1, config.TRAIN_IMAGES),
                   help="training batch size (default: 512, the original's; with --seeds the recipe's)")
    # The classic loader has workers x 2 batches prefetched when timing starts; with fewer than about ten timed
    # batches those free ones, and one step's jitter, make the ratios noise (--batches 1 printed 23x).
    p.add_argument("--batches", type=cli.whole_number(MIN_BATCHES), default=60,
                   help="timed training batches per pipeline (fewer lets prefetching flatter the classic loader)")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--data-dir", default=str(mnist.DATA_DIR), help="MNIST root")
    p.add_argument("--workers", type=cli.whole_number(0), default=2,
                   help="classic DataLoader workers (the original's 2)")
    p.add_argument("--time-to-target", action="store_true", help="also time the fast recipe to --target")
    p.add_argument("--compile", action="store_true",
                   help="also time the fast recipe's training step under torch.compile (inductor) against eager")
    p.add_argument("--target", type=accuracy_percent, default=99.3,
                   help="test accuracy (%%) for --time-to-target and --seeds")
    sweep_flags = p.add_argument_group("accuracy over seeds")
    sweep_flags.add_argument("--seeds", type=cli.whole_number(1, 1000), help="train the recipe with N seeds instead")
    sweep_flags.add_argument("--first-seed", type=cli.whole_number(0, 2**32 - 1000), default=1, help="first seed")
    sweep_flags.add_argument("--recipe", choices=sorted(config.RECIPES), default="fast", help="recipe to train")
    sweep_flags.add_argument("--epochs", type=cli.whole_number(1), help="epochs (default: the recipe's)")
    sweep_flags.add_argument("--train-subset", type=cli.whole_number(1, config.TRAIN_IMAGES),
                             help="train on the first N training images")
    sweep_flags.add_argument("--val-split", type=cli.whole_number(0, config.TRAIN_IMAGES - 1), default=0,
                             help="hold out N training images for validation in every run")
    args = p.parse_args(argv)
    if args.seeds and (args.compile or args.time_to_target):
        p.error(f"argument {'--compile' if args.compile else '--time-to-target'}: not with --seeds (it measures "
                "accuracy, not speed): run them apart")
    if args.seeds:
        return seeds_main(args)
    args.batch_size = args.batch_size or 512
    if args.batches < 4 * args.workers:
        p.error(f"argument --batches: {args.batches} is too few for --workers {args.workers}: the classic loader has "
                f"{2 * args.workers} batches prefetched when timing starts; give {4 * args.workers} or more")

    try:
        device = get_device(args.device)
        train_split, test_split = mnist.load_split(True, args.data_dir), mnist.load_split(False, args.data_dir)
    except (ValueError, mnist.MNISTDataError) as e:
        cli.fail(e)
    amp_dtype = amp_dtype_for(device, True)
    # Not persistent: the workers stop when a timing ends, instead of prefetching during the next one.
    classic = {"loader": "classic", "workers": args.workers, "pin_memory": True, "persistent_workers": False}

    def fresh_model(channels_last):
        torch.manual_seed(0)
        model = Net().to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def report(kind, key, pipeline, dtype, channels_last, loader):
        model = fresh_model(channels_last)
        img_s = (train_throughput(model, device, loader, dtype, args.batches) if kind == "train"
                 else eval_throughput(model, device, loader, dtype))
        figures[f"{kind}_{key}_img_s"] = round(img_s, 1)
        layout = "channels_last" if channels_last else "contiguous"
        print(f"{kind:<6}{pipeline:<20}{str(dtype or 'fp32'):<16}{layout:<15}{img_s:>8.0f} img/s", flush=True)

    figures = {}
    train_classic = data.make_loader(*train_split, batch_size=args.batch_size, train=True, device=device, **classic)
    test_classic = data.make_loader(*test_split, batch_size=256, train=False, device=device, **classic)
    # The original pipeline first: keep_freed_memory() cannot be undone within a process.
    report("train", "classic_fp32", "classic DataLoader", None, False, train_classic)
    report("eval", "classic_fp32", "classic DataLoader", None, False, test_classic)
    kept = device.type == "cpu" and keep_freed_memory()
    if kept:
        report("train", "classic_fp32_kept", "classic, kept mem", None, False, train_classic)
    train_fast = data.make_loader(*train_split, batch_size=args.batch_size, train=True, device=device)
    for key, dtype, cl in [("fast_fp32", None, False), ("fast_fp32_cl", None, True),
                           ("fast_amp", amp_dtype, False), ("fast_amp_cl", amp_dtype, True)]:
        report("train", key, "fast loader", dtype, cl, train_fast)
    test_fast = data.make_loader(*test_split, batch_size=256, train=False, device=device)
    report("eval", "fast_amp_cl", "fast loader", amp_dtype, True, test_fast)

    print(f"\neach convolution alone, batch {args.batch_size}, {amp_dtype or 'fp32'}, channels_last:")
    conv_seconds = 0.0
    for name, shape, passes in conv_passes(fresh_model(True), device, args.batch_size, amp_dtype, True):
        conv_seconds += sum(seconds for seconds, _ in passes.values())
        print(f"  {name:<6}{shape:<18}" + "  ".join(f"{what} {s * 1e3:6.2f} ms {gf:6.0f} GFLOP/s"
                                                   for what, (s, gf) in passes.items()))
    figures["conv_only_ms_per_batch"] = round(conv_seconds * 1e3, 1)
    figures["conv_only_ceiling_img_s"] = round(args.batch_size / conv_seconds, 1)
    print(f"  all convolutions: {conv_seconds * 1e3:.1f} ms a batch, so at most "
          f"{figures['conv_only_ceiling_img_s']:.0f} img/s; the fast path reached "
          f"{figures['train_fast_amp_cl_img_s'] / figures['conv_only_ceiling_img_s']:.0%} of that")

    def ratio(fast, classic):
        return round(figures[f"{fast}_img_s"] / figures[f"{classic}_img_s"], 2)

    precision = str(amp_dtype or "fp32").removeprefix("torch.")
    speedups = [("train_speedup_fast_fp32", "train_fast_fp32", "train_classic_fp32",
                 "training, fast loader fp32 vs the original pipeline"),
                ("train_speedup_fast_amp_cl", "train_fast_amp_cl", "train_classic_fp32",
                 f"training, fast loader + {precision} + channels_last vs the original pipeline"),
                ("eval_speedup_fast_amp_cl", "eval_fast_amp_cl", "eval_classic_fp32",
                 f"evaluation, fast loader + {precision} vs the original pipeline")]
    if kept:
        speedups.insert(2, ("train_speedup_fast_amp_cl_vs_kept", "train_fast_amp_cl", "train_classic_fp32_kept",
                            f"training, fast loader + {precision} + channels_last vs classic with kept memory"))
    print()
    for key, fast, classic, label in speedups:
        figures[key] = ratio(fast, classic)
        print(f"{label}: {figures[key]:.2f}x")
    if args.compile:
        fast = config.RECIPES["fast"]
        loader = data.make_loader(*train_split, batch_size=fast.batch_size, train=True, device=device)
        steps = fast.epochs * len(loader)
        try:
            figures["compile"] = c = compile_payback(fresh_model, device, loader, amp_dtype, args.batches)
        except Exception as e:  # inductor's errors (no C++ compiler, an unsupported device) have many types
            cli.fail(f"torch.compile failed here ({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}): "
                     "on the CPU it needs a C++ compiler (g++ or clang); leave out --compile", cli.EXIT_FAILED)
        pays = (f"pays back after {c['payback_steps']} steps (a fast run has {steps})"
                if c["payback_steps"] is not None else "never pays back: a compiled step is slower")
        print(f"torch.compile, the table's training step at the fast recipe's batch {fast.batch_size} ({precision}, "
              f"channels_last): eager {c['eager_img_s']:.0f} img/s, compiled {c['compiled_img_s']:.0f} img/s after "
              f"{c['compile_seconds']:.0f} s of compiling; {pays}")
    if args.time_to_target:
        seconds, acc, final, total = time_to_target(args.target, args.data_dir)
        figures.update(fast_recipe_seconds_to_target=seconds, fast_recipe_acc_at_target=acc,
                       fast_recipe_final_acc=final, fast_recipe_total_seconds=total, target=args.target)
        print(f"fast recipe: {args.target}% after {seconds} s (final {final}% at {total} s)")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "batch_size": args.batch_size}
    print(json.dumps({**figures, **machine}))


if __name__ == "__main__":
    main()
