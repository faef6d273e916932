"""Files a run writes, written so that nothing is lost: atomic writes, and run folders claimed by one run.

`atomic_write` leaves either the old file or the new one, never a mix, whatever happens mid-write. `RunDir`
claims an output folder for one process (an exclusive marker file, then an OS lock held while the run
lives), so two runs never write into one folder and a folder of other files is never written into.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path


class OutputError(OSError):
    """A file or folder of the run cannot be written; the message says which and why."""


def _reason(error, folder):
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 1 << 20:  # torch.save reports a full disk as a RuntimeError
            return "No space left on device"
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash or kill -9 at any moment leaves either the old file or the new one, never a mix; a failed write
    (a full disk, say) removes its temporary file and raises OutputError. Ctrl-C is passed on as it is.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {path} ({_reason(e, path.parent)})") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {path} ({_reason(e, path.parent)})") from e
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


MARKER = ".s5-run"  # marks a folder as a train.py run's; locked while a process runs it


class RunDir:
    """An output folder claimed by this process for one run, until `release()` or the process ends.

    claim(path) takes a folder for a new run: a new one (created), or an empty one. A folder holding another
    run or other files, or a file, is refused with OutputError. claim(path, resume=True) takes an existing
    run's folder back. Either way a second process asking for the same folder while this one holds it is
    refused (the lock is the OS's, so a killed run frees it at once), and temporary files a killed save left
    are removed.
    """

    def __init__(self, path, lock_fd):
        self.path, self._fd = Path(path), lock_fd

    @classmethod
    def claim(cls, path, resume=False):
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path} is a file, not a folder: give --out a folder name")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the output folder {path} ({_reason(e, path.parent)}): "
                              "give --out a writable place") from None
        if not resume:
            others = [p.name for p in path.iterdir() if p.name != MARKER and not _is_temporary(p)]
            if "last.pt" in others:
                raise OutputError(f"{path} already holds a run: resume it with --resume {path / 'last.pt'}, "
                                  "or pick another --out")
            if others:
                raise OutputError(f"{path} is not empty (it holds {', '.join(sorted(others)[:3])}"
                                  f"{', ...' if len(others) > 3 else ''}): give --out a new or empty folder")
        try:
            fd = os.open(path / MARKER, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"cannot write into {path} ({_reason(e, path)}): give --out a writable place") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(f"another process is running the run in {path} right now: wait for it, or "
                              "pick another --out") from None
        if not resume and any(p.name == "last.pt" for p in path.iterdir()):  # it got there between our looks
            os.close(fd)
            raise OutputError(f"{path} already holds a run: pick another --out")
        for p in path.iterdir():
            if _is_temporary(p):
                with contextlib.suppress(OSError):
                    p.unlink()  # a killed save's leftover: no live process of this run can be writing it
        os.truncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        return cls(path, fd)

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
                raise OutputError(f"cannot create a run folder in {parent} ({_reason(e, parent)}): "
                                  "give --out a writable place") from None
            return cls.claim(path)
        raise OutputError(f"{parent} holds 999 runs named {stem}: give --out")

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _is_temporary(path):
    return path.name.startswith(".") and path.name.endswith(".tmp")


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")
