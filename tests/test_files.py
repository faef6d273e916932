"""Atomic writes and run folders: nothing half-written, no two runs in one folder."""
import os

import pytest

from s5.files import OutputError, RunDir, atomic_write


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


def test_ctrl_c_mid_write_keeps_the_old_file_and_is_passed_on(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous good checkpoint")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"previous good checkpoint" and os.listdir(tmp_path) == ["last.pt"]


def test_run_folder_is_claimed_by_one_process(tmp_path):
    out = tmp_path / "run"
    first = RunDir.claim(out)
    with pytest.raises(OutputError, match="another process is running the run in"):
        RunDir.claim(out)
    first.release()
    RunDir.claim(out).release()  # free again once the first run is over (or killed: the OS drops its lock)


def test_run_folder_refuses_others_files_and_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "plot.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="is not empty .*plot.png.*new or empty folder"):
        RunDir.claim(tmp_path / "docs")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        RunDir.claim(tmp_path / "f")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.pt").write_bytes(b"x")
    with pytest.raises(OutputError, match="already holds a run: resume it with --resume"):
        RunDir.claim(tmp_path / "old")
    resumed = RunDir.claim(tmp_path / "old", resume=True)
    assert resumed.path == tmp_path / "old"
    resumed.release()


def test_claim_removes_a_killed_saves_temporary_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"checkpoint")
    (out / ".last.pt.abc123.tmp").write_bytes(b"half")
    RunDir.claim(out, resume=True).release()
    assert sorted(p.name for p in out.iterdir()) == [".s5-run", "last.pt"]
