"""A recipe's accuracy over seeds: the same configuration trained with N seeds, one run after another, summarised.

    python sweep.py --recipe fast --seeds 10                    # test accuracy: mean ± std, min, max, seconds a run
    python sweep.py --recipe best --seeds 5 --val-split 10000   # choices made on validation, the test set read once

Runs go in runs/sweep-<recipe>-<time>/seed-N (each a whole run's folder, its log in seed-N.log). Prints each run's
figures as it ends, then the summary, then one JSON line with every figure, the configuration and the machine.
Exit status: 0 done, 1 a run failed, 2 usage or data error, 130 interrupted (the finished runs are summarised).
"""

import s5.startup  # noqa: F401  # isort: skip  (first: a signal while torch imports is one line, exit 130)
import json
import logging.handlers
import statistics
import sys
import time
from dataclasses import replace

import matplotlib
import torch

from s5 import cli, config, data, distributed, errors, files, loop
from s5.device import amp_dtype_for, cpu_name, get_device, keep_freed_memory, machine, new_net
from s5.run import Run

RUN_FIELDS = ("train_subset", "val_split", "device", "data_dir", "loader", "amp")
TIMED_STEPS = 8


def main(argv=None):
    matplotlib.use("Agg")
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=cli.whole_number(1, 1000), default=5, help="how many seeds (default: 5)")
    p.add_argument("--first-seed", type=cli.whole_number(0, 2**32 - 1000), default=1, help="first seed (default: 1)")
    p.add_argument("--target", type=cli.typed("target", config.Field(float, 0, 100, above=True)), default=99.3,
                   help="test accuracy (%%) a run should reach (default: 99.3)")
    cli.add_flags(p, ["name"], {"name": "fast"})
    cli.add_flags(p.add_argument_group("the recipe's values (default: the recipe's)"), config.RECIPE_FIELDS)
    cli.add_flags(p, RUN_FIELDS)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    first, count, target = given.pop("first_seed"), given.pop("seeds"), given.pop("target")
    cli.show_logs(level=logging.WARNING)  # the runs' lines go to their seed-N.log; the screen shows warnings
    results = []
    try:
        with cli.stop_like_ctrl_c():
            run_config = config.RunConfig.build(given.pop("name", "fast"), progress=False, **given)
            device = get_device(run_config.device)
            seconds = estimate_seconds(run_config, device, count)
            folder = files.RunDir.claim_new(config.RUNS_DIR, f"sweep-{run_config.name}-{files.timestamp()}")
            try:
                print(f"{count} runs of {run_config.name} on {cpu_name() if device.type == 'cpu' else device}: about "
                      f"{seconds / 60:.0f} min (from {TIMED_STEPS} timed steps); runs in {folder.path}/", flush=True)
                sweep(run_config, device, range(first, first + count), folder, results)
            finally:
                folder.release()
                report(results, run_config, target, device)  # the finished runs are real measurements, however it ended
    except KeyboardInterrupt:
        cli.fail(f"interrupted after {len(results)} of {count} runs", cli.EXIT_INTERRUPTED)
    except (errors.UserError, FloatingPointError, MemoryError, torch.OutOfMemoryError) as e:  # refused, diverged, OOM
        text = cli.message(e) if isinstance(e, errors.UserError) else str(e)
        cli.fail(f"a run stopped after {len(results)} of {count} runs: {text}" if results else text,
                 getattr(e, "exit_code", cli.EXIT_FAILED))
    return cli.EXIT_OK


def estimate_seconds(run_config, device, seeds):
    """Seconds `seeds` runs should take here: a few training steps timed on the fast loader, scaled to a run's images
    (evaluating an image counted as a third of training one: a forward pass, no backward)."""
    if device.type == "cpu":
        keep_freed_memory()  # as the runs have it
    train, val, test = data.make_loaders(replace(run_config, loader="fast"), device, distributed.SINGLE)
    net = new_net(device, run_config.channels_last)
    img_s, _ = loop.train_throughput(net, train, amp_dtype_for(device, run_config.amp), TIMED_STEPS, run_config.recipe)
    evaluated = sum(len(loader.dataset) for loader in (val, test) if loader is not None)
    return seeds * run_config.epochs * (train.epoch_size + evaluated / 3) / img_s  # (the images an epoch trains on)


def sweep(run_config, device, seeds, folder, results):
    """Train `run_config` once per seed, in `folder`/seed-N (a claimed s5.files.RunDir) with the run's log lines in
    seed-N.log; each finished run's figures are printed and added to `results`."""
    logger = logging.getLogger("s5")
    for seed in seeds:
        lines, started = logging.handlers.BufferingHandler(sys.maxsize), time.perf_counter()  # keeps every record
        logger.addHandler(lines)
        try:
            with Run(replace(run_config, seed=seed, out=str(folder.path / f"seed-{seed}")), device) as run:
                run.fit()
        finally:
            logger.removeHandler(lines)
            folder.write(f"seed-{seed}.log", "".join(("warning: " if r.levelno >= logging.WARNING else "")
                                                     + r.getMessage() + "\n" for r in lines.buffer).encode())
        val = run.history["val_acc"][-1] if "val_acc" in run.history else None  # the last epoch's
        results.append({"seed": seed, "test_acc": run.test_acc, "val_acc": val, "folder": str(run.folder),
                        "seconds": round(run.history["elapsed_seconds"][-1], 1),  # data, training, evaluations
                        "wall_seconds": round(time.perf_counter() - started, 1)})  # also the final plots and files
        shown = f", validation {val:.2f}%" if val is not None else ""
        print(f"seed {seed}: test {run.test_acc:.2f}%{shown}, {results[-1]['seconds']:.0f} s", flush=True)


def report(results, run_config, target, device):
    """The finished runs' summary (mean, sample std, min, max, how many reached `target`), then the JSON line."""
    if not results:
        return
    stats = {}
    for key, name in (("val_acc", "validation"), ("test_acc", "test")):
        accs = [r[key] for r in results]
        if None in accs:  # no validation split
            continue
        s = stats[key] = {"n": len(accs), "mean": statistics.fmean(accs),
                          "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs),
                          "reached": sum(a >= target - 1e-9 for a in accs), "target": target}
        print(f"{name}: mean {s['mean']:.2f}% ± {s['std']:.2f}, min {s['min']:.2f}%, max {s['max']:.2f}%; "
              f"{s['reached']} of {s['n']} reached {target:g}%")
    seconds = [r["seconds"] for r in results]
    stats["seconds"] = {"mean": statistics.fmean(seconds), "min": min(seconds), "max": max(seconds)}
    print(f"seconds a run: mean {stats['seconds']['mean']:.0f}, min {min(seconds):.0f}, max {max(seconds):.0f}")
    config = {k: v for k, v in run_config.to_dict().items() if k not in ("seed", "out")}
    print(json.dumps({"config": config, "seeds": [r["seed"] for r in results], "runs": results, **stats,
                      **machine(device)}, allow_nan=False), flush=True)


if __name__ == "__main__":
    main()
