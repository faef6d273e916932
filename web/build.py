"""Build the static page (make web): export.py's model.onnx (checked against PyTorch), the page and the ONNX Runtime
Web build it loads, made whole in a hidden folder beside --out, then swapped in; one build at a time per folder.
Exit: export.py's (1, 2); 1 a file could not be written; 2 usage; 130 stopped (Ctrl-C, SIGTERM, SIGHUP)."""

import argparse
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

WEB = Path(__file__).resolve().parent
PAGE = ["index.html", "app.js", "preprocess.js", "style.css"]
RUNTIME = ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]  # app.js loads these
ORT = WEB / "node_modules" / "onnxruntime-web" / "dist"
BUILT = {*PAGE, *RUNTIME, "model.onnx"}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as the entry points' usage errors
        self.exit(2, f"error: {message}\n")


def stop(signum, frame):  # SIGTERM and SIGHUP end the build as Ctrl-C does: cleaned up, one line, exit 130
    raise KeyboardInterrupt


def checked_out(p, text):
    """--out as an absolute path ('.' and 'a/..' named by what they are), refused unless it is new or this script's."""
    if not text.strip():
        p.error("argument --out: an empty path: give a folder name, such as web/dist")
    out = Path(os.path.abspath(text))
    if out.is_symlink():
        p.error(f"argument --out: {text} is a link: give the folder itself ({out.resolve()}) or a new folder")
    if out.exists() and not out.is_dir():
        p.error(f"argument --out: {text} is a file, not a folder: give a new folder, such as web/dist")
    if out.is_dir() and (other := sorted({f.name for f in out.iterdir()} - BUILT)):
        p.error(f"argument --out: {text} is not a folder this script built (it holds {other[0]}): give a new "
                "folder, or remove it first")
    return out


def export(checkpoint, onnx):
    """export.py in a child process (its torch stays out of this one): (exit code, what it said on stderr). A stop
    here stops it too (it writes nothing when stopped), and only this script's line is printed."""
    command = [sys.executable, str(WEB.parent / "export.py"), checkpoint, "--out", str(onnx)]
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        said = child.communicate()[1]
    except KeyboardInterrupt:
        child.terminate()  # export.py takes SIGTERM as Ctrl-C: nothing written
        child.wait()
        raise
    return child.returncode, said.strip() or f"error: export.py failed (exit {child.returncode})"


def main(argv=None):
    for s in SIGNALS:
        signal.signal(s, stop)
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="best.pt, last.pt or model.pt (default: the newest runs/*/best.pt)")
    p.add_argument("--out", default=str(WEB / "dist"), help="the folder to build (default: web/dist; replaced)")
    args = p.parse_args(argv)
    newest = max(Path("runs").glob("*/best.pt"), key=lambda f: f.stat().st_mtime, default=None)
    if not (checkpoint := args.checkpoint or newest and str(newest)):
        p.error('no checkpoint given and none in runs/*/best.pt: train one (make train ARGS="--recipe one-epoch")')
    if missing := [f for f in RUNTIME if not (ORT / f).is_file()]:
        p.error(f"onnxruntime-web is not installed ({missing[0]} is missing): run npm ci in web/ (make web does it)")
    out = checked_out(p, args.out)
    work = lock = None
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends, however it ends
            work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # beside it: the swap is 2 renames
        except BlockingIOError:
            p.error(f"another build is writing into {out.parent}: wait for it to finish, then build again")
        except OSError as e:
            p.error(f"argument --out: {args.out} cannot be written ({e.strerror}): give a writable place")
        out = checked_out(p, args.out)  # again, now that no other build can change it
        for stale in out.parent.glob(f".{out.name}-*"):  # a killed build's hidden folder: no other build runs now
            if stale != work and stale.is_dir() and not stale.is_symlink() and \
                    {f.name for f in stale.iterdir()} <= {"new", "old"}:
                shutil.rmtree(stale, ignore_errors=True)
        (new := work / "new").mkdir()
        code, said = export(checkpoint, new / "model.onnx")
        if code:
            print(said, file=sys.stderr)  # export.py's one line (what is wrong, what to do), or a bug's traceback
            return code
        for name in PAGE + RUNTIME:
            shutil.copyfile((WEB if name in PAGE else ORT) / name, new / name)
        for s in SIGNALS:  # the swap is not stopped half-way: the old folder or the new one, never none
            signal.signal(s, signal.SIG_IGN)
        if out.exists():
            out.rename(work / "old")
        new.rename(out)
    except KeyboardInterrupt:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C does not stop the clean-up
        print(f"error: interrupted: {out} was left as it was", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: cannot write {out} ({e.strerror or e}): free some space or give a writable --out",
              file=sys.stderr)
        return 1
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    serve = "make web-serve" if out == WEB / "dist" else f"python3 web/serve.py --directory {out}"
    print(f"built {out} ({len(BUILT)} files, {size:.1f} MB; the model from {checkpoint}, checked against PyTorch): "
          f"serve it with {serve}, or from any static host (docs/web.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
