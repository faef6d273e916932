"""Files a run writes, so that nothing is lost: atomic writes, and run folders claimed by one run (`RunDir`), whose
files are written through the folder's descriptor, never through a link; nothing the run did not write is removed."""

import contextlib
import fcntl
import os
import secrets
import stat
import time
from pathlib import Path

from s5.errors import UserError, first_line


class OutputError(UserError, OSError):
    """A file or folder of the run cannot be written or claimed; `kind` says why, for the entry point's advice:
    "unwritable", "not_a_folder", "not_empty", "holds_run", "busy", "not_this_run" or "write" (a file of the run)."""

    def __init__(self, message, kind="write", path=None):
        super().__init__(message)
        self.kind, self.path = kind, path


def _reason(error):
    return error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)


def atomic_write(path, write, *, dir_fd=None, tag=None):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`: a crash or kill -9
    at any moment leaves the old file or the new one. A failed write removes its temporary and raises OutputError
    (Ctrl-C passes on). `dir_fd`: `path`'s folder, open, to write through; `tag` marks a run's temporaries (`claim`)."""
    path, fd, opened = Path(path), None, None
    tmp = f".{path.name}.{tag + '.' if tag else ''}{secrets.token_hex(4)}.tmp"
    try:
        if dir_fd is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            dir_fd = opened = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Created exclusively, never through a link; 0o666 less the umask: the usual permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it the file
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a link there, never follows it
        with contextlib.suppress(OSError):  # and the folder, so that the rename itself is durable where the OS allows
            os.fsync(dir_fd)
    except BaseException as e:
        if fd is not None:
            _remove(tmp, dir_fd)
        if isinstance(e, Exception) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {path} ({_reason(e)})", path=path) from e
        raise
    finally:
        if opened is not None:
            os.close(opened)


MARKER = ".s5-run"  # marks a folder as one run's: "run <id>" on its first line; locked while a process runs it


class RunDir:
    """An output folder claimed by this process for one run until `release()`: its marker (MARKER) names the run and is
    locked by the OS, so a killed run frees it at once. `claim` takes a new or empty folder (a killed run's that saved
    nothing counts) or, with `run_id`, that run's, and removes only its temporaries (atomic_write's `tag`)."""

    def __init__(self, path, dir_fd, lock_fd, run_id, created_marker):
        self.path, self._dir, self._lock, self.run_id = Path(path), dir_fd, lock_fd, run_id
        self._created_marker, self.wrote = created_marker, False

    @classmethod
    def claim(cls, path, run_id=None):
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileExistsError, NotADirectoryError):
            raise OutputError(f"{path} is a file, not a folder", "not_a_folder", path) from None
        except OSError as e:
            raise OutputError(f"cannot create the output folder {path} ({_reason(e)})", "unwritable", path) from None
        with contextlib.ExitStack() as undo:  # on failure: what was opened is closed, a marker made is removed
            undo.callback(os.close, dir_fd)
            lock_fd, created = _lock_marker(path, dir_fd, run_id, undo)
            first = os.pread(lock_fd, 256, 0).decode("ascii", "replace").split("\n", 1)[0].split()  # "run <id>"
            old_id = first[1] if len(first) == 2 and first[0] == "run" and first[1].isalnum() else None
            entries = [e for e in os.listdir(dir_fd) if e != MARKER]
            leftovers = [e for e in entries if old_id and e[0] == "." and e.endswith(".tmp") and f".{old_id}." in e]
            if run_id is not None and old_id != run_id:
                why = "no run marker" if created else "its marker names another run"
                raise OutputError(f"{path} is not the folder of the run being resumed ({why})", "not_this_run", path)
            if run_id is None and len(leftovers) < len(entries):
                held = "last.pt" in entries
                shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
                raise OutputError(f"{path} already holds a run" if held else f"{path} is not empty (it holds {shown})",
                                  "holds_run" if held else "not_empty", path)
            for entry in leftovers:
                _remove(entry, dir_fd)
            new_id = run_id or secrets.token_hex(8)
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"run {new_id}\npid {os.getpid()}\n".encode(), 0)
            undo.pop_all()
        return cls(path, dir_fd, lock_fd, new_id, run_id is None)  # a new run's marker is its own

    @classmethod
    def claim_new(cls, parent, stem):
        """A fresh folder `parent/stem`, or `stem-2`, `stem-3`, ... when that name is taken: never a shared one."""
        for n in range(1, 1000):
            path = Path(parent) / (stem if n == 1 else f"{stem}-{n}")
            try:
                path.mkdir(parents=True)  # atomic: exactly one process creates a given name
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputError(f"cannot create a run folder in {parent} ({_reason(e)})", "unwritable", parent) \
                    from None
            return cls.claim(path)
        raise OutputError(f"{parent} holds 999 runs named {stem}", "not_empty", parent)

    def write(self, name, data):
        atomic_write(self.path / name, lambda f: f.write(data), dir_fd=self._dir, tag=self.run_id)
        self.wrote = True

    def exists(self, name):  # (not through a link)
        with contextlib.suppress(OSError):
            return bool(os.stat(name, dir_fd=self._dir, follow_symlinks=False))
        return False

    def release(self):
        """Unlock the folder. A new run that wrote nothing leaves it as it found it (no marker): reusable."""
        if self._lock is not None:
            if self._created_marker and not self.wrote:
                _remove(MARKER, self._dir)
            os.close(self._lock)
            os.close(self._dir)
            self._lock = self._dir = None


def _lock_marker(path, dir_fd, run_id, undo):
    """`path`'s marker, opened at `dir_fd` and locked: (descriptor, made now); `undo` closes it, removes one made.
    One already there is only written when it is a plain file of this user's with no other name (no hard link)."""
    flags, lock_fd, created = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, None, False
    try:  # (O_NONBLOCK: a FIFO cannot hang us)
        lock_fd, created = os.open(MARKER, flags | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd), True
    except FileExistsError:
        with contextlib.suppress(OSError):  # never a link (ELOOP), a dangling one, a folder (EISDIR), ...
            lock_fd = os.open(MARKER, flags, dir_fd=dir_fd)
    except OSError as e:
        raise OutputError(f"cannot write into {path} ({_reason(e)})", "unwritable", path) from None
    if lock_fd is not None:
        undo.callback(os.close, lock_fd)
        info = os.fstat(lock_fd)
    if not created and (lock_fd is None or not stat.S_ISREG(info.st_mode) or info.st_nlink > 1 or
                        info.st_uid != os.geteuid()):
        raise OutputError(f"{path / MARKER} is not a run's marker file (it is a link, a hard link, a folder, a pipe or "
                          "another user's)", "not_this_run" if run_id else "not_empty", path)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # (a marker just made stays: the process holding it writes its id there)
        raise OutputError(f"another process is running the run in {path} right now", "busy", path) from None
    if created:
        undo.callback(_remove, MARKER, dir_fd)
    return lock_fd, created


def _remove(name, dir_fd):
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")
