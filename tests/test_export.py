"""s5/export.py and export.py: the exported model checks, computes what the Net computes on the real test set,
and predict.py --onnx gives the same digits as the checkpoint; the CLI's failures are one line, nothing left."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

import export as export_cli
from s5 import export
from s5.data import MEAN, STD
from s5.mnist import load_split

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# The bound on |PyTorch - onnxruntime| log-probabilities: export.TOLERANCE, the one export.py itself enforces. Both
# compute in fp32 (a relative rounding of 6e-8 an operation); the longest sums are fc1's 4,096 products and conv4's
# 1,152, which the two libraries add in different orders, so differences of ~1e-6 relative to the logits (tens at
# most for a trained Net) are expected: up to ~1e-5. 1e-4 is ten times that, and a thousand times below any
# difference that could change a printed probability (0.1%) or, but for exact near-ties, the top-1 digit.
BOUND = export.TOLERANCE


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained checkpoint exported by export.py, as a user runs it."""
    _, ckpt, _ = trained
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    done = run("export.py", ckpt, "--out", out)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout.startswith(f"wrote {out} (")
    return out


@pytest.mark.slow
def test_the_export_checks_and_has_a_free_batch_dimension(exported):
    model = onnx.load(exported)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", export.OPSET)]
    [image], [log_probs] = model.graph.input, model.graph.output
    assert image.name == export.INPUT_NAME and log_probs.name == export.OUTPUT_NAME
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(image)[1:] == [1, 28, 28] and dims(log_probs)[1:] == [10]
    assert isinstance(dims(image)[0], str) and dims(image)[0] == dims(log_probs)[0]  # named, not a number
    assert not [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]  # one file


@pytest.mark.slow
def test_onnxruntime_agrees_with_pytorch_on_the_10000_test_images(trained, exported, mnist_root):
    model, _, _ = trained
    images, labels = load_split(False, mnist_root)
    x = (images.unsqueeze(1).float() / 255 - MEAN) / STD  # the normalisation of training (s5/data.py)
    net = export.OnnxNet(exported)
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(x[i:i + 1000]) for i in range(0, len(x), 1000)])
    got = torch.cat([net(x[i:i + 1000]) for i in range(0, len(x), 1000)])  # batch 1000
    assert got.shape == expected.shape == (10_000, 10) and got.dtype == torch.float32
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    worst = (got - expected).abs().max().item()
    print(f"\ntop-1 agreement {agreement:.4%}, max |log-prob difference| {worst:.3g} (bound {BOUND:g}); "
          f"accuracy PyTorch {(expected.argmax(1) == labels).float().mean():.2%}, "
          f"onnxruntime {(got.argmax(1) == labels).float().mean():.2%}")
    assert agreement >= 0.9995
    assert worst < BOUND
    for i in range(0, 10_000, 1_001):  # batch 1, the other end of the free dimension
        assert (net(x[i:i + 1]) - expected[i:i + 1]).abs().max().item() < BOUND


@pytest.mark.slow
def test_predict_onnx_gives_the_checkpoints_digits(trained, exported):
    _, ckpt, _ = trained
    digits = REPO / "examples" / "digits"
    with_torch, with_onnx = run("predict.py", ckpt, digits), run("predict.py", "--onnx", exported, digits)
    assert with_torch.returncode == with_onnx.returncode == 0, with_onnx.stderr
    assert with_onnx.stderr == ""
    lines_torch, lines_onnx = with_torch.stdout.splitlines(), with_onnx.stdout.splitlines()
    assert len(lines_onnx) == len(os.listdir(digits)) == 5
    # path: digit (p%), runner-up d (p%): the same digits; the percentages agree to the digit shown, but for a
    # rounding boundary, so the digits are compared, and the format by its shape
    shape = lambda line: (line.split(": ")[0], line.split(": ")[1].split()[0], line.split("runner-up ")[1][0])  # noqa: E731
    assert [shape(line) for line in lines_onnx] == [shape(line) for line in lines_torch]
    assert all(line.endswith("%)") and ", runner-up " in line for line in lines_onnx)
    as_json = run("predict.py", "--onnx", exported, digits, "--json")
    assert as_json.returncode == 0 and len(as_json.stdout.splitlines()) == 5


