"""predict.py as a user runs it: a subprocess, its lines, its exit status."""
import json
import os
import subprocess
import sys

import torch
from conftest import REPO, as_photo
from PIL import Image
from test_digits import crafted_pngs


def predict(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *map(str, args)], capture_output=True,
                          text=True, **kw)


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


def test_unknown_device_is_one_line(trained, tmp_path):
    _, ckpt, _ = trained
    for device in ("tpu", "garbage"):
        done = predict(ckpt, tmp_path, "--device", device)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
        assert "Traceback" not in done.stderr and device in done.stderr
