"""Seeds as a measurement: one configuration trained with N seeds, one run after another, and summarised.

A recipe's accuracy is a distribution over seeds, not one number: `sweep` trains the configuration once per seed
(each a whole `s5.run.Run` in its own folder), and `summary` gives the mean, standard deviation, minimum and how
many runs reached a target. `estimate_seconds` times a few training steps first, so the caller can say how long
the sweep will take before it starts.
"""

import itertools
import logging
import statistics
import time
from dataclasses import replace

import torch

from model import Net
from s5 import distributed, loop, optim
from s5.data import make_loaders
from s5.device import amp_dtype_for, channels_last_for, keep_freed_memory, set_seed
from s5.run import Run


def estimate_seconds(config, device, seeds, timed_steps=8):
    """Seconds `seeds` runs of `config` should take here: a few timed training steps, scaled to the run's steps
    (evaluation counted as a training step per 3 batches' worth of images: a forward pass, no backward)."""
    set_seed(config.seed)
    if device.type == "cpu":
        keep_freed_memory()
    model = Net().to(device)
    if channels_last_for(device, config.channels_last):
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, test_loader = make_loaders(replace(config, loader="fast"), device, distributed.SINGLE)
    optimizer, _, loss_fn = optim.build_training(model, config.recipe, len(train_loader))
    step = loop.Step(model, optimizer, loss_fn, amp_dtype=amp_dtype_for(device, config.amp))
    batches = itertools.islice(itertools.cycle(train_loader), 3 + timed_steps)
    loop.train_epoch(step, itertools.islice(batches, 3), progress=False)  # warm-up
    start = time.perf_counter()
    loop.train_epoch(step, batches, progress=False)
    per_step = (time.perf_counter() - start) / timed_steps
    evaluated = len((val_loader or test_loader).dataset) + (len(test_loader.dataset) if val_loader else 0)
    return seeds * per_step * config.epochs * (len(train_loader) + evaluated / config.recipe.batch_size / 3)


class _Lines(logging.Handler):
    """The library's log lines of one run, kept for its log file."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage())


def sweep(config, device, seeds, sweep_dir, on_run=None):
    """Train `config` once per seed in `seeds`, each in `sweep_dir`/seed-N (`sweep_dir` a claimed s5.files.RunDir,
    which also gets each run's log lines as seed-N.log). Returns one dict a run: seed, test_acc, val_acc (the last
    epoch's, with a validation split), seconds (the run's elapsed_seconds: data, training and every evaluation),
    wall_seconds (also the final plots and files) and folder; `on_run(row)` is called as each run ends."""
    results, logger = [], logging.getLogger("s5")
    for seed in seeds:
        lines, started = _Lines(), time.perf_counter()
        logger.addHandler(lines)
        try:
            with Run(replace(config, seed=seed, out=str(sweep_dir.path / f"seed-{seed}"), progress=False),
                     device) as run:
                run.fit()
        finally:
            logger.removeHandler(lines)
            sweep_dir.write(f"seed-{seed}.log", "".join(line + "\n" for line in lines.lines).encode())
        history = run.history
        results.append({"seed": seed, "test_acc": run.test_acc,
                        "val_acc": history["val_acc"][-1] if "val_acc" in history else None,
                        "seconds": round(history["elapsed_seconds"][-1], 1),
                        "wall_seconds": round(time.perf_counter() - started, 1), "folder": str(run.folder)})
        if on_run is not None:
            on_run(results[-1])
    return results


def summary(values, target):
    """mean, std (sample; 0 for one value), min, max, and how many reach `target`, of `values`."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "reached": sum(v >= target - 1e-9 for v in values), "target": target}


def format_summary(name, stats):
    return (f"{name}: mean {stats['mean']:.2f}% ± {stats['std']:.2f}, min {stats['min']:.2f}%, max "
            f"{stats['max']:.2f}%; {stats['reached']} of {stats['n']} reached {stats['target']:g}%")
