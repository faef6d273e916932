"""Atomic writes and run folders: nothing half-written, no two runs in one folder."""
import os

import pytest

from s5.files import MARKER, OutputError, RunDir, atomic_write


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
    with pytest.raises(OutputError, match="another process is running the run in") as err:
        RunDir.claim(out)
    assert err.value.kind == "busy"
    first.release()
    RunDir.claim(out).release()  # free again once the first run is over (or killed: the OS drops its lock)


def test_run_folder_refuses_others_files_and_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "plot.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="is not empty .*plot.png"):
        RunDir.claim(tmp_path / "docs")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        RunDir.claim(tmp_path / "f")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.pt").write_bytes(b"x")
    with pytest.raises(OutputError, match="already holds a run") as err:
        RunDir.claim(tmp_path / "old")
    assert err.value.kind == "holds_run"
    assert sorted(os.listdir(tmp_path / "docs")) == ["plot.png"] and os.listdir(tmp_path / "old") == ["last.pt"]


def test_a_hidden_temporary_file_is_someone_elses_and_counts(tmp_path):
    """A folder holding only another program's `.download.part.tmp` is not empty, and the file stays."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".download.part.tmp").write_bytes(b"someone's download")
    with pytest.raises(OutputError, match="is not empty"):
        RunDir.claim(tmp_path / "d")
    assert (tmp_path / "d" / ".download.part.tmp").read_bytes() == b"someone's download"


@pytest.mark.parametrize("marker", ["symlink", "dangling", "folder", "fifo"])
def test_a_marker_that_is_not_a_plain_file_is_never_followed(tmp_path, marker):
    """`ln -s ~/notes.txt DIR/.s5-run` used to make a run write `pid N` into notes.txt."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    out = tmp_path / "out"
    out.mkdir()
    {"symlink": lambda p: p.symlink_to(notes), "dangling": lambda p: p.symlink_to(tmp_path / "nowhere"),
     "folder": lambda p: p.mkdir(), "fifo": lambda p: os.mkfifo(p)}[marker](out / MARKER)
    for run_id in (None, "abc"):  # a new run, and a resume
        with pytest.raises(OutputError, match="is not a run's marker file"):
            RunDir.claim(out, run_id=run_id)
    assert notes.read_text() == "my notes" and not (tmp_path / "nowhere").exists()


def test_files_of_the_run_are_written_never_through_a_link(tmp_path):
    """A symlinked last.pt or metrics.csv in the run's folder is replaced by the file, its target untouched."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    run = RunDir.claim(tmp_path / "run")
    for name in ("last.pt", "metrics.csv"):
        (tmp_path / "run" / name).symlink_to(precious)
        run.write(name, b"run data")
        assert not (tmp_path / "run" / name).is_symlink() and (tmp_path / "run" / name).read_bytes() == b"run data"
    run.release()
    assert precious.read_text() == "keep me"


def test_resume_claims_only_the_folder_its_marker_names(tmp_path):
    run = RunDir.claim(tmp_path / "run")
    run_id = run.run_id
    run.write("last.pt", b"checkpoint")
    run.release()
    assert (tmp_path / "run" / MARKER).read_text().startswith(f"run {run_id}\n")
    with pytest.raises(OutputError, match="not the folder of the run being resumed.*another run") as err:
        RunDir.claim(tmp_path / "run", run_id="0123456789abcdef")
    assert err.value.kind == "not_this_run"
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "last.pt").write_bytes(b"checkpoint")  # a copied last.pt: no marker there
    with pytest.raises(OutputError, match="no run marker"):
        RunDir.claim(tmp_path / "copy", run_id=run_id)
    assert sorted(os.listdir(tmp_path / "copy")) == ["last.pt"]  # the refused claim left nothing behind
    again = RunDir.claim(tmp_path / "run", run_id=run_id)
    assert again.run_id == run_id
    again.release()


def test_claim_removes_only_its_own_runs_temporary_files(tmp_path):
    run = RunDir.claim(tmp_path / "run")
    run.write("last.pt", b"checkpoint")
    run.release()
    out = tmp_path / "run"
    (out / f".last.pt.{run.run_id}.deadbeef.tmp").write_bytes(b"half")  # a killed save of this run
    (out / ".notes.tmp").write_bytes(b"someone else's")
    RunDir.claim(out, run_id=run.run_id).release()
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, ".notes.tmp", "last.pt"])


def test_a_run_killed_before_saving_leaves_a_reusable_folder(tmp_path):
    out = tmp_path / "run"
    run = RunDir.claim(out)
    (out / f".last.pt.{run.run_id}.0.tmp").write_bytes(b"half")  # killed mid-save: marker and temporary remain
    os.close(run._lock)  # what kill -9 does to the lock
    again = RunDir.claim(out)
    assert again.run_id != run.run_id and sorted(os.listdir(out)) == [MARKER]
    again.release()
    assert os.listdir(out) == []  # a new run that wrote nothing leaves no marker


def test_a_new_claim_of_a_folder_with_a_marker_and_a_run_is_refused(tmp_path):
    run = RunDir.claim(tmp_path / "run")
    run.write("last.pt", b"checkpoint")
    run.release()
    with pytest.raises(OutputError, match="already holds a run"):
        RunDir.claim(tmp_path / "run")



def _give_away(path, how, new_name):
    """`path` also named `new_name` (a hard link), or moved there and given to another user."""
    if how == "hard link":
        os.link(path, new_name)
    else:
        os.chown(path, 12345, -1)
        if path != new_name:
            path.replace(new_name)


@pytest.mark.parametrize("how", ["hard link", "another user's"])
def test_a_marker_with_another_name_or_owner_is_never_written_through(tmp_path, how):
    """`ln ~/notes.txt DIR/.s5-run` made a new run truncate notes.txt and write `run <id>|pid N|` into it."""
    if how == "another user's" and os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    notes, out = tmp_path / "notes.txt", tmp_path / "out"
    notes.write_text("my notes")
    out.mkdir()
    _give_away(notes, how, out / MARKER)
    with pytest.raises(OutputError, match="is not a run's marker file") as err:
        RunDir.claim(out)
    assert err.value.kind == "not_empty" and (out / MARKER).read_text() == "my notes"
    run = RunDir.claim(tmp_path / "run")  # a resume in place, whose marker has a second name (or owner) now
    run.write("last.pt", b"checkpoint")
    run.release()
    marker = tmp_path / "run" / MARKER
    _give_away(marker, how, tmp_path / "elsewhere" if how == "hard link" else marker)
    marker.write_text(f"run {run.run_id}\nmy notes\n")
    with pytest.raises(OutputError, match="is not a run's marker file") as err:
        RunDir.claim(tmp_path / "run", run_id=run.run_id)
    assert err.value.kind == "not_this_run" and marker.read_text() == f"run {run.run_id}\nmy notes\n"


def test_new_run_folders_in_an_unusable_place_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create a run folder in .*file") as err:
        RunDir.claim_new(tmp_path / "file", "seed-20261125-120000")
    assert err.value.kind == "unwritable"
