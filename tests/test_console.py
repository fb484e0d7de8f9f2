"""The console: in a real headless Chromium against ``sa-middleware console`` and an app on uvicorn sharing one
SQLite store; and its access rules over HTTP (login link, CSRF, bearer tokens decided by the Guard)."""

from __future__ import annotations

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

import anyio.to_thread
import httpx
import pytest
from support import WAIT, problem

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.console import Console, asgi_app
from sa_middleware.demo import DemoIssuer, serve_asgi
from sa_middleware.records import AuditRecord

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = "<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>\u202eexe.txt\u2066"
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
        wait = WebDriverWait(driver, WAIT)
        driver.get(console_cli)
        row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr[data-session='agent-session']")))
        assert "agent-7" in row.text and "agent" in row.text and "active" in row.text

        # the lock of the request in flight: key, mode, holder and fencing token
        lock = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr[data-lock='work:9']")))
        [held] = guard.locks()
        cells = [c.text for c in lock.find_elements(By.TAG_NAME, "td")]
        assert cells[:5] == ["work:9", "exclusive", "svc-billing", held.session_id, str(held.fencing_token)]

        # the hostile subject is text: no script ran, no element was made from it, the bidi override is shown
        cell = driver.find_element(By.CSS_SELECTOR, "tr[data-session='hostile-session'] td[data-field='sub']")
        shown = cell.get_attribute("textContent") or ""
        assert "<script>window.__pwned=1</script>" in shown and "<img src=x" in shown
        assert "\u202e" not in shown and "U+202E" in shown and "U+2066" in shown
        assert driver.execute_script("return window.__pwned === undefined")
        assert cell.find_elements(By.CSS_SELECTOR, "*") == []
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1  # console.js, nothing else
        assert len(driver.find_elements(By.TAG_NAME, "img")) == 0

        # an action without its CSRF token is refused, from the page's own origin with its cookie
        status = driver.execute_async_script(
            "const done = arguments[0]; fetch('api/action', {method: 'POST', headers: {'Content-Type': "
            "'application/json'}, body: JSON.stringify({action: 'pause_session', session_id: 'agent-session', "
            "reason: 'no csrf'})}).then(r => done(r.status));")
        assert status == 403
        assert get(base, "/work/1", agent).status_code == 200

        # pause in the UI: the session's next request is refused with session_paused
        row.find_element(By.CSS_SELECTOR, "button[data-action='pause_session']").click()
        reason = wait.until(ec.visibility_of_element_located((By.ID, "action-reason")))
        reason.send_keys("agent looping on ticket 4711")
        driver.find_element(By.ID, "action-confirm").click()
        wait.until(ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, "tr[data-session='agent-session'] td[data-field='status']"), "paused"))
        problem(get(base, "/work/1", agent), 403, "session_paused")
        # the chart: the last hour of the audit trail by code (the seeded hour, and this test's requests)
        live = {"admitted": 4, "insufficient_scope": 1, "missing_token": 1}
        expected = {code: seeded.get(code, 0) + live.get(code, 0) for code in {*seeded, *live}}
        want = sorted(f"{c} {n}" for c, n in expected.items())
        try:
            wait.until(lambda d: sorted(e.text for e in d.find_elements(By.CSS_SELECTOR, "#legend span")) == want)
        except Exception:
            pytest.fail(f"legend {[e.text for e in driver.find_elements(By.CSS_SELECTOR, '#legend span')]} != {want}")
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
