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


def fail(message, code=EXIT_USAGE):
    """Print `error: message` as one line on stderr and exit with `code`."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"error: {text}", file=sys.stderr)
    raise SystemExit(code)


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
