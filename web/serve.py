"""Serve a built page folder (make web-serve) on 127.0.0.1, as any static host would, until Ctrl-C. Python's
http.server with the types the page needs (.mjs as JavaScript, .wasm as WebAssembly, whatever this Python's
mimetypes knows) and its failures in one line. Exit: 0 stopped; 2 no page or an unusable port."""

import argparse
import functools
import http.server
import signal
import sys
from pathlib import Path

from build import Parser  # web/build.py's: a usage error is one line, exit 2

WEB = Path(__file__).resolve().parent


def port_number(text):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535, such as 8001")
    return int(text)


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".wasm": "application/wasm"}

    def log_message(self, *args):  # no line per request
        pass


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("port", nargs="?", type=port_number, default=8000, help="the port (default: 8000)")
    p.add_argument("--directory", type=Path, default=WEB / "dist", help="the folder (default: web/dist)")
    args = p.parse_args(argv)
    if not (args.directory / "index.html").is_file():
        p.error(f"{args.directory} has no page: build it first with make web")
    try:
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", args.port), functools.partial(Handler, directory=str(args.directory)))
    except OSError as e:
        p.error(f"cannot serve on 127.0.0.1:{args.port} ({e.strerror or e}): give another port, such as "
                f"make web-serve ARGS={args.port + 1 if args.port < 65535 else 8001}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped as by Ctrl-C
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    print(f"serving {args.directory} on http://127.0.0.1:{args.port}/ (Ctrl-C stops it)", flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
