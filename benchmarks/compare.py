"""The HTTP comparison, side by side in one run, plus the in-process figures; writes a JSON file of every figure.

    python benchmarks/compare.py [--quick] [--out benchmarks/results.json]

ASGI: a Starlette app under uvicorn (1 worker, uvloop and httptools when installed, no access log). WSGI: a Flask
app under gunicorn (1 worker, ``gthread``, 8 threads). Configurations: the bare app; token-only (a middleware
calling ``jwt.decode`` on every request); sa-middleware on ``memory://``, ``sqlite:///`` and ``redis://``. Each
is measured on ``GET /plain`` (``Policy(max_sessions=5)``) and on ``PUT /objects/{id}``
(``Policy(locks=["object:{id}"])``, 997 objects) with wrk (``-t1 -c32``, a warm-up, then the measured run), 64
principals each with its own RS256 token, requests rotating over them. Configurations are alternated within each
round (forwards, then backwards), every server is started fresh on a fresh store; the figures are medians over
the rounds. The in-process figures (``benchmarks/inprocess.py``, a fresh interpreter per package and round) are
taken the same way: packages alternated within each round, medians over the rounds. Redis is a private
``redis-server`` started for the run (persistence off) unless ``--redis`` names one.

Needs wrk (Debian/Ubuntu: ``apt-get install wrk``; macOS: ``brew install wrk``) and the bench extra
(``pip install -e '.[bench]'``: uvicorn, uvloop, httptools, gunicorn, starlette, flask, redis).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
CONFIGS = ("bare", "token", "memory", "sqlite", "redis")
ROUTES = {"plain": ("GET", "/plain", 0), "lock": ("PUT", "/objects/", 997)}
LABELS = {"bare": "bare app", "token": "token-only (jwt.decode per request)", "memory": "sa-middleware memory://",
          "sqlite": "sa-middleware sqlite:///", "redis": "sa-middleware redis://"}


def fail(message: str) -> NoReturn:
    print(f"benchmarks: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_tools() -> dict[str, str]:
    """What the run needs, or a clear message saying how to install it."""
    if shutil.which("wrk") is None:
        fail("wrk is not installed. Debian/Ubuntu: sudo apt-get install wrk; macOS: brew install wrk")
    missing = []
    for module in ("uvicorn", "gunicorn", "starlette", "flask", "redis"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        fail(f"missing Python packages ({', '.join(missing)}): pip install -e '.[bench]'")
    tools = {"wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip()}
    for module in ("uvloop", "httptools"):
        try:
            tools[module] = __import__(module).__version__
        except ImportError:
            tools[module] = "not installed (pip install -e '.[bench]')"
    return tools


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"the server exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}"
                 if process.stderr else f"the server exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/plain")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.05)
    fail(f"the server on port {port} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def redis_server(uri: str | None) -> Iterator[str]:
    """The given Redis, or a private one on a free port (persistence off), stopped afterwards."""
    if uri:
        yield uri
        return
    binary = shutil.which("redis-server")
    if binary is None:
        fail("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server), or pass --redis URI")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            import redis

            client = redis.Redis(port=port)
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        fail("the private redis-server did not start")
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, redis_uri: str) -> None:
        from inprocess import principal_tokens

        from sa_middleware.demo import DemoIssuer

        self.args, self.workdir, self.redis_uri = args, workdir, redis_uri
        issuer = DemoIssuer()
        self.keyfile = workdir / "issuer.pem"
        self.keyfile.write_text(issuer.public_pem if isinstance(issuer.public_pem, str)
                                else issuer.public_pem.decode())
        self.tokens = workdir / "tokens.txt"
        self.tokens.write_text("\n".join(principal_tokens(issuer)) + "\n")
        self.env = {**os.environ, "SA_BENCH_KEYFILE": str(self.keyfile), "SA_BENCH_ISSUER": issuer.issuer,
                    "SA_BENCH_AUDIENCE": issuer.audience, "PYTHONPATH": os.pathsep.join(
                        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.prefixes: list[str] = []

    def _env(self, config: str) -> dict[str, str]:
        config, _, tree = config.partition("@")
        env = dict(self.env, SA_BENCH_CONFIG="sa" if config in ("memory", "sqlite", "redis") else config)
        if tree:  # another copy of sa-middleware, measured side by side (--tree)
            env["PYTHONPATH"] = os.pathsep.join([self.args.trees[tree], env["PYTHONPATH"]])
        if config == "memory":
            env["SA_BENCH_STORE"] = "memory://"
        elif config == "sqlite":
            env["SA_BENCH_STORE"] = f"sqlite:///{self.workdir / uuid.uuid4().hex}.db"
        elif config == "redis":
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            self.prefixes.append(prefix)
            env["SA_BENCH_STORE"] = f"{self.redis_uri}?prefix={prefix}&bootstrap=true"
        return env

    def _command(self, server: str, port: int) -> list[str]:
        if server == "asgi":
            command = [sys.executable, "-m", "uvicorn", "servers:asgi_app", "--host", "127.0.0.1", "--port", str(port),
                       "--no-access-log", "--log-level", "warning"]
            with contextlib.suppress(ImportError):
                import uvloop  # noqa: F401
                command += ["--loop", "uvloop"]
            with contextlib.suppress(ImportError):
                import httptools  # noqa: F401
                command += ["--http", "httptools"]
            return command
        return [sys.executable, "-m", "gunicorn", "servers:wsgi_app", "--bind", f"127.0.0.1:{port}",
                "--workers", "1", "--worker-class", "gthread", "--threads", "8", "--log-level", "warning"]

    def wrk(self, port: int, route: str, seconds: float) -> dict[str, Any]:
        method, path, objects = ROUTES[route]
        command = ["wrk", "-t1", f"-c{self.args.connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s",
                   str(HERE / "rotate.lua"), f"http://127.0.0.1:{port}", "--", str(self.tokens), method, path,
                   str(objects)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        match = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
        if out.returncode != 0 or match is None:
            fail(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
        result: dict[str, Any] = json.loads(match.group(1))
        result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
        return result

    def measure(self, server: str, config: str, routes: list[str]) -> dict[str, dict[str, Any]]:
        port = free_port()
        process = subprocess.Popen(self._command(server, port), cwd=HERE, env=self._env(config),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_http(port, process)
            results = {}
            for route in routes:
                self.wrk(port, route, self.args.warmup)
                results[route] = self.wrk(port, route, self.args.duration)
            return results
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def run(self, server: str, configs: list[str], routes: list[str]) -> dict[str, Any]:
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {c: {r: [] for r in routes} for c in configs}
        for round_ in range(self.args.rounds):
            order = configs if round_ % 2 == 0 else configs[::-1]
            for config in order:
                for route, result in self.measure(server, config, routes).items():
                    samples[config][route].append(result)
                    print(f"  {server} round {round_ + 1} {config:<7} {route:<6} {result['rps']:9.0f} req/s "
                          f"p99 {result['p99_us'] / 1000:6.1f} ms non-2xx {result['non_2xx']}", flush=True)
        summary: dict[str, Any] = {}
        for config in configs:
            summary[config] = {}
            for route in routes:
                runs = samples[config][route]
                summary[config][route] = {
                    "rps": round(statistics.median(r["rps"] for r in runs)),
                    "p99_ms": round(statistics.median(r["p99_us"] for r in runs) / 1000, 2),
                    "p50_ms": round(statistics.median(r["p50_us"] for r in runs) / 1000, 2),
                    "non_2xx": sum(r["non_2xx"] for r in runs),
                    "errors": sum(r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
                                  for r in runs),
                    "rounds_rps": [round(r["rps"]) for r in runs]}
        for config in configs:
            for route in routes:
                row = summary[config][route]
                row["x_bare"] = round(row["rps"] / summary["bare"][route]["rps"], 3)
                row["x_token"] = round(row["rps"] / summary["token"][route]["rps"], 3)
        return summary


def inprocess(redis_uri: str, quick: bool, pythonpath: str) -> dict[str, Any]:
    """The in-process figures (benchmarks/inprocess.py), measured in a fresh interpreter."""
    command = [sys.executable, str(HERE / "inprocess.py"), "--redis", redis_uri, "--rounds", "3" if quick else "7",
               "--batch", "200" if quick else "500"]
    out = subprocess.run(command, env={**os.environ, "PYTHONPATH": pythonpath}, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"in-process benchmark failed: {out.stderr[-2000:]}")
    for line in out.stderr.splitlines():
        print(f"  {line}", flush=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def median_of(runs: list[Any]) -> Any:
    """The figure-by-figure median of several runs' results (nested dicts of numbers)."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_of([run[key] for run in runs if key in run]) for key in first}
    if isinstance(first, int | float) and not isinstance(first, bool):
        value = statistics.median(runs)
        return round(value, 1) if isinstance(value, float) else value
    return first


