"""S5.ipynb executed top to bottom, headless, as a user would run it (small settings via S5_* variables)."""
import os

import nbformat
from conftest import REPO
from nbclient import NotebookClient
from PIL import Image


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
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed with cleared outputs
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Total params: 593,200" in text
    assert "Test set: Average loss:" in text and "Accuracy:" in text
    assert "one.png ->" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 6  # sample grid, two curve figures, confusion matrix, mistakes, your digits
    assert (tmp_path / "runs" / "notebook" / "model.pt").exists()
