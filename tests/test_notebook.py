"""S5.ipynb executed top to bottom, headless, as a user would run it (small settings via S5_* variables)."""
import os

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient
from PIL import Image

pytestmark = pytest.mark.slow  # starts a Jupyter kernel


def test_notebook_runs_end_to_end(mnist_root, tmp_path, monkeypatch):
    digits = tmp_path / "digits"
    digits.mkdir()
    canvas = Image.new("L", (120, 160), 255)
    canvas.paste(0, (50, 20, 66, 140))  # a dark "1" on white paper
    canvas.save(digits / "one.png")
    monkeypatch.setenv("S5_RECIPE", "fast")
    monkeypatch.setenv("S5_EPOCHS", "1")
    monkeypatch.setenv("S5_TRAIN_SUBSET", "2048")
    monkeypatch.setenv("S5_DATA_DIR", str(mnist_root))
    monkeypatch.setenv("S5_MY_DIGITS", str(digits))
    monkeypatch.setenv("S5_DEMO", "0")  # no web server from the tests' kernel (tests/test_demo.py drives one)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel uses its inline backend, as in Jupyter
    monkeypatch.chdir(tmp_path)  # the notebook writes runs/notebook/ here, not into the repo
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    nb = nbformat.read(REPO / "S5.ipynb", as_version=4)
    for cell in nb.cells:  # a small copy of it, run from scratch
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("S5_PROGRESS", "0")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Total params: 593,200" in text
    assert "Test set: Average loss:" in text and "Accuracy:" in text
    assert "one.png ->" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 6  # sample grid, two curve figures, confusion matrix, mistakes, your digits
    assert (tmp_path / "runs" / "notebook" / "model.pt").exists()


def outputs_text(nb):
    return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_committed_notebook_carries_one_real_run():
    """`make notebook-run` saved the outputs of one top-to-bottom run: every code cell ran, in order, and they read
    well on a repository page (per-epoch lines and figures, no progress-bar updates or widget stubs)."""
    nb = nbformat.read(REPO / "S5.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    text = outputs_text(nb)
    assert "Recipe(name='fast'" in text and "machine:" in text and "Total params: 593,200" in text
    accuracies = [float(line.rsplit("(", 1)[1].rstrip("%)")) for line in text.splitlines()
                  if line.startswith("Test set:")]
    assert len(accuracies) == 2 and accuracies[-1] >= 99.0  # the fast recipe's two epochs
    assert "it/s" not in text and "\r" not in text  # no progress bars
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in code for o in c.outputs)
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= 6  # sample grid, two curve figures, confusion matrix, mistakes, your digits
    assert (REPO / "S5.ipynb").stat().st_size < 1_000_000
