"""Files a run writes, so that nothing is lost: atomic writes, and run folders claimed by one run.

`atomic_write` leaves the old file or the new one, never a mix. `RunDir` claims an output folder for one run: an
exclusively created marker file carrying the run's id, locked by the OS while the run lives. Every file of the run
is written through the folder's descriptor without following links, temporaries carry the run id, and nothing the
run did not write is ever removed.
"""

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import time
from pathlib import Path

from s5.errors import UserError


class OutputError(UserError, OSError):
    """A file or folder of the run cannot be written or claimed. `kind` says why, for the entry point's advice:
    "unwritable", "not_a_folder", "not_empty", "holds_run" (a run to resume), "busy" (another process runs it),
    "not_this_run" (a resume into another run's folder), "write" (a file of the run could not be written)."""

    def __init__(self, message, kind="write", path=None):
        super().__init__(message)
        self.kind, self.path = kind, path


def _reason(error, folder):
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 1 << 20:  # torch.save reports a full disk as a RuntimeError
            return "No space left on device"
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def atomic_write(path, write, *, dir_fd=None, tag=None):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`: a crash or kill -9
    at any moment leaves the old file or the new one, never a mix. A failed write removes its temporary and raises
    OutputError; Ctrl-C is passed on as it is. With `dir_fd`, `path` is a name in that open folder; `tag` goes into
    the temporary's name (`.NAME.TAG.RANDOM.tmp`), so a later claim knows whose leftovers it may remove."""
    path = Path(path)
    shown = path if dir_fd is None else Path(RunDir.path_of(dir_fd)) / path
    tmp = path.parent / f".{path.name}.{tag + '.' if tag else ''}{secrets.token_hex(4)}.tmp"
    created = False
    try:
        if dir_fd is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # Created exclusively, never through a link; 0o666 less the umask: the usual permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        created = True
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it the file
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a link at `path`, never follows it
    except BaseException as e:
        if created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(e, Exception) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {shown} ({_reason(e, shown.parent)})", path=shown) from e
        raise
    with contextlib.suppress(OSError):  # and the folder, so that the rename itself is durable where the OS allows
        folder_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)


MARKER = ".s5-run"  # marks a folder as one run's: "run <id>" on its first line; locked while a process runs it


class RunDir:
    """An output folder claimed by this process for one run, until `release()` or the process ends.

    `claim(path)` takes a new or empty folder for a new run (the marker of a run killed before it saved anything
    does not count); `claim(path, run_id=ID)` takes back the folder of the run ID for a resume. A folder another
    process holds is refused: the OS lock dies with its process, so a killed run frees it at once. A marker that is
    a link, a folder or a FIFO is never followed. A claim removes only the temporaries of the run it takes over.
    """

    def __init__(self, path, dir_fd, lock_fd, run_id, created_marker):
        self.path, self._dir, self._lock, self.run_id = Path(path), dir_fd, lock_fd, run_id
        self._created_marker, self.wrote = created_marker, False

    @staticmethod
    def path_of(dir_fd):
        return os.readlink(f"/proc/self/fd/{dir_fd}") if os.path.exists("/proc/self/fd") else "."

    @classmethod
    def claim(cls, path, run_id=None):
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileExistsError, NotADirectoryError):
            raise OutputError(f"{path} is a file, not a folder", "not_a_folder", path) from None
        except OSError as e:
            raise OutputError(f"cannot create the output folder {path} ({_reason(e, path.parent)})",
                              "unwritable", path) from None
        lock_fd = None
        try:
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO cannot hang us
            try:
                lock_fd, created = os.open(MARKER, flags | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd), True
            except FileExistsError:  # a marker is there: whose, and is it a plain file?
                created = False
                with contextlib.suppress(OSError):  # a link (ELOOP), a dangling one, a folder (EISDIR), ...
                    lock_fd = os.open(MARKER, flags, dir_fd=dir_fd)
                if lock_fd is None or not stat.S_ISREG(os.fstat(lock_fd).st_mode):
                    raise OutputError(f"{path / MARKER} is not a run's marker file (a link, a folder or a pipe): "
                                      f"{path} is not a run folder", "not_this_run" if run_id else "not_empty",
                                      path) from None
            except OSError as e:
                raise OutputError(f"cannot write into {path} ({_reason(e, path)})", "unwritable", path) from None
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # (a marker just created stays: the process that holds it writes its id there)
                raise OutputError(f"another process is running the run in {path} right now", "busy", path) from None
            try:
                return cls._take(path, dir_fd, lock_fd, created, run_id)
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):
                        os.unlink(MARKER, dir_fd=dir_fd)
                raise
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            os.close(dir_fd)
            raise

    @classmethod
    def _take(cls, path, dir_fd, lock_fd, created, run_id):
        """The claim, once the marker is locked: check whose folder it is, remove its own leftovers, write the id."""
        old_id = None if created else _marker_id(os.pread(lock_fd, 256, 0))
        entries = [e for e in os.listdir(dir_fd) if e != MARKER]
        leftovers = [e for e in entries if old_id and _is_temporary_of(e, old_id)]  # of a killed save of that run
        if run_id is not None and old_id != run_id:
            raise OutputError(f"{path} is not the folder of the run being resumed "
                              f"({'no run marker' if created else 'its marker names another run'})",
                              "not_this_run", path)
        if run_id is None and len(leftovers) < len(entries):
            held = "last.pt" in entries
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(f"{path} already holds a run" if held else f"{path} is not empty (it holds {shown})",
                              "holds_run" if held else "not_empty", path)
        for entry in leftovers:  # never anyone else's
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=dir_fd)
        new_id = run_id or secrets.token_hex(8)
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"run {new_id}\npid {os.getpid()}\n".encode(), 0)
        return cls(path, dir_fd, lock_fd, new_id, created or run_id is None)  # a new run's marker is its own

    @classmethod
    def claim_new(cls, parent, stem):
        """A fresh folder `parent/stem`, or `stem-2`, `stem-3`, ... when that name is taken: never a shared one."""
        parent = Path(parent)
        for n in range(1, 1000):
            path = parent / (stem if n == 1 else f"{stem}-{n}")
            try:
                parent.mkdir(parents=True, exist_ok=True)
                path.mkdir()  # atomic: exactly one process creates a given name
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputError(f"cannot create a run folder in {parent} ({_reason(e, parent)})",
                                  "unwritable", parent) from None
            return cls.claim(path)
        raise OutputError(f"{parent} holds 999 runs named {stem}", "not_empty", parent)

    def write(self, name, data):
        """Write `data` (bytes) as the file `name` of this run, atomically, never through a link."""
        atomic_write(name, lambda f: f.write(data), dir_fd=self._dir, tag=self.run_id)
        self.wrote = True

    def exists(self, name):
        with contextlib.suppress(OSError):
            return bool(os.stat(name, dir_fd=self._dir, follow_symlinks=False))
        return False

    def release(self):
        """Unlock the folder. A new run that wrote nothing leaves it as it found it (no marker): reusable."""
        if self._lock is None:
            return
        if self._created_marker and not self.wrote:
            with contextlib.suppress(OSError):
                os.unlink(MARKER, dir_fd=self._dir)
        os.close(self._lock)
        os.close(self._dir)
        self._lock = self._dir = None


def _marker_id(content):
    """The run id on a marker's first line ("run <id>"), or "" for any other content."""
    first = content.decode("ascii", "replace").split("\n", 1)[0].split()
    return first[1] if len(first) == 2 and first[0] == "run" and first[1].isalnum() else ""


def _is_temporary_of(name, run_id):
    return name.startswith(".") and name.endswith(".tmp") and f".{run_id}." in name


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")
