"""Throughput of the classic and the fast pipeline, side by side in one run on one machine.

    python bench.py                    # training and evaluation img/s, and the ratios
    python bench.py --time-to-target   # also: the fast recipe's wall-clock time to 99.3% (runs train.py)
    python bench.py --compile          # also: torch.compile (inductor) against eager, and whether it pays back

Training: s5.loop.train_epoch with the seed recipe's SGD, fed by the original pipeline (DataLoader, PIL augmentation,
2 workers, fp32; on the CPU also with freed memory kept, as runs have it) or the fast loader (fp32 or mixed precision,
contiguous or channels_last); evaluation likewise; each convolution alone, which bounds any pipeline; a JSON line last.
Accuracy over seeds moved to sweep.py. Exit: 0 done, 1 --compile or train.py failed, 2 usage/data error, 130 stopped.
"""

import s5.startup  # noqa: F401  # isort: skip  (first: a signal while torch imports is one line, exit 130)
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import timeit

import torch

from model import INPUT_SHAPE
from s5 import cli, config, data, errors, evaluation, loop, mnist
from s5.device import amp_dtype_for, get_device, keep_freed_memory, machine, new_net

# The classic loader's 2 workers have 4 batches prefetched when timing starts; with fewer than about ten timed
# batches those free ones, and one step's jitter, make the ratios noise (--batches 1 printed 23x).
MIN_BATCHES = 10
PASSES = {"forward": "torch.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)",
          "grad weight": "torch.autograd.grad(y, w, g, retain_graph=True)",
          "grad input": "torch.autograd.grad(y, x, g, retain_graph=True)"}  # not the first layer's: images need none
# The original pipeline; not persistent: the workers stop when a timing ends, instead of prefetching during the next.
CLASSIC = {"loader": "classic", "num_workers": 2, "pin_memory": True, "persistent_workers": False}


def conv_seconds(model, device, batch_size, dtype):
    """Prints each convolution's training passes alone (channels_last) and returns their seconds a batch: the
    convolutions' share of a step, so batch_size over it bounds what any loader or loop can reach."""
    convs, inputs, total = {m: name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}, {}, 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None  # a timed call waits for a GPU
    for m in convs:  # each one's input in a batch; the hooks stay, as the model is not run again
        m.register_forward_hook(lambda m, args, out: inputs.update({m: args[0].detach()}))
    model(torch.randn(batch_size, *INPUT_SHAPE, device=device))
    for i, (c, name) in enumerate(convs.items()):
        x = inputs[c].to(dtype or torch.float32, memory_format=torch.channels_last).requires_grad_(i > 0)
        w = c.weight.detach().to(x.dtype, memory_format=torch.channels_last).requires_grad_()
        y = torch.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)
        env = {"torch": torch, "c": c, "x": x, "w": w, "y": y, "g": torch.randn_like(y), "sync": sync, "d": device}
        seconds = {what: min(timeit.repeat(stmt + "; sync(d)", globals=env, repeat=2, number=3)) / 3  # the best of 2
                   for what, stmt in list(PASSES.items())[:3 if i else 2]}  # runs of 3 calls: the first warms up
        total, gflop = total + sum(seconds.values()), 2 * y.numel() * w[0].numel() / 1e9  # a multiply-add a tap
        print(f"  {name:<6}{f'{c.in_channels}->{c.out_channels} @{x.shape[2]}x{x.shape[3]}':<18}" + "  ".join(
            f"{what} {s * 1e3:6.2f} ms {gflop / s:6.0f} GFLOP/s" for what, s in seconds.items()))
    return total


def bench(args):
    device, figures = get_device(args.device), {}
    splits = {train: mnist.load_split(train, args.data_dir) for train in (True, False)}
    amp = amp_dtype_for(device, True)  # mixed precision forced on (on a CPU, bf16 even where it is emulated)

    def row(kind, key, pipeline, dtype, channels_last):  # training at --batch-size; evaluation as runs evaluate
        train, classic = kind == "train", CLASSIC if key.startswith("classic") else {}
        batches = data.make_loader(*splits[train], args.batch_size if train else data.TEST_BATCH, train,
                                   device=device, **classic)
        net, start = new_net(device, channels_last), time.perf_counter()
        img_s = (loop.train_throughput(net, batches, dtype, args.batches)[0] if train else
                 len(evaluation.predict_loader(net, batches, device, dtype).labels) / (time.perf_counter() - start))
        figures[f"{kind}_{key}_img_s"] = round(img_s, 1)
        layout = "channels_last" if channels_last else "contiguous"
        print(f"{kind:<6}{pipeline:<20}{str(dtype or 'fp32'):<16}{layout:<15}{img_s:>8.0f} img/s", flush=True)

    row("train", "classic_fp32", "classic DataLoader", None, False)  # first: keep_freed_memory() cannot be undone
    row("eval", "classic_fp32", "classic DataLoader", None, False)
    if device.type == "cpu" and keep_freed_memory():
        row("train", "classic_fp32_kept", "classic, kept mem", None, False)
    for key, dtype, cl in [("fp32", None, False), ("fp32_cl", None, True), ("amp", amp, False), ("amp_cl", amp, True)]:
        row("train", "fast_" + key, "fast loader", dtype, cl)
    row("eval", "fast_amp_cl", "fast loader", amp, True)
    print(f"\neach convolution alone, batch {args.batch_size}, {amp or 'fp32'}, channels_last:")
    seconds = conv_seconds(new_net(device, True), device, args.batch_size, amp)
    ceiling = figures["conv_only_ceiling_img_s"] = round(args.batch_size / seconds, 1)
    figures["conv_only_ms_per_batch"] = round(seconds * 1e3, 1)
    print(f"  all convolutions: {seconds * 1e3:.1f} ms a batch, so at most {ceiling:.0f} img/s; the fast path reached "
          f"{figures['train_fast_amp_cl_img_s'] / ceiling:.0%} of that\n")
    speedups(figures)
    if args.compile:  # the training step at the fast recipe's batch, eager against compiled
        figures["compile"] = compile_figures(device, splits[True], amp, args.batches)
    if args.time_to_target:
        figures.update(time_to_target(args))
    print(json.dumps({**figures, **machine(device), "batch_size": args.batch_size, "eval_batch_size": data.TEST_BATCH}))


