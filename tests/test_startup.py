"""A signal while an entry point is still importing torch (its first second or two) ends it with one line, exit 130."""
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

ENTRY_POINTS = ("train.py", "predict.py", "bench.py", "sweep.py", "export.py", "demo.py")
# A stand-in torch that says it is being imported, then hangs there: the signal lands mid-import, every time.
STUCK_TORCH = "import os, time\nopen(os.environ['S5_TEST_IMPORTING'], 'w').close()\ntime.sleep(120)\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_signal_while_torch_imports_ends_with_one_line_and_130(entry, sig, tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(STUCK_TORCH)
    importing = tmp_path / "importing"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "S5_TEST_IMPORTING": str(importing)}
    with subprocess.Popen([sys.executable, str(REPO / entry), "--help"], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        while not importing.exists() and proc.poll() is None:  # wait for the import to start, not for a time
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err == "error: interrupted while starting; nothing was done\n" and out == ""
