"""predict.py as a user runs it: a subprocess, its lines, its exit status."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, as_photo, crafted_pngs, zip_bomb
from PIL import Image


def predict(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *map(str, args)], capture_output=True,
                          text=True, **kw)


@pytest.mark.slow
def test_folder_lists_every_file_and_exit_1_when_one_failed(trained, tmp_path):
    model, ckpt, digits = trained
    Image.fromarray(as_photo(*digits[0][:1], light_background=True)).save(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    done = predict(ckpt, tmp_path)
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in done.stderr  # a folder expands to its image files
    assert any(line.endswith(")") and "good.png: " in line and "runner-up" in line for line in lines)
    assert any("notes.png: error: not an image" in line for line in lines)


@pytest.mark.slow
def test_cli_json_and_exit_codes(trained, tmp_path):
    model, ckpt, digits = trained
    for k, (digit, _) in enumerate(digits[:3]):
        Image.fromarray(as_photo(digit, True)).save(tmp_path / f"{k}.png")
    done = predict(ckpt, tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["digit"] for r in rows] == [d[1] for d in digits[:3]]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    done = predict(bad, tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1


# --- robustness ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_crafted_files_do_not_take_the_others_down(trained, tmp_path):
    _, ckpt, digits = trained
    Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "good.png")
    for name, data in crafted_pngs((tmp_path / "good.png").read_bytes()).items():
        (tmp_path / name).write_bytes(data)
    done = predict(ckpt, tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and sum(": error: " in line for line in lines) == 3
    assert any(line.startswith(f"{tmp_path / 'good.png'}: {digits[0][1]} (") for line in lines)


@pytest.mark.slow
def test_nan_checkpoint_is_refused(trained, tmp_path):
    model, _, digits = trained
    broken = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    torch.save(broken, tmp_path / "nan.pt")
    Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "a.png")
    for extra in ([], ["--json"]):
        done = predict(tmp_path / "nan.pt", tmp_path / "a.png", *extra)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("error: ") and "NaN or infinite weights" in done.stderr
        assert len(done.stderr.splitlines()) == 1


@pytest.mark.slow
def test_odd_file_names_stay_one_line_in_any_encoding(trained, tmp_path):
    _, ckpt, digits = trained
    folder = os.fsencode(tmp_path)
    photo = Image.fromarray(as_photo(digits[0][0], True))
    for raw in (b"caf\xe9.png", b"two\nlines.png"):  # Latin-1 bytes (not UTF-8), and a newline
        with open(os.path.join(folder, raw), "wb") as f:
            photo.save(f, format="PNG")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = predict(ckpt, tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(f": {digits[0][1]} (" in line for line in lines), lines
    assert any('\\\\udce9' in line or "\\udce9" in line for line in lines) and any("\\n" in line for line in lines)
    done = predict(ckpt, tmp_path, "--json", env=env)
    rows = [json.loads(line) for line in done.stdout.splitlines()]  # strict JSON: no NaN, one object a line
    assert len(rows) == 2 and {r["digit"] for r in rows} == {digits[0][1]}


@pytest.mark.slow
def test_unknown_device_is_one_line(trained, tmp_path):
    _, ckpt, _ = trained
    for device in ("tpu", "garbage"):
        done = predict(ckpt, tmp_path, "--device", device)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
        assert "Traceback" not in done.stderr and device in done.stderr


# --- robustness, round 3 -------------------------------------------------------------------------------------------

def test_zip_bomb_checkpoint_is_refused_in_one_line(tmp_path):

    from model import Net

    (tmp_path / "bomb.pt").write_bytes(zip_bomb(Net()))
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    done = predict(tmp_path / "bomb.pt", tmp_path / "a.png")
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("error: refusing to load ") and "bytes uncompressed" in done.stderr


@pytest.mark.slow
def test_an_empty_path_is_a_usage_error(trained, tmp_path):
    _, ckpt, digits = trained
    Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "a.png")
    done = predict(ckpt, "", cwd=tmp_path)  # an empty shell variable: not "every image below the current folder"
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("error: argument PATH: an empty path")


@pytest.mark.slow
def test_symlinked_folders_are_followed_once(trained, tmp_path):
    _, ckpt, digits = trained
    (tmp_path / "real").mkdir()
    (tmp_path / "top").mkdir()
    Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "real" / "a.png")
    (tmp_path / "top" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real", target_is_directory=True)  # a link to its parent
    done = predict(ckpt, tmp_path / "top")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'top' / 'linked' / 'a.png'}: "), lines


@pytest.mark.slow
def test_an_unreadable_folder_is_reported_as_such(trained, tmp_path, monkeypatch, capsys):
    """Tests run as root, whom chmod 000 does not stop: the folder's listing is made to fail as it would for a user."""
    import predict as entry_point

    _, ckpt, digits = trained
    (tmp_path / "locked").mkdir()
    Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "a.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(tmp_path / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code = entry_point.main([str(ckpt), str(tmp_path / "locked")])
    out = capsys.readouterr().out.splitlines()
    assert code == 1 and out == [f"{tmp_path / 'locked'}: error: cannot read this folder (Permission denied)"]
    assert entry_point.main([str(ckpt), str(tmp_path)]) == 1  # the other files are still classified
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and any(f"a.png: {digits[0][1]} (" in line for line in out)


def many_images(trained, folder, n=1000):
    """n copies of one digit: their lines (about 100 bytes each) overflow a 64 KiB pipe, so predict.py cannot end
    while nobody reads its output."""
    _, _, digits = trained
    folder.mkdir()
    Image.fromarray(as_photo(digits[0][0], True)).save(folder / "0000.png")
    data = (folder / "0000.png").read_bytes()
    for k in range(1, n):
        (folder / f"{k:04d}.png").write_bytes(data)


def start_predict(*args):
    return subprocess.Popen([sys.executable, str(REPO / "predict.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_results_are_printed_as_they_are_made(trained, tmp_path):
    _, ckpt, digits = trained
    many_images(trained, tmp_path / "many")
    proc = start_predict(ckpt, tmp_path / "many", tmp_path / "later")
    try:
        first = proc.stdout.readline()  # before the last file: the pipe is full long before it is reached
        assert f": {digits[0][1]} (" in first, proc.stderr.read()
        (tmp_path / "staging").mkdir()  # so the last argument exists only once the first line is out, whole:
        Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "staging" / "x.png")
        (tmp_path / "staging").rename(tmp_path / "later")  # an empty "later" seen between mkdir and save was a race
        out = proc.stdout.read()  # through the same buffer readline used (communicate() reads the pipe beneath it
        err = proc.stderr.read()  # and lost whatever readline had buffered past the first line)
        proc.wait(timeout=600)
    finally:
        proc.kill()
    lines = [first, *out.splitlines()]
    assert proc.returncode == 0, err
    assert len(lines) == 1001 and lines[-1].startswith(f"{tmp_path / 'later' / 'x.png'}: {digits[0][1]} (")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_way_is_one_line_and_exit_130(trained, tmp_path, sig):
    _, ckpt, _ = trained
    many_images(trained, tmp_path / "many")
    proc = start_predict(ckpt, tmp_path / "many")
    try:
        assert proc.stdout.readline()  # mid-way: it cannot finish while its full pipe is not read
        proc.send_signal(sig)
        out = proc.stdout.read()  # through the same buffer readline used (communicate() reads the pipe beneath it
        err = proc.stderr.read()  # and lost whatever readline had buffered past the first line)
        proc.wait(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.startswith("error: interrupted") and len(err.splitlines()) == 1
    assert len(out.splitlines()) < 999  # stopped mid-way; the lines printed before it stay
