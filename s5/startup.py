"""Imported first by every entry point: until the program sets its own handlers, Ctrl-C, SIGTERM or SIGHUP (while
torch imports, a second or two) end it at once with one line and exit 130. Nothing has been done yet, so nothing is
lost; `cli.stop_like_ctrl_c` takes over when the work starts. Imports nothing heavy, so it is in place at once."""

import os
import signal

from s5.errors import EXIT_INTERRUPTED


def stop(signum, frame):
    os.write(2, b"error: interrupted while starting; nothing was done\n")
    os._exit(EXIT_INTERRUPTED)


for _signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_signal, stop)
