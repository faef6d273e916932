"""S5.ipynb executed top to bottom, headless, as a user would run it (small settings via S5_* variables)."""
import os
import subprocess

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


COLAB_STAND_IN = ("import sys, types\n"  # what Colab's kernel has and a local one has not
                  "sys.modules['google'] = types.ModuleType('google')\n"
                  "sys.modules['google.colab'] = types.ModuleType('google.colab')\n")


def colab_copy(nb, cells=None):
    """The notebook as Colab runs it: a kernel with google.colab imported, no outputs; `cells` code cells only."""
    code = [c for c in nb.cells if c.cell_type == "code"][:cells]
    for cell in code:
        cell.outputs, cell.execution_count = [], None
    nb.cells = [nbformat.v4.new_code_cell(COLAB_STAND_IN), *code]
    return nb


def test_on_colab_the_first_cell_clones_the_repo_and_the_notebook_runs_from_it(mnist_root, tmp_path, monkeypatch):
    """Colab, by simulation: an empty folder, S5_REPO_URL at a clone of this repo; the first cell clones it, finds
    or installs torchsummary, moves into it, and the rest of the notebook runs there on a small budget."""
    origin = tmp_path / "origin" / "s5-mnist.git"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(origin)], check=True)
    colab, digits = tmp_path / "content", tmp_path / "digits"  # Colab's working folder: nothing of the repo in it
    colab.mkdir()
    digits.mkdir()
    monkeypatch.setenv("S5_REPO_URL", str(origin))
    for name, value in {"S5_RECIPE": "sprint", "S5_EPOCHS": "1", "S5_TRAIN_SUBSET": "1024", "S5_PROGRESS": "0",
                        "S5_DEMO": "0", "S5_DATA_DIR": str(mnist_root), "S5_MY_DIGITS": str(digits)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the clone's files, not this checkout's, are imported
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.chdir(colab)
    nb = colab_copy(nbformat.read(REPO / "S5.ipynb", as_version=4))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(colab)}}).execute()

    clone = colab / "s5-mnist"
    assert (clone / "model.py").is_file() and (clone / ".git").is_dir()
    assert "Total params: 593,200" in outputs_text(nb) and "Test set: Average loss:" in outputs_text(nb)
    assert (clone / "runs" / "notebook" / "model.pt").is_file()  # the notebook ran inside the clone
    assert sorted(p.name for p in colab.iterdir()) == ["s5-mnist"]


def test_on_colab_without_repo_url_the_first_cell_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("S5_REPO_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    nb = colab_copy(nbformat.read(REPO / "S5.ipynb", as_version=4), cells=1)
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    said = "\n".join(str(o.get("evalue", "")) + o.get("text", "") for o in nb.cells[-1].outputs)
    assert "Set REPO_URL above to the git URL of this repo" in said
    assert list(tmp_path.iterdir()) == []  # nothing cloned, nothing installed
