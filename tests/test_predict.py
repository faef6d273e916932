"""predict.py as a user runs it: a subprocess, its lines, its exit status."""
import json
import subprocess
import sys

from conftest import REPO, as_photo
from PIL import Image


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
