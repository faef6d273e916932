"""Draw a digit in the browser and see what the trained Net reads: a local web page (Gradio).

    python demo.py                                      # the newest runs/*/best.pt, on port 7860
    python demo.py runs/fast-.../best.pt --share        # also a temporary public link, through Gradio's servers

Needs requirements-demo.txt (`make demo`). Exit status: 2 the checkpoint, a flag or Gradio is unusable; 130 stopped.
"""

import s5.startup  # noqa: F401  # isort: skip  (first: a signal while torch imports is one line, exit 130)
import os
import socket
import sys
import threading
from pathlib import Path

from model import Net
from s5 import checkpoints, cli, demo, errors
from s5.config import RUNS_DIR


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="best.pt, last.pt or model.pt (default: the newest runs/*/best.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=cli.whole_number(1, 65535), default=7860, help="port to serve on (default: 7860)")
    p.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    args = p.parse_args(argv)
    cli.show_logs()  # the demo's warnings (a refused drawing) as one line each
    with cli.stop_like_ctrl_c():
        try:
            try:  # the address before any work (the server would only say that its port is unusable)
                family, *_, (address, *_) = socket.getaddrinfo(args.host, None, type=socket.SOCK_STREAM)[0]
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((address, 0))  # any free port: this checks the address, the server checks its port
            except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError
                p.error(f"argument --host: cannot serve on {args.host!r} ({getattr(e, 'strerror', None) or e}): "
                        "give an address of this machine, such as 127.0.0.1, or 0.0.0.0 for every interface")
            path = args.checkpoint or max(Path(RUNS_DIR).glob("*/best.pt"), key=os.path.getmtime, default=None)
            if path is None:
                cli.fail("no checkpoint given and none in runs/*/best.pt: train one first (make train ARGS=\"--recipe "
                         "fast\")")
            checkpoints.load_checkpoint(path, model := Net())
            app = demo.build_app(model)
            try:
                _, _, share_url = app.launch(server_name=args.host, server_port=args.port, share=args.share,
                                             inbrowser=False, quiet=True, prevent_thread_lock=True,
                                             max_file_size=demo.MAX_UPLOAD_BYTES)
            except OSError as e:
                cli.fail(f"cannot serve on port {args.port} of {args.host} ({e}): pick another --port")
            try:  # said only now, as it is up
                print(f"serving {path} on http://{args.host}:{args.port}" + (f" and {share_url}" if share_url else ""),
                      flush=True)
                threading.Event().wait()  # until a signal (Python runs its handler in this thread): never returns
            finally:
                app.close(verbose=False)
        except errors.UserError as e:  # CheckpointError
            cli.fail(e, e.exit_code)
        except ImportError:  # build_app's
            cli.fail("Gradio is not installed: run `make demo` (or pip install -r requirements-demo.txt)")
        except KeyboardInterrupt:
            cli.fail("interrupted: the demo has stopped", cli.EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
