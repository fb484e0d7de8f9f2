"""The snippets of the README quickstart and the getting-started page run, as a reader would run them.

Each page is played top to bottom in a fresh directory, with the development key in that directory
(``SA_DEV_KEY``) and the package's virtualenv first on ``PATH``:

- a ``python`` block whose first line is ``# NAME.py`` is saved as that file; any other ``python`` block runs as a
  script (``python snippet.py``);
- a ``sh`` block runs in bash (``set -euo pipefail``); variables set in one block are seen by the next ones;
- an HTML comment just before a block says more: ``<!-- test: skip -->`` (not run: installing from the index),
  ``<!-- test: server -->`` (a shell command that serves the app: started in the background, and the page goes on
  once its port answers), ``<!-- test: serve asgi|wsgi MODULE:APP -->`` (the saved file is served on a real server,
  and asked for ``/health`` (public), ``/whoami`` without a token (401) and with a development token (200)),
  ``<!-- test: output -->`` (a ``text`` block: the lines the previous block prints, in order; ``...`` matches
  anything).

The port ``8000`` of a page is replaced by a free one. Every ``python`` and ``sh`` block of a page must run unless
marked ``skip``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/getting-started.md"]
BIN = Path(sys.executable).parent
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_NOTE = re.compile(r"<!--\s*test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    lang: str
    text: str
    note: str  # the test annotation just before the block ("" if none)
    line: int


def blocks(page: str) -> list[Block]:
    """The fenced blocks of a page, each with the ``<!-- test: ... -->`` comment right before it."""
    text = (ROOT / page).read_text()
    found = []
    for m in _FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        note = _NOTE.search(before)
        found.append(Block(m.group(1), m.group(2), note.group(1) if note else "", text.count("\n", 0, m.start()) + 1))
    return found


def runnable(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.lang in ("python", "sh") and b.note != "skip"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read() if proc.stdout else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing answers on port {port}")


def matches(expected: str, actual: str) -> bool:
    """Each expected line appears in ``actual``, in order (``...`` matches anything)."""
    lines = [line.rstrip() for line in actual.splitlines()]
    at = 0
    for want in (line.rstrip() for line in expected.strip("\n").splitlines()):
        pattern = re.compile(".*".join(re.escape(part) for part in want.split("...")) + "$")
        while at < len(lines) and not pattern.match(lines[at]):
            at += 1
        if at == len(lines):
            return False
        at += 1
    return True


def get(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Reader:
    """Plays a page's blocks in one directory, as a reader following the page would."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port = tmp, port
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "SA_DEV_KEY": str(tmp / "dev-key.pem"), "PYTHONPATH": str(tmp)}
        self.env.pop("SA_STORE", None)
        self.servers: list[subprocess.Popen[str]] = []
        self.ran = 0

    def text(self, block: Block) -> str:
        return block.text.replace("8000", str(self.port))

    def shell(self, block: Block) -> str:
        script = ("set -euo pipefail\n[ -f .snippet-env ] && source .snippet-env\nset -a\n" + self.text(block)
                  + "\nset +a\nexport -p > .snippet-env\n")
        done = subprocess.run(["bash", "-c", script], cwd=self.tmp, env=self.env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (block.line, block.text, done.stdout, done.stderr)
        return done.stdout

    def python(self, block: Block) -> str:
        first = block.text.split("\n", 1)[0]
        named = re.match(r"^# ([\w./-]+\.py)\b", first)
        if named:
            (self.tmp / named.group(1)).write_text(block.text)
            return ""
        (self.tmp / "snippet.py").write_text(self.text(block))
        done = subprocess.run([sys.executable, "snippet.py"], cwd=self.tmp, env=self.env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (block.line, block.text, done.stdout, done.stderr)
        return done.stdout

    def server(self, command: list[str]) -> None:
        proc = subprocess.Popen(command, cwd=self.tmp, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.servers.append(proc)
        wait_for_port(self.port, proc)

    def serve(self, block: Block, flavour: str, target: str) -> None:
        """Serve the saved app on a real server and ask it what every quickstart promises."""
        self.python(block)
        module, _, attr = target.partition(":")
        if flavour == "asgi":
            command = [str(BIN / "uvicorn"), target, "--port", str(self.port), "--log-level", "warning"]
        else:
            command = [sys.executable, "-c", f"from werkzeug.serving import run_simple; import {module}; "
                       f"run_simple('127.0.0.1', {self.port}, {module}.{attr}, threaded=True)"]
        self.server(command)
        try:
            base = f"http://127.0.0.1:{self.port}"
            sys.path.insert(0, str(ROOT))
            from sa_middleware.devkeys import dev_key

            token = dev_key(self.tmp / "dev-key.pem", announce=False).mint("reader", sid="reader-1")
            assert get(f"{base}/health") == (200, {"ok": True}), target
            status, body = get(f"{base}/whoami")
            assert (status, body.get("code")) == (401, "missing_token"), (target, status, body)
            status, body = get(f"{base}/whoami", token)
            assert status == 200 and body.get("principal") == "reader", (target, status, body)
        finally:
            self.stop()

    def stop(self) -> None:
        for proc in self.servers:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.servers.clear()

    def play(self, page: str) -> None:
        output = ""
        for block in blocks(page):
            note = block.note.split()
            if block.lang == "text" and note == ["output"]:
                assert matches(block.text, output), (page, block.line, block.text, output)
                continue
            if block.lang not in ("python", "sh") or note == ["skip"]:
                continue
            self.ran += 1
            if note and note[0] == "serve":
                self.serve(block, note[1], note[2])
                output = ""
            elif note == ["server"]:
                self.server(["bash", "-c", f"exec {self.text(block).strip()}"])
                output = ""
            elif block.lang == "sh":
                output = self.shell(block)
            else:
                output = self.python(block)


@contextmanager
def reader(tmp: Path) -> Iterator[Reader]:
    r = Reader(tmp, free_port())
    try:
        yield r
    finally:
        r.stop()


@pytest.mark.parametrize("page", PAGES)
def test_every_snippet_of_the_page_runs(page: str, tmp_path: Path) -> None:
    with reader(tmp_path) as r:
        r.play(page)
    assert r.ran == len(runnable(page)) >= 5


def test_skipped_snippets_are_rare() -> None:
    every = [b for page in PAGES for b in blocks(page) if b.lang in ("python", "sh")]
    skipped = [b for b in every if b.note == "skip"]
    assert len(skipped) <= 2 and len(every) >= 15, (len(skipped), len(every))
    assert all(b.note.split()[0] in ("skip", "server", "serve") for b in every if b.note)


def test_output_checks_can_fail() -> None:
    assert matches("a\n...c", "a\nb\nxxc\n") and matches('{"x":...}', '{"x":1}')
    assert not matches("b\na", "a\nb\n") and not matches("200\n200\n403", "200\n403\n200\n")
