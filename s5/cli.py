"""What the command-line entry points share: argument types that refuse impossible values, help text with
defaults, and one way to fail.

Exit codes, the same for every entry point: 0 done; 1 the run failed part-way (diverged, could not write) or
some inputs could not be used (predict.py); 2 a usage or data error, found before any work; 130 interrupted.
"""

import argparse
import contextlib
import math
import signal
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse help with each flag's default, except where there is none to show (None, off)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def whole_number(low, high=None):
    """An argparse type: an int in [low, high]; argparse names the flag in its error."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {low} to {high}" if high is not None
                                             else f"{value} is out of range: give {low} or more")
        return value
    parse.__name__ = "whole number"
    return parse


def positive_number(text):
    """An argparse type: a finite float above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a number above 0")
    return value


positive_number.__name__ = "number"


FLAG_OF = {"name": "--recipe"}  # configuration fields whose flag is not --field-name


def flag(field):
    """The command-line flag of a configuration field: batch_size -> --batch-size."""
    return FLAG_OF.get(field, "--" + field.replace("_", "-"))


def config_message(error):
    """A ConfigError in the CLI's words: the flag, then what is wrong with its value."""
    return f"argument {flag(error.field)}: {error.reason}"


def fail(message, code=EXIT_USAGE, speak=True):
    """Print `error: message` as one line on stderr and exit with `code`. speak=False exits with the code alone
    (the other processes of a torchrun group: rank 0 speaks for them)."""
    if speak:
        text = " ".join(str(message).split())  # one line, whatever the message held
        print(f"error: {text}", file=sys.stderr)
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


def output_error_message(error):
    return f"{error}: {OUT_ADVICE.get(error.kind, 'give --out a writable folder').format(path=error.path)}"


def stopped_message(error, lr, device):
    """(one line, exit code) for a run that ended early (s5.run.RunStoppedError): what was kept, how to go on."""
    if error.last is not None:
        hint = f"; the last finished epoch is safe in {error.last}: continue with python train.py --resume {error.last}"
    else:
        hint = f" before the first epoch ended, so nothing was saved: run again (--out {error.folder} can be reused)"
    if error.reason == "interrupted":
        return f"interrupted{hint}", EXIT_INTERRUPTED
    if error.reason == "out_of_memory":
        other = "" if device == "cpu" else " (or --device cpu, where memory is larger)"
        return f"{error.cause}: try a smaller --batch-size{other}{hint}", EXIT_FAILED
    if error.reason == "diverged":
        return f"{error.cause} (try a new run with --lr below {lr:g}){hint}", EXIT_FAILED
    return f"{error.cause}{hint}", EXIT_FAILED


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: argument --epochs: ...`) with exit code 2."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


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
