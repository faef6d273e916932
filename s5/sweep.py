"""Seeds as a measurement: one configuration trained with N seeds, one run after another, and summarised.

A recipe's accuracy is a distribution over seeds, not one number: `sweep` runs the configuration once per seed
(each a whole `s5.run.run` in its own folder), and `summary` gives the mean, standard deviation, minimum and how
many runs reached a target. `estimate_seconds` times a few training steps first, so the caller can say how long
the sweep will take before it starts.
"""

import contextlib
import io
import itertools
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model import Net
from s5 import engine
from s5.device import amp_dtype_for, channels_last_for, keep_freed_memory, set_seed
from s5.run import make_loaders, run


def estimate_seconds(config, device, seeds, timed_steps=8):
    """Seconds `seeds` runs of `config` should take here: a few timed training steps, scaled to the run's steps
    (evaluation counted as a training step per 3 batches' worth of images: a forward pass, no backward)."""
    set_seed(config.seed)
    if device.type == "cpu":
        keep_freed_memory()
    model = Net().to(device)
    if channels_last_for(device, config.channels_last):
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, test_loader = make_loaders(replace(config, loader="fast"), device, engine.SINGLE)
    optimizer, _, criterion = engine.build_training(model, config.recipe, len(train_loader))
    amp_dtype = amp_dtype_for(device, config.amp)
    batches = itertools.islice(itertools.cycle(train_loader), 3 + timed_steps)
    warm = itertools.islice(batches, 3)
    engine.train_epoch(model, warm, optimizer, criterion, device=device, amp_dtype=amp_dtype, progress=False)
    start = time.perf_counter()
    engine.train_epoch(model, batches, optimizer, criterion, device=device, amp_dtype=amp_dtype, progress=False)
    per_step = (time.perf_counter() - start) / timed_steps
    evaluated = len((val_loader or test_loader).dataset) + (len(test_loader.dataset) if val_loader else 0)
    eval_steps = evaluated / config.recipe.batch_size / 3
    return seeds * per_step * (config.epochs * (len(train_loader) + eval_steps))


def sweep(config, device, seeds, folder, progress=True):
    """Train `config` once per seed in `seeds`, into `folder`/seed-N; returns one dict a run: seed, test_acc,
    val_acc (the last epoch's, with a validation split), seconds (the run's elapsed_seconds: data, training and
    every evaluation), wall_seconds (also the final plots and files) and folder.

    The runs' own output goes to `folder`/seed-N.log; a progress bar counts the runs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    bar = tqdm(list(seeds), desc="seeds", disable=not progress, dynamic_ncols=True)
    for seed in bar:
        log, started = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stdout(log):
            result = run(replace(config, seed=seed, out=str(folder / f"seed-{seed}"), progress=False), device)
        wall = time.perf_counter() - started
        (folder / f"seed-{seed}.log").write_text(log.getvalue())
        history = result.history
        row = {"seed": seed, "test_acc": result.test_acc,
               "val_acc": history["val_acc"][-1] if "val_acc" in history else None,
               "seconds": round(history["elapsed_seconds"][-1], 1), "wall_seconds": round(wall, 1),
               "folder": str(result.folder)}
        results.append(row)
        bar.set_postfix(last=f"{result.test_acc:.2f}%")
    return results


def summary(values, target):
    """mean, std (sample; 0 for one value), min, max, and how many reach `target`, of `values`."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "reached": sum(v >= target - 1e-9 for v in values), "target": target}


def format_summary(name, stats):
    return (f"{name}: mean {stats['mean']:.2f}% ± {stats['std']:.2f}, min {stats['min']:.2f}%, max "
            f"{stats['max']:.2f}%; {stats['reached']} of {stats['n']} reached {stats['target']:g}%")

