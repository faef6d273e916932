"""Draw a digit in the browser and see what the trained Net reads: a local web page (Gradio).

    python demo.py                          # the newest runs/*/best.pt
    python demo.py runs/fast-.../best.pt --port 7860
    python demo.py CHECKPOINT --share       # a temporary public link, through Gradio's servers

Needs the demo's packages: `make demo` installs them (requirements-demo.txt) and starts this.
Exit status: 2 when the checkpoint, a flag or Gradio is missing or unusable; 130 stopped (Ctrl-C, SIGTERM, SIGHUP).
"""

import signal
import sys
import threading

from model import Net
from s5 import checkpoints, cli, demo


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a service manager) and SIGHUP (a closed terminal) stop it as Ctrl-C does


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="best.pt, last.pt or model.pt (default: the newest runs/*/best.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every network interface)")
    p.add_argument("--port", type=cli.whole_number(1, 65535), default=7860, help="port to serve on")
    p.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    args = p.parse_args(argv)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        return serve(args)
    except KeyboardInterrupt:
        cli.fail("interrupted: the demo has stopped", cli.EXIT_INTERRUPTED)


def serve(args):
    try:
        demo.check_host(args.host)
    except demo.HostError as e:
        cli.fail(f"--host: {e}")
    path = args.checkpoint or demo.newest_checkpoint()
    if path is None:
        cli.fail("no checkpoint given and none in runs/*/best.pt: train one first (make train ARGS=\"--recipe fast\")")
    model = Net()
    try:
        checkpoints.load_checkpoint(path, model)
    except checkpoints.CheckpointError as e:
        cli.fail(e)
    try:
        app = demo.build_app(model)
    except ImportError:
        cli.fail("Gradio is not installed: run `make demo` (or pip install -r requirements-demo.txt)")
    try:
        _, _, share_url = app.launch(server_name=args.host, server_port=args.port, share=args.share,
                                     inbrowser=False, quiet=True, prevent_thread_lock=True,
                                     max_file_size=demo.MAX_UPLOAD_BYTES)
    except OSError as e:
        cli.fail(f"cannot serve on port {args.port} of {args.host} ({e}): pick another --port")
    try:
        print(f"serving {path} on http://{args.host}:{args.port}" + (f" and {share_url}" if share_url else ""),
              flush=True)  # only now: it is up
        threading.Event().wait()  # until a signal; Python runs its handler in this thread
    finally:
        app.close(verbose=False)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
