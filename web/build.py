"""Build the static page (make web): export.py's model.onnx (checked against PyTorch), the page and the ONNX Runtime
Web build it loads, made whole in a hidden folder, then swapped in. Exit: export.py's (1, 2); 2 usage; 130 stopped."""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WEB = Path(__file__).resolve().parent
PAGE = ["index.html", "app.js", "preprocess.js", "style.css"]
RUNTIME = ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]  # app.js loads these
ORT = WEB / "node_modules" / "onnxruntime-web" / "dist"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as the entry points' usage errors
        self.exit(2, f"error: {message}\n")


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="best.pt, last.pt or model.pt (default: the newest runs/*/best.pt)")
    p.add_argument("--out", type=Path, default=WEB / "dist", help="the folder to build (default: web/dist; replaced)")
    args = p.parse_args(argv)
    out, newest = args.out, max(Path("runs").glob("*/best.pt"), key=lambda f: f.stat().st_mtime, default=None)
    if not (checkpoint := args.checkpoint or newest and str(newest)):
        p.error('no checkpoint given and none in runs/*/best.pt: train one (make train ARGS="--recipe one-epoch")')
    if missing := [f for f in RUNTIME if not (ORT / f).is_file()]:
        p.error(f"onnxruntime-web is not installed ({missing[0]} is missing): run npm ci in web/ (make web does it)")
    if out.exists() and not (out.is_dir() and {f.name for f in out.iterdir()} <= {*PAGE, *RUNTIME, "model.onnx"}):
        p.error(f"--out {out} is not a folder this script built: give a new folder, or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # beside it: the swap is two renames
    try:
        (new := work / "new").mkdir()
        export = [sys.executable, str(WEB.parent / "export.py"), checkpoint, "--out", str(new / "model.onnx")]
        if code := subprocess.run(export, stdout=subprocess.DEVNULL).returncode:  # its line names the folder above
            shutil.rmtree(work)
            return code  # export.py has said why, in one line
        for name in PAGE + RUNTIME:
            shutil.copyfile((WEB if name in PAGE else ORT) / name, new / name)
    except KeyboardInterrupt:
        shutil.rmtree(work, ignore_errors=True)
        print(f"error: interrupted: {out} was left as it was", file=sys.stderr)
        return 130
    if out.exists():
        out.rename(work / "old")
    new.rename(out)
    shutil.rmtree(work)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"built {out} ({len(PAGE + RUNTIME) + 1} files, {size:.1f} MB; the model from {checkpoint}, checked against "
          "PyTorch): serve it with make web-serve (web/dist) or from any static host (docs/web.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
