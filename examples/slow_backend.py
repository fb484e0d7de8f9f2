"""A stand-in "system of record" for the example apps that answers every call after a delay.

Point an example at it (``WORKBENCH_BACKEND=http://127.0.0.1:9000``) and each write (ticket, approval, object
update) stays in flight for that long, so you can send a second request while the first one is running:

    python examples/slow_backend.py --delay 10          # listens on 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    delay = 10.0

    def do_POST(self) -> None:
        size = int(self.headers.get("content-length") or 0)
        call = json.loads(self.rfile.read(size) or b"{}")
        print(f"{self.path}: {call.get('principal')} fencing={call.get('fencing_tokens')} (answering in "
              f"{self.delay:g} s)", flush=True)
        time.sleep(self.delay)
        body = b'{"recorded": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--delay", type=float, default=10.0, help="seconds before each answer")
    args = parser.parse_args()
    Handler.delay = args.delay
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"slow backend on http://127.0.0.1:{args.port} (delay {args.delay:g} s); Ctrl-C to stop", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
