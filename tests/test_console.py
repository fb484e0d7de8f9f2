"""The console: in a real headless Chromium against ``sa-middleware console`` and an app on uvicorn sharing one
SQLite store; and its access rules over HTTP (login link, CSRF, bearer tokens decided by the Guard)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import redis_support
from support import WAIT, problem

from sa_middleware import Denial, Guard, Policy, RequestInfo
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.console import Console, asgi_app
from sa_middleware.console.app import Request as ConsoleRequest
from sa_middleware.demo import DemoIssuer, serve_asgi
from sa_middleware.records import AuditRecord

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = ("<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>\u202eexe.txt\u2066"
           "root\U000e0041\u00ad")  # invisible: a tag character (ASCII smuggling), a soft hyphen
POLICIES = {"GET /work/{id}": Policy(locks=["work:{id}"]), "GET /admin-only": Policy(scopes={"sa:admin"})}


HOLD = threading.Event()  # a request with ?hold waits in the app for it (set by the test that holds)


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope.get("query_string") == b"hold":
        await anyio.to_thread.run_sync(HOLD.wait, WAIT)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def make_guard(issuer: DemoIssuer, store: str) -> Guard:
    return Guard(store=store, keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                 audience=issuer.audience, policies=POLICIES, audit_admissions=True)


@pytest.fixture
def app(issuer: DemoIssuer, tmp_path: Path) -> Iterator[tuple[str, Guard, str]]:
    """The application on uvicorn over a SQLite store file: (base URL, its Guard, the store URI)."""
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    guard = make_guard(issuer, store)
    base, stop = serve_asgi(SessionAwareMiddleware(ok_app, guard=guard))
    try:
        yield base, guard, store
    finally:
        stop()
        guard.close()


@pytest.fixture
def console_cli(app: tuple[str, Guard, str]) -> Iterator[str]:
    """``sa-middleware console`` on the app's store; yields its one-time login link."""
    proc = subprocess.Popen([sys.executable, "-m", "sa_middleware.cli", "console", "--store", app[2], "--port", "0",
                             "--operator", "ops-alice"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        link = ""
        while not link:
            line = proc.stdout.readline()
            assert line, f"the console exited: {proc.stderr.read() if proc.stderr else ''}"
            if "/login?token=" in line:
                link = line.strip().split()[-1]
        yield link
    finally:
        proc.terminate()
        proc.wait(WAIT)


def browser() -> Any:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1500", "--lang=en-GB"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def seed_history(guard: Guard) -> dict[str, int]:
    """An hour of past decisions in the audit trail (as the middleware records them); returns the count by code."""
    now = time.time()
    records: list[AuditRecord] = []
    for minute in range(1, 58):
        at = now - 3600 + minute * 60 + 30
        codes = ["admitted"] * (3 + minute % 5)
        codes += ["too_many_in_flight"] * (6 if 20 <= minute < 26 else 0)
        codes += ["object_locked"] * (2 if 40 <= minute < 45 else 0)
        codes += ["credential_compromised"] * (5 if minute == 50 else 0)
        records += [AuditRecord("admission" if c == "admitted" else "denial", c, "middleware", f"svc-{i % 3}",
                                f"s-{i % 3}", "POST /tickets", "", at) for i, c in enumerate(codes)]
    guard.store.record_audit(records)
    counts: dict[str, int] = {}
    for record in records:
        counts[record.code] = counts.get(record.code, 0) + 1
    return counts


def get(base: str, path: str, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(base + path, headers=headers, timeout=WAIT)


def test_console_in_chromium(app: tuple[str, Guard, str], console_cli: str, issuer: DemoIssuer) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    base, guard, _ = app
    agent = issuer.token("agent-7", sid="agent-session", sa_kind="agent", act={"sub": "alice"})
    hostile = issuer.token(HOSTILE, sid="hostile-session")
    assert get(base, "/work/1", agent).status_code == 200
    assert get(base, "/work/2", hostile).status_code == 200
    problem(get(base, "/work/3", None), 401, "missing_token")
    problem(get(base, "/admin-only", agent), 403, "insufficient_scope")
    seeded = seed_history(guard)
    HOLD.clear()
    holder = threading.Thread(target=get, args=(base, "/work/9?hold", issuer.token("svc-billing", sa_kind="service")))
    holder.start()

    driver = browser()
    try:
        # the page draws a table afresh when a poll finds it changed: an element found before may be gone when it
        # is used, so the test reads a table in one script and finds what it clicks again if it was redrawn
        wait = WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,))

        def texts(css: str) -> list[str]:
            return list(driver.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)", css))

        def click(css: str) -> None:
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True)

        driver.get(console_cli)
        row = wait.until(lambda d: texts("tr[data-session='agent-session']"))[0]
        assert "agent-7" in row and "agent" in row and "active" in row

        # the lock of the request in flight: key, mode, holder and fencing token
        cells = wait.until(lambda d: texts("tr[data-lock='work:9'] td"))
        [held] = guard.locks()
        assert cells[:5] == ["work:9", "exclusive", "svc-billing", held.session_id, str(held.fencing_token)]

        # the hostile subject is text: no script ran, no element was made from it, the bidi override is shown
        shown, children = driver.execute_script(
            "const c = document.querySelector(\"tr[data-session='hostile-session'] td[data-field='sub']\");"
            "return [c.textContent, c.childElementCount];")
        assert "<script>window.__pwned=1</script>" in shown and "<img src=x" in shown
        assert "\u202e" not in shown and "U+202E" in shown and "U+2066" in shown
        assert "\U000e0041" not in shown and "U+E0041" in shown and "U+00AD" in shown
        assert driver.execute_script("return window.__pwned === undefined")
        # every invisible character the CLI escapes, the console shows too (tag characters hide text: "alice"
        # and "alice" + U+E0041 must not look alike)
        for hidden in ("\U000e0041", "\u00ad", "\u180e", "\u206a", "\ufff9", "\ue000", "\u0378"):
            assert driver.execute_script("return show(arguments[0])", f"alice{hidden}") \
                == f"alice\u27e6U+{ord(hidden):04X}\u27e7"
        assert children == 0
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1  # console.js, nothing else
        assert len(driver.find_elements(By.TAG_NAME, "img")) == 0

        # a poll that finds nothing new leaves the rows as they are: a click in them is not lost to a redraw
        before = driver.execute_script(
            "document.querySelector(\"tr[data-session='agent-session']\").dataset.mark = 'kept';"
            "return document.getElementById('status').textContent;")
        wait.until(lambda d: d.find_element(By.ID, "status").text != before)
        assert texts("tr[data-session='agent-session'][data-mark='kept']")

        # an action without its CSRF token is refused, from the page's own origin with its cookie
        status = driver.execute_async_script(
            "const done = arguments[0]; fetch('api/action', {method: 'POST', headers: {'Content-Type': "
            "'application/json'}, body: JSON.stringify({action: 'pause_session', session_id: 'agent-session', "
            "reason: 'no csrf'})}).then(r => done(r.status));")
        assert status == 403
        assert get(base, "/work/1", agent).status_code == 200

        # pause in the UI: the session's next request is refused with session_paused
        click("tr[data-session='agent-session'] button[data-action='pause_session']")
        reason = wait.until(ec.visibility_of_element_located((By.ID, "action-reason")))
        reason.send_keys("agent looping on ticket 4711")
        driver.find_element(By.ID, "action-confirm").click()
        wait.until(ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, "tr[data-session='agent-session'] td[data-field='status']"), "paused"))
        problem(get(base, "/work/1", agent), 403, "session_paused")
        # the chart: the last hour of the audit trail by code (the seeded hour, and this test's requests, the
        # refusal just above included: the chart may have been drawn before it was recorded, but is drawn again)
        live = {"admitted": 4, "insufficient_scope": 1, "missing_token": 1, "session_paused": 1}
        expected = {code: seeded.get(code, 0) + live.get(code, 0) for code in {*seeded, *live}}
        want = sorted(f"{c} {n}" for c, n in expected.items())
        try:
            wait.until(lambda d: sorted(texts("#legend span")) == want)
        except Exception:
            pytest.fail(f"legend {texts('#legend span')} != {want}")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#chart rect")) > 57
        wait.until(ec.text_to_be_present_in_element((By.ID, "audit"), "agent looping on ticket 4711"))

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "console.png"
        assert driver.save_screenshot(str(shot))
        print(f"console screenshot: {shot}")
        if os.environ.get("SA_CONSOLE_DOCS_SHOT"):  # refresh the documentation's screenshot
            shutil.copy(shot, Path(__file__).parent.parent / "docs" / "img" / "console.png")

        HOLD.set()
        holder.join(WAIT)
        wait.until(ec.invisibility_of_element_located((By.CSS_SELECTOR, "tr[data-lock='work:9']")))

        # the cookie alone (no CSRF header) is refused outside the browser too; no cookie at all is 401
        cookie = {c["name"]: c["value"] for c in driver.get_cookies()}
        console_base = console_cli.split("/login?")[0]
        action = {"action": "resume_session", "session_id": "agent-session", "reason": "forged"}
        assert httpx.post(f"{console_base}/api/action", json=action, cookies=cookie, timeout=WAIT).status_code == 403
        assert httpx.post(f"{console_base}/api/action", json=action, timeout=WAIT).status_code == 401
        assert httpx.get(console_cli, timeout=WAIT).status_code == 403  # the login link works once
    finally:
        HOLD.set()
        driver.quit()

    problem(get(base, "/work/1", agent), 403, "session_paused")
    records = guard.audit(session_id="agent-session", kind="operation")
    assert [(r.code, r.source) for r in records][:2] == [("reason", "console:ops-alice"),
                                                          ("pause_session", "console:ops-alice")]
    assert records[0].detail == "pause_session: agent looping on ticket 4711"