def speedups(figures):
    """The fast pipelines against the original one, as ratios of their img/s, added to `figures` and printed."""
    for kind, new, old in [("train", "fast_fp32", "classic_fp32"), ("train", "fast_amp_cl", "classic_fp32"),
                           ("train", "fast_amp_cl", "classic_fp32_kept"), ("eval", "fast_amp_cl", "classic_fp32")]:
        if f"{kind}_{old}_img_s" in figures:  # the kept-memory row is the CPU's alone
            key = f"{kind}_speedup_{new}" + ("_vs_kept" if old.endswith("kept") else "")
            figures[key] = round(figures[f"{kind}_{new}_img_s"] / figures[f"{kind}_{old}_img_s"], 2)
            print(f"{kind} speedup, {new} over {old}: {figures[key]:.2f}x", flush=True)


def compile_figures(device, train_split, amp, n_batches):
    """Eager against torch.compile (inductor) on the same training step: img/s, compile seconds, payback steps."""
    fast = config.RECIPES["fast"]
    batches = data.make_loader(*train_split, fast.batch_size, True, device=device)
    try:
        eager, eager_warmup = loop.train_throughput(new_net(device, True), batches, amp, n_batches)
        compiled, compiled_warmup = loop.train_throughput(torch.compile(new_net(device, True)), batches, amp, n_batches)
    except Exception as e:  # inductor's errors (no C++ compiler, an unsupported device) have many types
        cli.fail(f"torch.compile failed here ({errors.first_line(e)}): on the CPU it needs a C++ compiler (g++ or "
                 "clang); leave out --compile", cli.EXIT_FAILED)
    compiling = max(0.0, compiled_warmup - eager_warmup)  # the compiled model's 3 warm-up steps less eager's
    saved = fast.batch_size / eager - fast.batch_size / compiled  # seconds a step
    payback = math.ceil(compiling / saved) if saved > 0 else None
    pays = "never pays back: a compiled step is slower" if payback is None else f"pays back after {payback} steps"
    print(f"torch.compile at batch {fast.batch_size}: eager {eager:.0f} img/s, compiled {compiled:.0f} img/s after "
          f"{compiling:.0f} s of compiling; {pays} (a fast run has {fast.epochs * len(batches)})", flush=True)
    return {"eager_img_s": round(eager, 1), "compiled_img_s": round(compiled, 1),
            "compile_seconds": round(compiling, 1), "payback_steps": payback}


def time_to_target(args):
    """train.py --recipe fast, timed to --target from its metrics.csv (its output kept: on Ctrl-C only we speak)."""
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "train.py"), "--recipe",
                               "fast", "--no-progress", "--device", args.device, "--data-dir", args.data_dir,
                               "--out", out + "/run"], capture_output=True, text=True)
        if done.returncode:  # its last line is its one-line error (those before, warnings)
            why = done.stderr.strip().rsplit("\n", 1)[-1].removeprefix("error: ")
            cli.fail(f"train.py --recipe fast failed: {why}", cli.EXIT_FAILED)
        with open(out + "/run/metrics.csv") as f:
            rows = [(float(r["elapsed_seconds"]), float(r["test_acc"])) for r in csv.DictReader(f)]
    seconds, acc = next(((s, a) for s, a in rows if a >= args.target), (None, None))
    print(f"fast recipe: {args.target}% after {seconds} s (final {rows[-1][1]}% at {rows[-1][0]} s)")
    return dict(fast_recipe_seconds_to_target=seconds, fast_recipe_acc_at_target=acc, target=args.target,
                fast_recipe_final_acc=rows[-1][1], fast_recipe_total_seconds=rows[-1][0])


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=cli.whole_number(1, config.TRAIN_IMAGES),
                   default=config.RECIPES["seed"].batch_size, help="training batch size (default: the seed recipe's)")
    p.add_argument("--batches", type=cli.whole_number(MIN_BATCHES), default=60, help="timed batches a pipeline")
    cli.add_flags(p, ["device", "data_dir"], {"device": "auto", "data_dir": mnist.DATA_DIR})
    p.add_argument("--time-to-target", action="store_true", help="also time the fast recipe to --target (train.py)")
    p.add_argument("--compile", action="store_true", help="also time the training step under torch.compile (inductor)")
    p.add_argument("--target", type=cli.typed("target", config.Field(float, 0, 100, above=True)), default=99.3,
                   help="test accuracy (%%) for --time-to-target (default: 99.3)")
    p.set_defaults(device="auto", data_dir=str(mnist.DATA_DIR))
    try:
        with cli.stop_like_ctrl_c():
            bench(p.parse_args(argv))
    except KeyboardInterrupt:
        cli.fail("interrupted", cli.EXIT_INTERRUPTED)
    except errors.UserError as e:
        cli.fail(cli.message(e), e.exit_code)


if __name__ == "__main__":
    main()
