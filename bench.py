"""Throughput of the classic and the fast pipeline, side by side in one run on one machine.

    python bench.py                    # training and evaluation img/s, and the ratios
    python bench.py --time-to-target   # also: the fast recipe's wall-clock time to 99.3% (runs train.py)
    python bench.py --compile          # also: torch.compile (inductor) against eager, and whether it pays back

Training times the seed recipe's SGD step (s5.loop.Step through s5.loop.train_epoch, the loop every run uses) fed by
the original pipeline (torchvision DataLoader, per-image PIL augmentation, 2 workers, fp32; on the CPU again with
freed memory kept, as runs have it) and by the fast tensor loader (fp32, then mixed precision, each with and without
channels_last); evaluation, the original pipeline against the fastest. Each convolution alone then bounds what any
pipeline can reach here. Last, one JSON line with every figure and the machine. Accuracy over seeds is sweep.py's.
Exit status: 0 done, 1 torch.compile or train.py failed, 2 usage or data error, 130 interrupted.
"""

import csv
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from model import INPUT_SHAPE, Net
from s5 import cli, config, data, evaluation, loop, mnist, optim
from s5.device import amp_dtype_for, cpu_name, get_device, keep_freed_memory
from s5.errors import UserError

# The classic loader has workers x 2 batches prefetched when timing starts; with fewer than about ten timed
# batches those free ones, and one step's jitter, make the ratios noise (--batches 1 printed 23x).
MIN_BATCHES = 10


def train_throughput(model, loader, amp_dtype, batches, warmup=3):
    """(images/s, warm-up seconds) of loop.train_epoch over a loop.Step with the seed recipe's SGD: `batches` batches
    (epoch after epoch: a window may cross an epoch's end) after `warmup` untimed ones (a compiled model compiles)."""
    step = loop.Step(model, optim.get_optimizer(model, config.RECIPES["seed"]), optim.get_loss(), amp_dtype=amp_dtype)
    stream = itertools.chain.from_iterable(itertools.repeat(loader))

    def run(n):  # seconds and images; train_epoch ends with .item(), so a GPU is synchronised
        sizes, start = [], time.perf_counter()
        loop.train_epoch(step, ((sizes.append(len(y)), (x, y))[1] for x, y in itertools.islice(stream, n)), progress=False)
        return time.perf_counter() - start, sum(sizes)

    warmup_seconds, _ = run(warmup)
    seconds, images = run(batches)
    return images / seconds, warmup_seconds


def eval_throughput(model, device, loader, amp_dtype):
    """Images/s of evaluation.predict_loader (what every evaluation runs) over the test set, after a warm-up batch."""
    evaluation.predict_loader(model, itertools.islice(loader, 1), device, amp_dtype)
    start = time.perf_counter()
    return len(evaluation.predict_loader(model, loader, device, amp_dtype).labels) / (time.perf_counter() - start)


def timed(fn, device, repeats=5, warmup=2):
    """Mean seconds a call of fn(), after `warmup` calls (a GPU's queue drained before and after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def conv_passes(model, device, batch_size, dtype):
    """[(name, shape, {pass: (seconds, GFLOP/s)})] of each convolution's training passes alone, channels_last. The
    first one's input gradient is left out, as in training (images need none). The seconds' sum is the convolutions'
    share of a step: batch_size over it bounds what any loader or loop can reach."""
    convs, shapes = {m: name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}, {}
    hooks = [m.register_forward_hook(lambda m, args, out: shapes.update({m: args[0].shape})) for m in convs]
    with torch.no_grad():
        model(torch.zeros(1, *INPUT_SHAPE, device=device))
    for h in hooks:
        h.remove()
    rows = []
    for i, (c, name) in enumerate(convs.items()):
        x = torch.randn(batch_size, *shapes[c][1:], device=device, dtype=dtype or torch.float32)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(i > 0)
        w = c.weight.detach().to(x.dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        y = F.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)
        g, gflop = torch.randn_like(y), 2 * y.numel() * w[0].numel() / 1e9  # a multiply-add per output and tap
        passes = {"forward": lambda x=x, w=w, c=c: F.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups),
                  "grad weight": lambda y=y, w=w, g=g: torch.autograd.grad(y, w, g, retain_graph=True),
                  "grad input": lambda y=y, x=x, g=g: torch.autograd.grad(y, x, g, retain_graph=True)}
        seconds = {what: timed(fn, device) for what, fn in list(passes.items())[:3 if i else 2]}
        rows.append((name, f"{c.in_channels}->{c.out_channels} @{shapes[c][2]}x{shapes[c][3]}",
                     {what: (s, gflop / s) for what, s in seconds.items()}))
    return rows


def time_to_target(target, data_dir, device):
    """Runs `train.py --recipe fast`; from its metrics.csv, (seconds when the test accuracy first reached `target`,
    the accuracy then: both None if never; the final accuracy, the run's seconds)."""
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, train_py, "--recipe", "fast", "--no-progress", "--device", device,
                               "--data-dir", data_dir, "--out", out + "/run"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode == cli.EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        if done.returncode:  # its last line is its one-line error (those before, warnings)
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1].removeprefix("error: ")
            cli.fail(f"train.py --recipe fast failed: {why}", cli.EXIT_FAILED)
        with open(out + "/run/metrics.csv") as f:
            rows = list(csv.DictReader(f))
    hit = next((r for r in rows if float(r["test_acc"]) >= target), {})
    return (float(hit["elapsed_seconds"]) if hit else None, float(hit["test_acc"]) if hit else None,
            float(rows[-1]["test_acc"]), float(rows[-1]["elapsed_seconds"]))


