"""What the entry points share: flags made from the configuration's fields, one-line errors, what is shown (rank 0
speaks), signals that stop a program as Ctrl-C does, and exit codes: 0 done; 1 the run failed part-way (diverged,
could not write) or some inputs could not be used (predict.py); 2 a usage or data error, found before any work; 130
interrupted."""

import argparse
import contextlib
import logging
import signal
import sys

import torch

from s5.config import FIELDS, Field
from s5.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConfigError  # noqa: F401 (re-exported)


def flag(field):
    """The command-line flag of a configuration field: batch_size -> --batch-size; name -> --recipe."""
    return "--recipe" if field == "name" else "--" + field.replace("_", "-")


def typed(name, field):
    """An argparse type for `field`: the text parsed as its kind, then checked by it (argparse names the flag)."""
    def parse(text):
        try:
            return field.parse(name, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(e.reason) from None
    return parse


def whole_number(low, high=None):
    """An argparse type for a whole number from `low` (to `high`): a flag that is no configuration field."""
    return typed("number", Field(int, low, high))


def add_flags(parser, names, defaults=None):
    """A flag for each field in `names`, its type, range and help from FIELDS; `defaults` (field: value) shown."""
    for name in names:
        field, default = FIELDS[name], (defaults or {}).get(name)
        how = {"action": argparse.BooleanOptionalAction} if field.kind is bool else \
            {"choices": field.choices or None, "type": None if field.kind is str else typed(name, field)}
        shown = f" (default: {default})" if default is not None else ""
        parser.add_argument(flag(name), dest=name, help=field.help + shown, **how)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: argument --epochs: ...`) with exit code 2."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


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


def message(error):
    """A UserError in the command line's words: a field's flag first, an output folder's remedy last."""
    if isinstance(error, ConfigError):
        return f"argument {flag(error.field)}: {error.reason}"
    advice = OUT_ADVICE.get(getattr(error, "kind", None))
    return f"{error}: {advice.format(path=error.path)}" if advice else str(error)


def stopped_message(error, run):
    """(one line, exit code) for a run that ended early with `error`: what was kept, and how to go on."""
    last = run.last_checkpoint
    kept = (f"; the last finished epoch is safe in {last}: continue with python train.py --resume {last}" if last else
            f" before the first epoch ended, so nothing was saved: run again (--out {run.folder} can be reused)")
    if isinstance(error, KeyboardInterrupt):
        return "interrupted" + kept, EXIT_INTERRUPTED
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        other = "" if run.device.type == "cpu" else " (or --device cpu, where memory is larger)"
        error = f"out of memory on {run.device} with batch size {run.config.recipe.batch_size}: try a smaller " \
                f"--batch-size{other}"
    elif isinstance(error, FloatingPointError):  # loop.TrainingDivergedError
        error = f"{error} (try a new run with --lr below {run.config.recipe.lr:g})"
    return f"{error}{kept}", EXIT_FAILED


class _Screen(logging.StreamHandler):
    """Log lines on whatever sys.stdout is when they are written (a notebook's cell, pytest's capture); warnings and
    errors on sys.stderr, as `warning: ...`."""

    def emit(self, record):
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)

    def format(self, record):
        return ("warning: " if record.levelno >= logging.WARNING else "") + super().format(record)


def show_logs(speak=True, level=logging.INFO):
    """Show the s5 library's lines from `level` (INFO or WARNING) when this process speaks (rank 0), else errors alone.
    The logger keeps every line for other handlers (a sweep's per-run log); called again, only the levels change."""
    logger = logging.getLogger("s5")
    logger.setLevel(logging.INFO if speak else logging.ERROR)
    logger.propagate = False
    screen = next((h for h in logger.handlers if isinstance(h, _Screen)), None)
    if screen is None:
        screen = _Screen()
        logger.addHandler(screen)
    screen.setLevel(level)


@contextlib.contextmanager
def stop_like_ctrl_c(signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    """Within the block, Ctrl-C, SIGTERM and SIGHUP (a job scheduler's or torchrun's stop; a closed terminal) raise
    a KeyboardInterrupt, whatever handled them before: every entry point ends them with its one line and exit 130."""
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    try:
        yield
    finally:
        startup = sys.modules.get("s5.startup")  # imported by the entry points only (it sets handlers on import)
        for sig, handler in previous.items():
            if startup and handler is startup.stop:  # start-up is over: Python's own handlers
                handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler)
