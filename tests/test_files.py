"""Atomic writes and run folders: nothing half-written, no two runs in one folder."""
import os

import pytest

from s5.files import OutputError, atomic_write


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous good checkpoint")

    def broken(f):
        f.write(b"half a checkpoi")
        raise RuntimeError("disk full")

    with pytest.raises(OutputError, match=r"cannot write .*last.pt \(disk full\)"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"previous good checkpoint"
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_atomic_write_gives_usual_permissions(tmp_path):
    atomic_write(tmp_path / "metrics.csv", lambda f: f.write(b"epoch\n"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "metrics.csv").stat().st_mode & 0o777 == 0o666 & ~umask