@pytest.mark.slow
def test_predict_onnx_usage_errors(trained, exported, tmp_path):
    _, ckpt, _ = trained
    digits = REPO / "examples" / "digits"
    for args, message in [(("--onnx", exported, ckpt, digits), "not both"),
                          (("--onnx", exported, "--device", "cuda", digits), "argument --device"),
                          (("--onnx", tmp_path / "missing.onnx", digits), "no ONNX model at"),
                          (("--onnx", ckpt, digits), "is not an ONNX model"),
                          ((ckpt,), "required: PATH")]:
        done = run("predict.py", *args)
        assert done.returncode == 2 and done.stdout == "", args
        assert done.stderr.startswith("error: ") and message in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.slow
def test_the_core_install_needs_none_of_the_export_packages(trained, exported):
    """predict.py with a checkpoint runs where onnx, onnxscript and onnxruntime are missing; --onnx names them."""
    _, ckpt, _ = trained
    without = ("import runpy, sys; sys.modules.update(onnx=None, onnxscript=None, onnxruntime=None); "
               "sys.argv[0] = 'predict.py'; runpy.run_path('predict.py', run_name='__main__')")
    digit = REPO / "examples" / "digits" / "7.png"
    done = run("-c", without, ckpt, digit)
    assert done.returncode == 0 and done.stdout.startswith(f"{digit}: "), done.stderr
    done = run("-c", without, "--onnx", exported, digit)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: onnxruntime is not installed: pip install -r requirements-export.txt " \
                          "(make export does it)\n"


def test_another_onnx_model_is_refused(tmp_path):
    path = tmp_path / "other.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)
    with pytest.raises(export.OnnxModelError, match="not of this repo's Net"):
        export.OnnxNet(path)


