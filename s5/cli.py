"""What the command-line entry points share: flags made from the configuration's fields, one way to fail, what is
shown (rank 0 speaks), and signals that stop a program as Ctrl-C does.

Exit codes, the same for every entry point: 0 done; 1 the run failed part-way (diverged, could not write) or
some inputs could not be used (predict.py); 2 a usage or data error, found before any work; 130 interrupted.
"""

import argparse
import contextlib
import logging
import signal
import sys

import torch

from s5.config import FIELDS, Field
from s5.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConfigError  # noqa: F401 (re-exported)

FLAG_OF = {"name": "--recipe"}  # fields whose flag is not --field-name


def flag(field):
    """The command-line flag of a configuration field: batch_size -> --batch-size."""
    return FLAG_OF.get(field, "--" + field.replace("_", "-"))


def typed(name, field):
    """An argparse type for `field`: the text parsed as its kind, then checked by it (argparse names the flag)."""
    def parse(text):
        try:
            return field.parse(name, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(e.reason) from None
    parse.__name__ = field.kind.__name__
    return parse


def add_flags(parser, names, defaults=None):
    """A flag for each configuration field in `names`, with its type, range and help from FIELDS; `defaults`
    (field: value) are shown in the help, as the run will take them."""
    for name in names:
        field, default = FIELDS[name], (defaults or {}).get(name)
        shown = f" (default: {default})" if default is not None else ""
        if field.kind is bool:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, help=field.help + shown)
        elif field.choices:
            parser.add_argument(flag(name), dest=name, choices=field.choices, help=field.help + shown)
        else:
            parser.add_argument(flag(name), dest=name, type=typed(name, field) if field.kind is not str else None,
                                help=field.help + shown)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: argument --epochs: ...`) with exit code 2."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def message(error):
    """A UserError in the command line's words: a field's flag first, an output folder's remedy last."""
    if isinstance(error, ConfigError):
        return f"argument {flag(error.field)}: {error.reason}"
    advice = OUT_ADVICE.get(getattr(error, "kind", None))
    return f"{error}: {advice.format(path=error.path)}" if advice else str(error)


def fail(text, code=EXIT_USAGE, speak=True):
    """Print `error: text` as one line on stderr and exit with `code`. speak=False exits with the code alone
    (the other processes of a torchrun group: rank 0 speaks for them)."""
    if speak:
        print("error: " + " ".join(str(text).split()), file=sys.stderr)
    raise SystemExit(code)


# What to do about a run folder that cannot be claimed (s5.files.OutputError's kind), in flags.
OUT_ADVICE = {
    "not_a_folder": "give --out a folder name",
    "unwritable": "give --out a writable place",
    "not_empty": "give --out a new or empty folder",
    "holds_run": "resume it with --resume {path}/last.pt, or pick another --out",
    "busy": "wait for it, or pick another --out",
    "not_this_run": "continue the run in a new or empty folder with --out DIR",
    "not_latest": "resume {path} instead, or continue from this checkpoint in a new folder with --out DIR",
}


def stopped_message(error, run):
    """(one line, exit code) for a run that ended early with `error`: what was kept, and how to go on."""
    last = run.last_checkpoint
    if last is not None:
        hint = f"; the last finished epoch is safe in {last}: continue with python train.py --resume {last}"
    else:
        hint = f" before the first epoch ended, so nothing was saved: run again (--out {run.folder} can be reused)"
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted{hint}", EXIT_INTERRUPTED
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        other = "" if run.device.type == "cpu" else " (or --device cpu, where memory is larger)"
        return (f"out of memory on {run.device} with batch size {run.config.recipe.batch_size}: try a smaller "
                f"--batch-size{other}{hint}"), EXIT_FAILED
    if isinstance(error, FloatingPointError):  # loop.TrainingDivergedError
        return f"{error} (try a new run with --lr below {run.config.recipe.lr:g}){hint}", EXIT_FAILED
    return f"{error}{hint}", EXIT_FAILED


class _Stdout(logging.StreamHandler):
    """Log lines to whatever sys.stdout is when they are written (a notebook's cell, pytest's capture)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def show_logs(speak=True, level=logging.INFO):
    """What this process shows, decided once: the s5 library's lines from `level` on stdout and its warnings on
    stderr as `warning: ...`, when it speaks (rank 0); errors alone otherwise. The logger itself keeps every line
    for other handlers (a sweep's per-run log). Called again, it only changes the levels."""
    logger = logging.getLogger("s5")
    logger.setLevel(logging.INFO if speak else logging.ERROR)
    logger.propagate = False
    out = next((h for h in logger.handlers if isinstance(h, _Stdout)), None)
    if out is None:
        out, err = _Stdout(), logging.StreamHandler()  # stderr, looked up when the handler is made
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        err.setLevel(logging.WARNING)
        err.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(out)
        logger.addHandler(err)
    out.setLevel(level)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a job scheduler's or torchrun's stop; a closed terminal


@contextlib.contextmanager
def stop_like_ctrl_c():
    """Within the block, SIGTERM and SIGHUP stop this process as Ctrl-C does (a KeyboardInterrupt), so every entry
    point ends them cleanly, with its one line and exit code 130; the previous handlers come back after it."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def whole_number(low, high=None):
    """An argparse type for a whole number from `low` (to `high`): a flag that is no configuration field."""
    return typed("number", Field(int, low, high))