def bench(args):
    """The table, the convolutions' ceiling, the ratios, what was asked for, then the JSON line."""
    device, figures = get_device(args.device), {}
    splits = {train: mnist.load_split(train, args.data_dir) for train in (True, False)}
    amp, fast = amp_dtype_for(device, True), config.RECIPES["fast"]
    precision = str(amp or "fp32").removeprefix("torch.")
    # Not persistent: the workers stop when a timing ends, instead of prefetching during the next one.
    classic = {"loader": "classic", "workers": args.workers, "pin_memory": True, "persistent_workers": False}

    def loader(train, batch_size=None, **kw):
        batch_size = batch_size or (args.batch_size if train else data.TEST_BATCH)
        return data.make_loader(*splits[train], batch_size=batch_size, train=train, device=device, **kw)

    def model(channels_last):
        torch.manual_seed(0)
        return Net().to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

    def report(kind, key, pipeline, dtype, channels_last, batches):
        img_s = (train_throughput(model(channels_last), batches, dtype, args.batches)[0] if kind == "train"
                 else eval_throughput(model(channels_last), device, batches, dtype))
        figures[f"{kind}_{key}_img_s"] = round(img_s, 1)
        layout = "channels_last" if channels_last else "contiguous"
        print(f"{kind:<6}{pipeline:<20}{str(dtype or 'fp32'):<16}{layout:<15}{img_s:>8.0f} img/s", flush=True)

    # The original pipeline first: keep_freed_memory() cannot be undone within a process.
    report("train", "classic_fp32", "classic DataLoader", None, False, train_classic := loader(True, **classic))
    report("eval", "classic_fp32", "classic DataLoader", None, False, loader(False, **classic))
    if kept := device.type == "cpu" and keep_freed_memory():
        report("train", "classic_fp32_kept", "classic, kept mem", None, False, train_classic)
    for key, dtype, cl in [("fast_fp32", None, False), ("fast_fp32_cl", None, True), ("fast_amp", amp, False),
                           ("fast_amp_cl", amp, True)]:
        report("train", key, "fast loader", dtype, cl, loader(True))
    report("eval", "fast_amp_cl", "fast loader", amp, True, loader(False))

    print(f"\neach convolution alone, batch {args.batch_size}, {precision}, channels_last:")
    rows = conv_passes(model(True), device, args.batch_size, amp)
    for name, shape, passes in rows:
        print(f"  {name:<6}{shape:<18}" + "  ".join(f"{what} {s * 1e3:6.2f} ms {gf:6.0f} GFLOP/s"
                                                   for what, (s, gf) in passes.items()))
    conv_seconds = sum(s for _, _, passes in rows for s, _ in passes.values())
    figures["conv_only_ms_per_batch"] = round(conv_seconds * 1e3, 1)
    figures["conv_only_ceiling_img_s"] = ceiling = round(args.batch_size / conv_seconds, 1)
    print(f"  all convolutions: {conv_seconds * 1e3:.1f} ms a batch, so at most {ceiling:.0f} img/s; the fast path "
          f"reached {figures['train_fast_amp_cl_img_s'] / ceiling:.0%} of that\n")
    best, original = f"fast loader + {precision} + channels_last", "vs the original pipeline"
    for key, fast_key, slow_key, what in [
            ("train_speedup_fast_fp32", "train_fast_fp32", "train_classic_fp32", f"fast loader fp32 {original}"),
            ("train_speedup_fast_amp_cl", "train_fast_amp_cl", "train_classic_fp32", f"{best} {original}"),
            ("train_speedup_fast_amp_cl_vs_kept", "train_fast_amp_cl", "train_classic_fp32_kept",
             f"{best} vs classic with kept memory"),
            ("eval_speedup_fast_amp_cl", "eval_fast_amp_cl", "eval_classic_fp32", f"{best} {original}")]:
        if slow_key in figures:  # the kept-memory row is the CPU's alone
            figures[key] = round(figures[f"{fast_key}_img_s"] / figures[f"{slow_key}_img_s"], 2)
            print(f"{key.split('_')[0].replace('eval', 'evaluation')}ing, {what}: {figures[key]:.2f}x", flush=True)
    if args.compile:
        batches = loader(True, fast.batch_size)
        try:
            eager, eager_warmup = train_throughput(model(True), batches, amp, args.batches)
            compiled, compiled_warmup = train_throughput(torch.compile(model(True)), batches, amp, args.batches)
        except Exception as e:  # inductor's errors (no C++ compiler, an unsupported device) have many types
            cli.fail(f"torch.compile failed here ({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}): "
                     "on the CPU it needs a C++ compiler (g++ or clang); leave out --compile", cli.EXIT_FAILED)
        compile_seconds = max(0.0, compiled_warmup - eager_warmup)  # the compiled model's 3 warm-up steps less eager's
        saved_a_step = fast.batch_size / eager - fast.batch_size / compiled
        payback = math.ceil(compile_seconds / saved_a_step) if saved_a_step > 0 else None
        figures["compile"] = {"eager_img_s": round(eager, 1), "compiled_img_s": round(compiled, 1),
                              "compile_seconds": round(compile_seconds, 1), "payback_steps": payback}
        pays = (f"pays back after {payback} steps (a fast run has {fast.epochs * len(batches)})"
                if payback is not None else "never pays back: a compiled step is slower")
        print(f"torch.compile, the training step at the fast recipe's batch {fast.batch_size} ({precision}, "
              f"channels_last): eager {eager:.0f} img/s, compiled {compiled:.0f} img/s after {compile_seconds:.0f} s "
              f"of compiling; {pays}", flush=True)
    if args.time_to_target:
        seconds, acc, final, total = time_to_target(args.target, args.data_dir, args.device)
        figures.update(fast_recipe_seconds_to_target=seconds, fast_recipe_acc_at_target=acc,
                       fast_recipe_final_acc=final, fast_recipe_total_seconds=total, target=args.target)
        print(f"fast recipe: {args.target}% after {seconds} s (final {final}% at {total} s)")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "batch_size": args.batch_size,
               "eval_batch_size": data.TEST_BATCH,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    print(json.dumps({**figures, **machine}), flush=True)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=cli.whole_number(1, config.TRAIN_IMAGES),
                   default=config.RECIPES["seed"].batch_size, help="training batch size (default: the seed recipe's, "
                   "%(default)s; evaluation's is s5.data.TEST_BATCH, 256)")
    p.add_argument("--batches", type=cli.whole_number(MIN_BATCHES), default=60,
                   help="timed training batches per pipeline (fewer lets prefetching flatter the classic loader)")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--data-dir", default=str(mnist.DATA_DIR), help="MNIST root")
    p.add_argument("--workers", type=cli.whole_number(0), default=2, help="classic DataLoader workers (the original 2)")
    p.add_argument("--time-to-target", action="store_true", help="also time the fast recipe to --target (train.py)")
    p.add_argument("--compile", action="store_true", help="also time the training step under torch.compile (inductor)")
    p.add_argument("--target", type=cli.typed("target", config.Field(float, 0, 100, above=True)), default=99.3,
                   help="test accuracy (%%) for --time-to-target (default: 99.3)")
    try:
        with cli.stop_like_ctrl_c():
            args = p.parse_args(argv)
            if args.batches < 4 * args.workers:
                p.error(f"argument --batches: {args.batches} is too few for --workers {args.workers}: the classic "
                        f"loader has {2 * args.workers} batches prefetched when timing starts; give {4 * args.workers}"
                        " or more")
            bench(args)
    except KeyboardInterrupt:
        cli.fail("interrupted", cli.EXIT_INTERRUPTED)
    except UserError as e:
        cli.fail(cli.message(e), e.exit_code)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