@pytest.fixture
def bearer_console(issuer: DemoIssuer, tmp_path: Path) -> Iterator[tuple[str, Guard]]:
    """The console mounted in an app's own ASGI server, authorised by the app's Guard (no login link)."""
    guard = make_guard(issuer, f"sqlite:///{tmp_path / 'bearer.db'}")
    base, stop = serve_asgi(asgi_app(Console(guard, guard=guard)))
    try:
        yield base, guard
    finally:
        stop()
        guard.close()


def test_bearer_tokens_need_the_admin_scope_and_are_decided_by_the_guard(
        bearer_console: tuple[str, Guard], issuer: DemoIssuer) -> None:
    base, guard = bearer_console
    user = issuer.token("mallory", scope="tickets")
    admin = issuer.token("root-ops", scope="sa:admin", sid="ops-1")
    headers = {"authorization": f"Bearer {user}"}
    resp = httpx.get(f"{base}/api/state", headers=headers, timeout=WAIT)
    assert resp.status_code == 403 and "insufficient_scope" in resp.json()["error"]
    resp = httpx.post(f"{base}/api/action", headers=headers, timeout=WAIT,
                      json={"action": "rotate", "sub": "victim", "reason": "x"})
    assert resp.status_code == 403
    assert httpx.get(f"{base}/api/state", timeout=WAIT).status_code == 401
    assert httpx.get(f"{base}/login?token=guess", timeout=WAIT).status_code == 403  # no login link here

    admin_headers = {"authorization": f"Bearer {admin}"}
    state = httpx.get(f"{base}/api/state", headers=admin_headers, timeout=WAIT).json()
    assert state["operator"] == "root-ops" and state["csrf"] is None
    resp = httpx.post(f"{base}/api/action", headers=admin_headers, timeout=WAIT,
                      json={"action": "rotate", "sub": "victim", "reason": "leaked key"})
    assert resp.status_code == 200 and resp.json()["result"] == 1
    assert [(r.code, r.source) for r in guard.audit(sub="victim")] == [("reason", "console:root-ops"),
                                                                      ("rotate", "console:root-ops")]
    # a bad action is a clear 400, not a 500; no reason, no action
    for body in ({"action": "drop_tables", "reason": "x"}, {"action": "rotate", "sub": "victim"},
                 {"action": "pause_session", "reason": "x"}):
        assert httpx.post(f"{base}/api/action", headers=admin_headers, json=body, timeout=WAIT).status_code == 400

    # the admin's own session is session-aware: paused, the console refuses it too
    guard.pause_session("ops-1")
    resp = httpx.get(f"{base}/api/state", headers=admin_headers, timeout=WAIT)
    assert resp.status_code == 403 and "session_paused" in resp.json()["error"]

    # a browser logs in with the bearer token: the cookie session is decided again by the Guard per request
    guard.resume_session("ops-1")
    login = httpx.post(f"{base}/api/login", headers=admin_headers, timeout=WAIT)
    assert login.status_code == 200
    assert "HttpOnly" in login.headers["set-cookie"] and "SameSite=Strict" in login.headers["set-cookie"]
    with httpx.Client(base_url=base, cookies=login.cookies, timeout=WAIT) as client:
        assert client.get("/api/state").status_code == 200
        guard.revoke_principal("root-ops")  # the admin token is now revoked: the cookie dies with it
        assert client.get("/api/state").status_code == 401