def inprocess_rounds(redis_uri: str, quick: bool, rounds: int, paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The in-process figures of each package (label -> PYTHONPATH), measured like the HTTP configurations:
    ``rounds`` rounds, the packages alternated within each (forwards, then backwards), medians over the rounds."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in paths}
    labels = list(paths)
    for round_ in range(rounds):
        for label in labels if round_ % 2 == 0 else labels[::-1]:
            print(f"  in-process round {round_ + 1} {label or 'this checkout'}", flush=True)
            runs[label].append(inprocess(redis_uri, quick, paths[label]))
    return {label: median_of(found) for label, found in runs.items()}


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "load_average_at_start": load}


def checkout(path: Path) -> dict[str, Any]:
    """A copy of the package measured: its path and, in a git checkout, its commit and whether it has changes."""
    def git(*command: str) -> str | None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["git", "-C", str(path), *command], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                return out.stdout.strip()
        return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"path": str(path), "commit": git("rev-parse", "HEAD"), "changed": bool(status) if status is not None
            else None}


def targets(asgi: dict[str, Any], wsgi: dict[str, Any], inproc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the figure measured and whether it is met."""
    rows: list[tuple[str, float | None, str, float]] = []

    def get(table: dict[str, Any], config: str, route: str, field: str) -> float | None:
        value = table.get(config, {}).get(route, {}).get(field)
        return float(value) if value is not None else None

    rows.append(("ASGI sqlite plain x token-only", get(asgi, "sqlite", "plain", "x_token"), ">=", 1.0))
    rows.append(("ASGI sqlite lock x token-only", get(asgi, "sqlite", "lock", "x_token"), ">=", 0.8))
    bare_p99 = get(asgi, "bare", "plain", "p99_ms")
    sqlite_p99 = get(asgi, "sqlite", "plain", "p99_ms")
    rows.append(("ASGI sqlite plain p99 / bare p99", sqlite_p99 / bare_p99 if sqlite_p99 and bare_p99 else None,
                 "<=", 3.0))
    rows.append(("ASGI memory plain x bare", get(asgi, "memory", "plain", "x_bare"), ">=", 0.5))
    rows.append(("ASGI redis plain x token-only", get(asgi, "redis", "plain", "x_token"), ">=", 0.8))
    redis = inproc.get("redis", {})
    rows.append(("Redis script us per admission + release (plain)", redis.get("plain", {}).get("script_us"), "<=",
                 25.0))
    rows.append(("Redis script us per admission + release (lock)", redis.get("lock", {}).get("script_us"), "<=",
                 25.0))
    admit = inproc.get("admit_release_us", {})
    for store, limit in (("memory", 15.0), ("sqlite", 80.0), ("redis", 150.0)):
        for route in ("plain", "lock"):
            rows.append((f"in-process admit+release {store} {route} us", admit.get(f"{store} {route}"), "<=", limit))
    rows.append(("WSGI sqlite plain x token-only", get(wsgi, "sqlite", "plain", "x_token"), ">=", 1.0))
    rows.append(("stretch: ASGI sqlite plain x bare", get(asgi, "sqlite", "plain", "x_bare"), ">=", 0.5))
    out = []
    for name, value, op, limit in rows:
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append({"target": f"{name} {op} {limit:g}", "measured": None if value is None else round(value, 3),
                    "met": met})
    return out


def table(title: str, summary: dict[str, Any]) -> str:
    lines = [f"### {title}", "", "| configuration | route | req/s | x bare | x token-only | p99 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for config, routes in summary.items():
        name, _, tree = config.partition("@")
        label = LABELS[name] + (f" ({tree})" if tree else "")
        for route, row in routes.items():
            lines.append(f"| {label} | {route} | {row['rps']:,} | {row['x_bare']:.2f} | "
                         f"{row['x_token']:.2f} | {row['p99_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs and fewer in-process samples "
                                                             "(under two minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the HTTP comparison (default 3)")
    parser.add_argument("--duration", type=int, default=None, help="seconds of each measured wrk run (default 6)")
    parser.add_argument("--warmup", type=int, default=None, help="seconds of wrk warm-up (default 1)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--redis", default=None, help="use this Redis instead of a private redis-server (its "
                                                       "server-time figure is only meaningful if nobody else uses it)")
    parser.add_argument("--only", choices=("asgi", "wsgi", "inprocess"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                        help="also measure the sa-middleware configurations with the package found in PATH (e.g. a "
                             "checkout of another version), labelled LABEL, alternated with the others")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    args.trees = dict(item.split("=", 1) for item in args.tree)
    sa_configs = [c for c in CONFIGS if c not in ("bare", "token")]
    configs = list(CONFIGS) + [f"{c}@{label}" for label in args.trees for c in sa_configs]
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.duration = args.duration or (2 if quick else 6)
    args.warmup = args.warmup or 1
    parts = args.only or ["asgi", "wsgi", "inprocess"]
    tools = check_tools()
    sys.path.insert(0, str(HERE))
    started = time.time()
    results: dict[str, Any] = {
        "machine": machine(), "tools": tools, "checkout": checkout(HERE.parent),
        "trees": {label: checkout(Path(path)) for label, path in args.trees.items()},
        "settings": {"quick": quick, "rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
                     "wrk": f"-t1 -c{args.connections}", "principals": 64, "objects": 997,
                     "asgi_server": "uvicorn, 1 worker, no access log", "wsgi_server": "gunicorn, 1 worker, gthread, "
                                                                                       "8 threads"}}
    with tempfile.TemporaryDirectory() as tmp, redis_server(args.redis) as redis_uri:
        bench = Bench(args, Path(tmp), redis_uri)
        if "asgi" in parts:
            print("ASGI (Starlette under uvicorn)", flush=True)
            results["asgi"] = bench.run("asgi", configs, list(ROUTES))
        if "wsgi" in parts:
            print("WSGI (Flask under gunicorn gthread)", flush=True)
            results["wsgi"] = bench.run("wsgi", configs, ["plain"])
        if "inprocess" in parts:
            print("in-process", flush=True)
            paths = {"": bench.env["PYTHONPATH"], **{label: os.pathsep.join([path, bench.env["PYTHONPATH"]])
                                                    for label, path in args.trees.items()}}
            for label, figures in inprocess_rounds(redis_uri, quick, args.rounds, paths).items():
                results[f"in_process@{label}" if label else "in_process"] = figures
        if bench.prefixes:
            import redis

            client = redis.Redis.from_url(redis_uri)
            for prefix in bench.prefixes:
                for key in client.scan_iter(match=f"{prefix}:*", count=5000):
                    client.unlink(key)
            client.close()
    results["targets"] = targets(results.get("asgi", {}), results.get("wsgi", {}), results.get("in_process", {}))
    results["elapsed_s"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print()
    if "asgi" in results:
        print(table("ASGI: Starlette under uvicorn", results["asgi"]) + "\n")
    if "wsgi" in results:
        print(table("WSGI: Flask under gunicorn gthread", results["wsgi"]) + "\n")
    for key, figures in results.items():
        if key.startswith("in_process"):
            print(f"{key}: admit+release us", json.dumps(figures["admit_release_us"]))
            print(f"{key}: admit+release CPU us", json.dumps(figures["admit_release_cpu_us"]))
            print(f"{key}: SQL statements per admit+release", json.dumps(figures["sqlite_statements"]))
            print(f"{key}: Redis per admit+release", json.dumps(figures["redis"]))
    print()
    for row in results["targets"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        print(f"  {mark:>12}  {row['target']}: {row['measured']}")
    print(f"\nwritten to {args.out} ({results['elapsed_s']} s)")


if __name__ == "__main__":
    main()
