"""A recipe's accuracy over seeds: the same configuration trained with N seeds, one run after another, summarised.

    python sweep.py --recipe fast --seeds 10                    # test accuracy: mean ± std, min, max, seconds a run
    python sweep.py --recipe best --seeds 5 --val-split 10000   # choices made on validation, the test set read once

Runs go in runs/sweep-<recipe>-<time>/seed-N (each a whole run's folder, its log in seed-N.log). Prints each run's
figures as it ends, then the summary, then one JSON line with every figure, the configuration and the machine.
Exit status: 0 done, 1 a run failed, 2 usage or data error, 130 interrupted (the finished runs are summarised).
"""

import json
import logging
import os
from dataclasses import replace

import matplotlib
import torch

from s5 import cli, config, files, sweep
from s5.config import Field
from s5.device import cpu_name, get_device
from s5.errors import UserError

RUN_FIELDS = ("train_subset", "val_split", "device", "data_dir", "loader", "amp")


def build_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=cli.whole_number(1, 1000), default=5, help="how many seeds (default: 5)")
    p.add_argument("--first-seed", type=cli.whole_number(0, 2**32 - 1000), default=1, help="first seed (default: 1)")
    p.add_argument("--target", type=cli.typed("target", Field(float, 0, 100, above=True)), default=99.3,
                   help="test accuracy (%%) a run should reach (default: 99.3)")
    cli.add_flags(p, ["name"], {"name": "fast"})
    cli.add_flags(p.add_argument_group("the recipe's values (default: the recipe's)"), config.RECIPE_FIELDS)
    cli.add_flags(p, RUN_FIELDS)
    return p


def main(argv=None):
    matplotlib.use("Agg")
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    first, count, target = given.pop("first_seed"), given.pop("seeds"), given.pop("target")
    seeds = range(first, first + count)
    cli.show_logs(level=logging.WARNING)  # the runs' lines go to their seed-N.log; the screen shows warnings
    results, run_config, device = [], None, None
    try:
        with cli.stop_like_ctrl_c():
            run_config = config.RunConfig.build(given.pop("name", "fast"), progress=False, **given)
            device = get_device(run_config.device)
            seconds = sweep.estimate_seconds(run_config, device, count)
            folder = files.RunDir.claim_new(config.RUNS_DIR, f"sweep-{run_config.name}-{files.timestamp()}")
            with_folder(folder, run_config, device, seeds, seconds, results)
    except KeyboardInterrupt:
        report(results, run_config, target, device)
        cli.fail(f"interrupted after {len(results)} of {count} runs", cli.EXIT_INTERRUPTED)
    except (UserError, FloatingPointError, MemoryError, torch.OutOfMemoryError) as e:  # refused, diverged, no memory
        report(results, run_config, target, device)  # the finished runs are real measurements
        text = cli.message(e) if isinstance(e, UserError) else str(e)
        cli.fail(f"a run stopped after {len(results)} of {count} runs: {text}" if results else text,
                 getattr(e, "exit_code", cli.EXIT_FAILED))
    report(results, run_config, target, device)
    return cli.EXIT_OK


def with_folder(folder, run_config, device, seeds, seconds, results):
    try:
        print(f"{len(seeds)} runs of {run_config.name} on {cpu_name() if device.type == 'cpu' else device}: about "
              f"{seconds / 60:.0f} min (from 8 timed steps); runs in {folder.path}/", flush=True)
        sweep.sweep(replace(run_config, out=None), device, seeds, folder, on_run=lambda row: show(row, results))
    finally:
        folder.release()


def show(row, results):
    results.append(row)
    val = f", validation {row['val_acc']:.2f}%" if row["val_acc"] is not None else ""
    print(f"seed {row['seed']}: test {row['test_acc']:.2f}%{val}, {row['seconds']:.0f} s", flush=True)


def report(results, run_config, target, device):
    """The summary of the finished runs, and one JSON line with every figure and the machine."""
    if not results:
        return
    stats = {"test_acc": sweep.summary([r["test_acc"] for r in results], target)}
    if run_config.val_split:
        stats["val_acc"] = sweep.summary([r["val_acc"] for r in results], target)
        print(sweep.format_summary("validation", stats["val_acc"]))
    print(sweep.format_summary("test", stats["test_acc"]))
    seconds = [r["seconds"] for r in results]
    stats["seconds"] = {"mean": sum(seconds) / len(seconds), "min": min(seconds), "max": max(seconds)}
    print(f"seconds a run: mean {stats['seconds']['mean']:.0f}, min {stats['seconds']['min']:.0f}, max "
          f"{stats['seconds']['max']:.0f}")
    config = {k: v for k, v in run_config.to_dict().items() if k not in ("seed", "out")}
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps({"config": config, "seeds": [r["seed"] for r in results], "runs": results, **stats, **machine},
                     allow_nan=False), flush=True)


if __name__ == "__main__":
    main()