def misbehaving_model(path, shape, *nodes):
    """An ONNX model that declares the Net's input and output, (N, 1, 28, 28) -> (N, 10), which onnxruntime reports at
    load, but computes `nodes` on `image` and reshapes their output `y` to `shape`, read from the data at run time."""
    h, T = onnx.helper, onnx.TensorProto
    graph = h.make_graph([*nodes, h.make_node("ReduceMax", ["image"], ["max"], keepdims=0),  # shape = max * 0 + shape
                          h.make_node("Mul", ["max", "zero"], ["none"]), h.make_node("Add", ["none", "to"], ["s"]),
                          h.make_node("Cast", ["s"], ["shape"], to=T.INT64),
                          h.make_node("Reshape", ["y", "shape"], ["log_probs"])], "misbehaving",
                         [h.make_tensor_value_info("image", T.FLOAT, ["N", 1, 28, 28])],
                         [h.make_tensor_value_info("log_probs", T.FLOAT, ["N", 10])],
                         [h.make_tensor("zero", T.FLOAT, [], [0]), h.make_tensor("to", T.FLOAT, [2], shape),
                          h.make_tensor("axis", T.INT64, [1], [1])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("case", ["shape", "fails"])
def test_a_model_that_misbehaves_when_run_is_one_line(tmp_path, capfd, case):
    """Shape inference cannot see these: their output is (N, 1), or a reshape of (N, 1, 28, 28) to (5, 10) fails."""
    import predict

    h = onnx.helper
    nodes = {"shape": ([-1, 1], h.make_node("Flatten", ["image"], ["flat"]),
                       h.make_node("ReduceSum", ["flat", "axis"], ["y"], keepdims=1)),
             "fails": ([5, 10], h.make_node("Identity", ["image"], ["y"]))}[case]
    path = misbehaving_model(tmp_path / f"{case}.onnx", *nodes)
    assert [o.shape for o in export.OnnxNet(path).session.get_outputs()] == [["N", 10]]  # passes the load checks
    with pytest.raises(SystemExit) as stop:
        predict.main(["--onnx", str(path), str(REPO / "examples" / "digits" / "7.png")])
    out, err = capfd.readouterr()  # the runtime's own log lines too
    assert stop.value.code == 2 and out == "" and err.startswith(f"error: {path} ") and len(err.splitlines()) == 1, err


def test_an_empty_out_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        export_cli.main([str(tmp_path / "model.pt"), "--out", ""])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--out: an empty path" in err and len(err.splitlines()) == 1


# --- export.py's failures: one line, the exit status of cli.py, no file left behind --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "out_under_a_file", "out_is_a_folder"])
def test_export_cli_errors(trained, tmp_path, case):
    _, ckpt, _ = trained
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint")
    out = tmp_path / "model.onnx"
    args = {"missing": (tmp_path / "none.pt", "--out", out), "not_a_checkpoint": (junk, "--out", out),
            "out_under_a_file": (ckpt, "--out", junk / "model.onnx"), "out_is_a_folder": (ckpt, "--out", tmp_path)}
    before = sorted(os.listdir(tmp_path))
    done = run("export.py", *args[case])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1, done.stderr
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary left


@pytest.mark.slow
def test_a_failed_write_is_exit_1_and_leaves_nothing(trained, tmp_path, monkeypatch, capsys):
    _, ckpt, _ = trained
    real_atomic_write = export.atomic_write

    def full_disk(path, write, **kw):  # the real atomic write, whose file fills the disk half-way
        def half(f):
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_atomic_write(path, half, **kw)

    monkeypatch.setattr(export, "atomic_write", full_disk)
    with pytest.raises(SystemExit) as stop:
        export_cli.main([str(ckpt), "--out", str(tmp_path / "model.onnx")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.startswith("error: cannot write") and "No space left" in err
    assert len(err.splitlines()) == 1 and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_failed_export_is_exit_1(trained, tmp_path, monkeypatch, capsys):
    _, ckpt, _ = trained

    def broken(*args, **kwargs):
        raise RuntimeError("an operator the exporter does not know\nand more lines")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(SystemExit) as stop:
        export_cli.main([str(ckpt), "--out", str(tmp_path / "model.onnx")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err == "error: the ONNX export failed (RuntimeError: an operator the exporter " \
                                          "does not know)\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_a_missing_package_is_one_line_naming_the_requirements(trained, tmp_path, monkeypatch, capsys, package):
    _, ckpt, _ = trained
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError, as when it is not installed
    with pytest.raises(SystemExit) as stop:
        export_cli.main([str(ckpt), "--out", str(tmp_path / "model.onnx")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {package} is not installed")
    assert "requirements-export.txt" in err and "make export" in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # needs a trained checkpoint
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_during_the_export_is_one_line_130_and_writes_nothing(trained, tmp_path, sig):
    """Stopped while the exporter loads (a stand-in onnxscript that says so, then hangs): one line, exit 130."""
    (tmp_path / "onnxscript").mkdir()
    (tmp_path / "onnxscript" / "__init__.py").write_text(
        "import os, time\nopen(os.environ['S5_TEST_EXPORTING'], 'w').close()\ntime.sleep(120)\n")
    exporting, out = tmp_path / "exporting", tmp_path / "model.onnx"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "S5_TEST_EXPORTING": str(exporting)}
    with subprocess.Popen([sys.executable, str(REPO / "export.py"), str(trained[1]), "--out", str(out)], env=env,
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        while not exporting.exists() and proc.poll() is None:  # wait for the export to start, not for a time
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "error: interrupted: nothing was written\n" and stdout == "", stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exporting", "onnxscript"]
