"""utils.py is the classic face: the original notebook's names, and every name S5.ipynb uses, come from s5."""
import ast
import builtins
import importlib
import json

import pytest
from conftest import REPO

import utils

CLASSIC = ["get_train_transforms", "get_test_transforms", "get_MNISTdataset_with_loader", "GetCorrectPredCount",
           "train", "test", "get_optimizer", "get_scheduler", "get_loss", "post_display", "post_accuracyplots"]


def notebook_names():
    """Names S5.ipynb reads but neither defines nor imports itself: they must come from `from utils import *`."""
    cells = json.loads((REPO / "S5.ipynb").read_text())["cells"]
    tree = ast.parse("\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
    bound = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names}
    bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler) and n.name}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return sorted(read - bound - set(dir(builtins)))


def test_notebook_reads_names_from_utils():
    names = notebook_names()
    assert {"train", "test", "get_optimizer", "get_scheduler", "get_loss", "post_accuracyplots"} <= set(names)


@pytest.mark.parametrize("name", sorted(set(CLASSIC) | set(notebook_names())))
def test_name_is_exported_and_is_the_s5_object(name):
    assert name in utils.__all__
    obj = getattr(utils, name)
    owner = getattr(obj, "__module__", None)
    if owner and owner.startswith("s5."):
        assert getattr(importlib.import_module(owner), name) is obj  # a re-export, not a copy


def test_star_import_brings_only_the_face():
    namespace = {}
    exec("from utils import *", namespace)
    names = set(namespace) - {"__builtins__"}
    assert names == set(utils.__all__)
    assert not names & {"os", "np", "plt", "subprocess", "torch", "Path"}
    assert all(hasattr(utils, n) for n in utils.__all__)


def test_s5_never_imports_utils_or_entry_points():
    for path in (REPO / "s5").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"utils", "train", "predict", "bench", "demo", "export"}, path.name
    model_imports = {n.module or "" for n in ast.walk(ast.parse((REPO / "model.py").read_text()))
                     if isinstance(n, ast.ImportFrom)}
    assert not {m for m in model_imports if m.startswith(("s5", "utils"))}  # model.py imports nothing of ours


def test_s5_modules_import_without_cycles():
    graph = {}
    for path in (REPO / "s5").glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = {n.module.split(".")[1] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("s5.")}
        deps |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "s5" for a in n.names}
        graph[path.stem] = deps
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, " -> ".join(visiting + [module])
        if module not in done:
            visiting.append(module)
            for dep in graph.get(module, ()):
                visit(dep)
            visiting.pop()
            done.add(module)

    for module in graph:
        visit(module)