def test_pages_carry_a_strict_content_security_policy(bearer_console: tuple[str, Guard]) -> None:
    base, _ = bearer_console
    for path in ("/", "/static/console.js", "/api/state"):
        resp = httpx.get(base + path, timeout=WAIT)
        assert resp.headers["content-security-policy"].startswith("default-src 'self'")
        assert resp.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{base}/static/../app.py", timeout=WAIT).status_code == 404
    page = httpx.get(base + "/", timeout=WAIT).text
    script = httpx.get(base + "/static/console.js", timeout=WAIT).text
    assert not re.search(r"\.(inner|outer)HTML\s*\+?=|insertAdjacentHTML|document\.write|eval\(", script)
    assert "http" not in page.replace("http-equiv", "")  # no CDN: every asset is served by the console


def test_cli_refuses_a_non_loopback_bind() -> None:
    out = subprocess.run([sys.executable, "-m", "sa_middleware.cli", "console", "--store", "sqlite:///x.db",
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a loopback address" in out.stderr


def test_actions_on_a_subject_known_under_two_issuers_name_the_issuer(tmp_path: Path) -> None:
    """One ``sub`` from two issuers is two principals: the console lists each with its issuer, and an action on
    one names it (without it the operation cannot tell them apart: a clear 400, nothing changed)."""
    a, b = DemoIssuer(issuer="https://idp-a.example"), DemoIssuer(issuer="https://idp-b.example")
    b.private_key, b.public_pem = a.private_key, a.public_pem
    guard = Guard(store=f"sqlite:///{tmp_path / 'two.db'}", keys=a.public_pem, algorithms=["RS256"],
                  issuer=[a.issuer, b.issuer])
    try:
        for idp in (a, b):
            outcome = guard.admit(RequestInfo("GET", "/x", {"authorization": f"Bearer {idp.token('alice', gen=0)}"}))
            assert not isinstance(outcome, Denial)
            guard.release(outcome.ticket)
        console = Console(guard, guard=guard)
        admin = {"authorization": f"Bearer {a.token('root-ops', scope='sa:admin')}",
                 "content-type": "application/json"}

        def act(**body: str) -> Any:
            return console.handle(ConsoleRequest("POST", "/api/action", "", admin, json.dumps(body).encode()))

        state = json.loads(console.handle(ConsoleRequest("GET", "/api/state", "", admin)).body)
        assert {s["iss"] for s in state["sessions"] if s["sub"] == "alice"} == {a.issuer, b.issuer}
        refused = act(action="rotate", sub="alice", reason="leaked")
        assert refused.status == 400 and b"ambiguous" in refused.body
        done = act(action="rotate", sub="alice", issuer=b.issuer, reason="leaked")
        assert done.status == 200 and json.loads(done.body)["result"] == 1
        assert guard.rotate("alice", issuer=a.issuer) == 1  # A's alice was not rotated by the console
        done = act(action="report_compromise", sub="alice", issuer=a.issuer, reason="phished")
        assert done.status == 200 and len(json.loads(done.body)["result"]) == 1
        assert act(action="pause_session", session_id="s", issuer=a.issuer, reason="x").status == 400
    finally:
        guard.close()


def test_cli_json_prints_the_login_link_and_never_the_store_password() -> None:
    """``console --json`` prints one JSON line (the link a script opens); neither form echoes the password of the
    store URI."""
    redis_support.redis_store_available()
    shared = redis_support.shared_redis_url()
    uri = shared.replace("redis://", "redis://:s3cret-pw@", 1) + f"?prefix=console-{os.getpid()}"
    for extra in (["--json"], []):
        proc = subprocess.Popen([sys.executable, "-m", "sa_middleware.cli", "console", "--store", uri, "--port", "0",
                                 *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline()]
            while "/login?token=" not in lines[-1]:
                assert lines[-1], f"the console exited: {proc.stderr.read() if proc.stderr else ''}"
                lines.append(proc.stdout.readline())
        finally:
            proc.terminate()
            proc.wait(WAIT)
        assert not any("s3cret-pw" in line for line in lines), lines
        if extra:
            shown = json.loads(lines[0])
            assert shown["login_url"].startswith("http://127.0.0.1:") and "***" in shown["store"]


def test_a_rotation_no_token_survives_is_a_warning_in_the_console(tmp_path: Path, issuer: DemoIssuer) -> None:
    """The principal's tokens carry no generation claim: after a rotation every token is refused and a new one
    will not help; the console's answer says so (as the CLI and the operation do)."""
    guard = make_guard(issuer, f"sqlite:///{tmp_path / 'gen.db'}")
    try:
        for sub, claims in (("svc-plain", {}), ("svc-counted", {"gen": 2})):
            outcome = guard.admit(RequestInfo("GET", "/x", {"authorization": f"Bearer {issuer.token(sub, **claims)}"}))
            assert not isinstance(outcome, Denial)
            guard.release(outcome.ticket)
        guard.flush()
        console = Console(guard, guard=guard)
        admin = {"authorization": f"Bearer {issuer.token('root-ops', scope='sa:admin')}",
                 "content-type": "application/json"}
        answers = [json.loads(console.handle(ConsoleRequest("POST", "/api/action", "", admin, json.dumps(
            {"action": "rotate", "sub": sub, "reason": "leaked"}).encode())).body) for sub in ("svc-plain",
                                                                                               "svc-counted")]
        assert answers[0]["result"] == 1 and "no generation claim" in answers[0]["warning"]
        assert answers[1]["result"] == 3 and "warning" not in answers[1]
    finally:
        guard.close()


def test_asgi_cookie_headers_sent_apart_are_one_cookie_string(tmp_path: Path, issuer: DemoIssuer) -> None:
    """HTTP/2 servers (hypercorn) pass each cookie as its own ``cookie`` header: they are joined with ``; `` (RFC
    9113 section 8.2.3), so the console's session cookie is still found beside another cookie."""
    guard = make_guard(issuer, f"sqlite:///{tmp_path / 'h2.db'}")
    console = Console(guard, guard=guard, login_link=True)
    app = asgi_app(console)
    try:
        link = console.login_url("http://127.0.0.1")
        query = link.split("?", 1)[1].encode()

        async def call(path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "method": "GET", "path": path, "query_string": query, "headers": headers}
            await app(scope, receive, send)
            return sent[0]

        start = anyio.run(call, "/login", query, [])
        cookie = dict(start["headers"])[b"set-cookie"].split(b";")[0]
        answer = anyio.run(call, "/api/state", b"", [(b"cookie", b"theme=dark"), (b"cookie", cookie)])
        assert answer["status"] == 200
    finally:
        guard.close()
