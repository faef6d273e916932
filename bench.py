"""Throughput of the classic and the fast pipeline, side by side in one run on one machine.

    python bench.py                    # training and evaluation img/s, and the ratios
    python bench.py --compile          # also: torch.compile (inductor) against eager, and whether it pays back
    python bench.py --profile          # also: where a fast-path step's time goes, layer by layer (CPU)

Training: s5.loop.train_epoch with the seed recipe's SGD, fed by the original pipeline (DataLoader, PIL augmentation,
2 workers, fp32; on the CPU also with freed memory kept, as runs have it) or the fast loader (fp32 or mixed precision,
contiguous or channels_last); evaluation likewise; each convolution alone, which bounds any pipeline; a JSON line last.
Accuracy and time over seeds: sweep.py. Exit: 0 done, 1 --compile failed, 2 usage/data error, 130 stopped.
"""

import s5.startup  # noqa: F401  # isort: skip  (first: a signal while torch imports is one line, exit 130)
import collections
import itertools
import json
import math
import time
import timeit

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from model import INPUT_SHAPE
from s5 import cli, config, data, errors, evaluation, loop, mnist, optim
from s5.device import amp_dtype_for, get_device, keep_freed_memory, machine, new_net

# The classic loader's 2 workers have 4 batches prefetched when timing starts; with fewer than about ten timed
# batches those free ones, and one step's jitter, make the ratios noise (--batches 1 printed 23x).
MIN_BATCHES = 10
PASSES = {"forward": "torch.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)",
          "grad weight": "torch.autograd.grad(y, w, g, retain_graph=True)",
          "grad input": "torch.autograd.grad(y, x, g, retain_graph=True)"}  # not the first layer's: images need none
# What each op of a step is, for --profile's table; ops not named here are "other ops".
PARTS = {"aten::mkldnn_convolution": "forward", "aten::convolution_backward": "backward",
         "aten::max_pool2d_with_indices": "pool forward", "aten::max_pool2d_with_indices_backward": "pool backward",
         "aten::fill_": "zero-fill", "aten::clamp_min": "ReLU forward", "aten::threshold_backward": "ReLU backward",
         "aten::addmm": "forward, backward", "aten::mm": "forward, backward", "aten::copy_": "casts, copies",
         "aten::_to_copy": "casts, copies", **{f"aten::{op}": "loss" for op in (
             "_log_softmax", "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward")}}
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


def step_profile(model, loader, amp_dtype, batches):
    """{(layer, part): seconds a batch} of `batches` fast-path steps (the table's SGD step) under torch.profiler, from
    each op's own time: convolutions, pools, ReLUs and linear layers by layer (told apart by their weights' and
    outputs' shapes), the loss, the optimizer, the loader; and the Python around the ops; then the seconds a batch."""
    optimizer, _, loss_fn = optim.build_training(model, config.RECIPES["seed"], len(loader))
    step, names = loop.Step(model, optimizer, loss_fn, amp_dtype=amp_dtype), {m: n for n, m in model.named_children()}
    weights, outputs = {tuple(s): n for m, n in names.items() for s in (m.weight.shape, m.weight.shape[::-1])}, {}

    def seen(module, args, out):  # a layer's output (transposed: a linear's gradient), and after a 2x2 pool
        for shape in (out.shape, out.shape[::-1], (*out.shape[:2], *(n // 2 for n in out.shape[2:]))):
            outputs.setdefault(tuple(shape), names[module])
    hooks = [m.register_forward_hook(seen) for m in names]
    stream = itertools.chain.from_iterable(itertools.repeat(loader))
    step(*next(stream))  # the first warm-up step records the shapes
    for hook in hooks:
        hook.remove()
    for x, y in itertools.islice(stream, 2):  # two more warm-up steps
        step(x, y)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(batches):
            with record_function("loader"):
                x, y = next(stream)
            step(x, y)
        wall = time.perf_counter() - start
    seconds = collections.Counter()
    for e in prof.events():
        scope, parent = None, e.cpu_parent
        while parent is not None:
            scope = parent.name if parent.name == "loader" or parent.name.startswith("Optimizer.") else scope
            parent = parent.cpu_parent
        if scope:  # everything within the loader's or the optimizer's call
            key = ("loader", "batch, augmentation") if scope == "loader" else ("optimizer", scope.split("#")[-1])
        elif (part := PARTS.get(e.name, "other ops")) in ("loss", "casts, copies", "other ops"):
            key = (part, "")
        else:  # a layer's, by its weight's shape, else by its output's (a scalar's zero-fill is none's)
            layer = next((d[s] for d in (weights, outputs) for s in map(tuple, e.input_shapes) if s in d), None)
            key = (layer, part) if layer else ("other ops", "")
        seconds[key] += e.self_cpu_time_total / 1e6 / batches
    seconds[("Python, autograd", "outside any op")] = max(0.0, wall / batches - sum(seconds.values()))
    return seconds, wall / batches


def bench(args, device):
    figures = {}
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
    if args.profile:  # the largest first, then the convolutions' share
        loader = data.make_loader(*splits[True], args.batch_size, True, device=device)
        seconds, step = step_profile(new_net(device, True), loader, amp, args.batches)
        print(f"\nwhere a fast-path step's time goes (batch {args.batch_size}, {amp or 'fp32'}, channels_last; "
              f"{step * 1e3:.1f} ms a batch under torch.profiler):")
        for (layer, part), s in sorted(seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {layer:<18}{part:<22}{s * 1e3:8.2f} ms {s / step:6.1%}")
        convs = sum(s for (_, part), s in seconds.items() if part in ("forward", "backward")) / step
        print(f"  convolutions {convs:.0%} of the profiled step, everything else {1 - convs:.0%}\n")
        figures["profile_ms_per_batch"] = {f"{layer} {part}".strip(): round(s * 1e3, 3) for (layer, part), s in
                                           seconds.items()}
    if args.compile:  # the training step at the fast recipe's batch, eager against compiled
        figures["compile"] = compile_figures(device, splits[True], amp, args.batches)
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


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=cli.whole_number(1, config.TRAIN_IMAGES),
                   default=config.RECIPES["seed"].batch_size, help="training batch size (default: the seed recipe's)")
    p.add_argument("--batches", type=cli.whole_number(MIN_BATCHES), default=60, help="timed batches a pipeline")
    cli.add_flags(p, ["device", "data_dir"], {"device": "auto", "data_dir": mnist.DATA_DIR})
    p.add_argument("--compile", action="store_true", help="also time the training step under torch.compile (inductor)")
    p.add_argument("--profile", action="store_true", help="also print where a fast-path step's time goes, layer by "
                   "layer (torch.profiler; CPU only)")
    p.set_defaults(device="auto", data_dir=str(mnist.DATA_DIR))
    args = p.parse_args(argv)
    try:
        with cli.stop_like_ctrl_c():
            device = get_device(args.device)
            if args.profile and device.type != "cpu":
                p.error("--profile times the CPU's ops: add --device cpu")
            bench(args, device)
    except KeyboardInterrupt:
        cli.fail("interrupted", cli.EXIT_INTERRUPTED)
    except errors.UserError as e:
        cli.fail(cli.message(e), e.exit_code)


if __name__ == "__main__":
    main()
