"""The one kind of user error: something the user can fix, said in one line, with the exit code to end on.

Every module raises a subclass of `UserError` for what a user gave (a flag, a file, a folder, a checkpoint) and
anything else for a bug. The entry points print a UserError as `error: <message>` and exit with its `exit_code`;
everything else keeps its traceback. `field` names the setting at fault, so the command line can name its flag.
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """A value, file or folder the user can fix. `field` (or None) is the setting at fault."""

    exit_code = EXIT_USAGE

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field

    def __str__(self):
        return self.args[0]


def first_line(error, limit=200):
    """The first line of an exception's message (its type's name if it has none), for a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class ConfigError(UserError, ValueError):
    """A setting's value is impossible; `field` names it (the CLI turns it into a flag), `reason` says why."""

    def __init__(self, field, reason):
        super().__init__(f"{field}: {reason}", field)
        self.reason = reason
