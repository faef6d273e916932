"""Files a run writes, written so that nothing is lost: atomic writes, and run folders claimed by one run.

`atomic_write` leaves either the old file or the new one, never a mix, whatever happens mid-write. `RunDir`
claims an output folder for one run: an exclusively created marker file carrying the run's id, locked by the OS
while the run lives. Every file of the run is written through the folder's descriptor without following
symbolic links, temporaries carry the run id, and nothing the run did not write is ever removed.
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
    """A file or folder of the run cannot be written or claimed.

    `kind` says why, for the entry point to say what to do: "unwritable", "not_a_folder", "not_empty",
    "holds_run" (a run to resume), "busy" (another process runs it), "not_this_run" (a resume into a folder that
    is not the checkpoint's run's), "write" (a file of the run could not be written).
    """

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
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash or kill -9 at any moment leaves either the old file or the new one, never a mix; a failed write
    (a full disk, say) removes its temporary file and raises OutputError. Ctrl-C is passed on as it is.
    With `dir_fd`, `path` is a name in that open folder (a run folder: see RunDir.write); `tag` goes into the
    temporary file's name (`.NAME.TAG.RANDOM.tmp`), so a later claim knows whose leftovers it may remove. The
    temporary is created exclusively and the rename replaces a symbolic link at `path` rather than following
    it, so no other file is ever written through a link.
    """
    path = Path(path)
    folder = path.parent if dir_fd is None else None
    shown = path if dir_fd is None else Path(RunDir.path_of(dir_fd)) / path
    tmp = path.parent / f".{path.name}.{tag + '.' if tag else ''}{secrets.token_hex(4)}.tmp"
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                     dir_fd=dir_fd)  # 0o666 less the umask: the usual permissions
    except OSError as e:
        raise OutputError(f"cannot write {shown} ({_reason(e, shown.parent)})", path=shown) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(e, Exception) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {shown} ({_reason(e, shown.parent)})", path=shown) from e
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        folder_fd = os.open(folder, os.O_RDONLY) if dir_fd is None else dir_fd
        try:
            os.fsync(folder_fd)
        finally:
            if dir_fd is None:
                os.close(folder_fd)


MARKER = ".s5-run"  # marks a folder as one run's: "run <id>" on its first line; locked while a process runs it


class RunDir:
    """An output folder claimed by this process for one run, until `release()` or the process ends.

    `claim(path)` takes a folder for a new run: a new one (created) or an empty one; every entry counts, a
    marker too, except the marker of a run killed before it saved anything (nothing else of it there).
    `claim(path, run_id=ID)` takes back the folder of the run ID for a resume: its marker must name ID.
    Either way a second process asking for a folder that one holds is refused (the OS lock dies with its
    process, so a killed run frees it at once). The marker is never followed if it is a link, a folder or a
    FIFO: such a folder is nobody's run. A claim removes only the temporaries of the run it takes over.
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
        try:
            return cls._claim(path, dir_fd, run_id)
        except BaseException:
            os.close(dir_fd)
            raise

    @classmethod
    def _claim(cls, path, dir_fd, run_id):
        new_id = run_id or secrets.token_hex(8)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            lock_fd = os.open(MARKER, flags | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
            created, old_id = True, None
        except FileExistsError:
            lock_fd, created = None, False
        except OSError as e:
            raise OutputError(f"cannot write into {path} ({_reason(e, path)})", "unwritable", path) from None
        if lock_fd is None:  # a marker is there: whose, and is it a plain file?
            try:
                lock_fd = os.open(MARKER, flags, dir_fd=dir_fd)
            except OSError:  # a symbolic link (ELOOP), a dangling one, a folder (EISDIR), ...
                lock_fd = None
            if lock_fd is None or not stat.S_ISREG(os.fstat(lock_fd).st_mode):
                if lock_fd is not None:
                    os.close(lock_fd)
                raise OutputError(f"{path / MARKER} is not a run's marker file (a link, a folder or a pipe): "
                                  f"{path} is not a run folder", "not_this_run" if run_id else "not_empty", path)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise OutputError(f"another process is running the run in {path} right now", "busy", path) from None
        try:
            if not created:
                old_id = _marker_id(os.pread(lock_fd, 256, 0))
            entries = [e for e in os.listdir(dir_fd) if e != MARKER]
            if run_id is not None:  # a resume: the folder must be this run's
                if old_id != run_id:
                    raise OutputError(f"{path} is not the folder of the run being resumed "
                                      f"({'no run marker' if created else 'its marker names another run'})",
                                      "not_this_run", path)
            else:
                own_leftovers = old_id and all(_is_temporary_of(e, old_id) for e in entries)
                if entries and not own_leftovers:
                    held = "last.pt" in entries
                    shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
                    raise OutputError(f"{path} already holds a run" if held else
                                      f"{path} is not empty (it holds {shown})",
                                      "holds_run" if held else "not_empty", path)
            for entry in entries:  # leftovers of a killed save of the run taken over: never anyone else's
                if old_id and _is_temporary_of(entry, old_id):
                    with contextlib.suppress(OSError):
                        os.unlink(entry, dir_fd=dir_fd)
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"run {new_id}\npid {os.getpid()}\n".encode(), 0)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(MARKER, dir_fd=dir_fd)
            os.close(lock_fd)
            raise
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
        try:
            os.stat(name, dir_fd=self._dir, follow_symlinks=False)
            return True
        except OSError:
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
