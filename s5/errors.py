"""The one kind of user error: something the user gave (a flag, a file, a folder) is wrong, said in one line. The
entry points print a UserError as `error: <message>` and exit with its `exit_code`; anything else is a bug and keeps
its traceback."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """A value, file or folder the user can fix; the message is the line shown."""
    exit_code = EXIT_USAGE


def first_line(error, limit=200):
    """The first line of an exception's message (its type's name if it has none), for a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class ConfigError(UserError, ValueError):
    """A setting's value is impossible: `field` names it (the CLI turns it into a flag), `reason` says why."""

    def __init__(self, field, reason):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason
