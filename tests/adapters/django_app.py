"""The Django project of ``test_django.py``: settings (configured here, conftest-free), views and URL patterns.

``configure()`` sets up Django once per process if nothing else did; the test module applies its own
``ROOT_URLCONF`` / ``MIDDLEWARE`` with ``override_settings`` for its duration, so it does not depend on (or disturb)
whatever else the process configured. ``?hold=NAME`` parks a view (or a stream after its first chunk) at the gate
``APP.gate(NAME)`` until the test releases it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import django
from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path, re_path
from django.utils.decorators import method_decorator
from django.views import View
from support import WAIT, Gates

from sa_middleware import SAContext
from sa_middleware.adapters.django import MIDDLEWARE_PATH, get_guard, policy

TEST_SETTINGS: dict[str, Any] = {
    "ROOT_URLCONF": __name__,
    "MIDDLEWARE": [MIDDLEWARE_PATH],
    "ALLOWED_HOSTS": ["127.0.0.1", "localhost", "testserver"],
    "DEBUG": False,
}


def configure() -> None:
    """Configure Django for the tests unless the process already did."""
    if not settings.configured:
        settings.configure(SECRET_KEY="sa-middleware-tests", INSTALLED_APPS=[], DATABASES={}, USE_TZ=True,
                           LOGGING_CONFIG=None, **TEST_SETTINGS)
        django.setup()


class App(Gates):
    """The gates of the views (``support.Served`` drives them) and what the views recorded, by ``?rid=``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, dict[str, Any]] = {}

    def record(self, request: HttpRequest) -> dict[str, Any]:
        return self.records.setdefault(request.GET.get("rid", "-"), {})

    def park(self, request: HttpRequest) -> None:
        name = request.GET.get("hold")
        if name:
            gate = self.gate(name)
            gate.entered.set()
            assert gate.released.wait(WAIT), f"gate {name} never released"

    async def apark(self, request: HttpRequest) -> None:
        await asyncio.to_thread(self.park, request)


APP = App()


def context(request: HttpRequest) -> dict[str, Any]:
    sa: SAContext = request.sa  # type: ignore[attr-defined]
    return {"is_context": isinstance(sa, SAContext), "principal": sa.principal, "kind": sa.kind,
            "session_id": sa.session_id, "claims": dict(sa.claims), "ticket_id": sa.ticket_id, "route": sa.route,
            "params": {k: str(v) for k, v in sa.params.items()}, "fencing_tokens": dict(sa.fencing_tokens)}


def answer(request: HttpRequest, status: int = 200, **extra: Any) -> JsonResponse:
    """Park at the request's gate, then answer its context (and the locks held right now)."""
    APP.record(request)["ticket_id"] = request.sa.ticket_id  # type: ignore[attr-defined]
    APP.park(request)
    locks = [[lk.key, lk.ticket_id] for lk in get_guard().locks()]
    return JsonResponse({**context(request), "locks": locks, **extra}, status=status)


# -- the workbench (the five behaviours; sa_middleware.demo.play drives it) -------------------------------------

@policy(public=True)
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


@policy(public=True)
def demo_control(request: HttpRequest, action: str, name: str) -> JsonResponse:
    """``sa_middleware.demo.play``'s control routes. ``done`` answers at once: this adapter releases a ticket
    before the response leaves (``test_ticket_released_before_the_response_starts`` proves it)."""
    gate = APP.gate(name)
    if action == "release" and request.method == "POST":
        gate.released.set()
    elif action == "entered" and not gate.entered.wait(WAIT):
        return JsonResponse({"error": "never entered"}, status=504)
    return JsonResponse({action: name})


def whoami(request: HttpRequest) -> JsonResponse:
    return answer(request)


@policy(tags={"tickets"}, raises_risk=1, risk_window=60)
class Tickets(View):
    def post(self, request: HttpRequest) -> JsonResponse:
        return answer(request, ticket=uuid.uuid4().hex)


@policy(exclusive=True, max_risk=0, locks=["payment:{id}"], scopes={"payments:approve"})
def approve_payment(request: HttpRequest, id: int) -> JsonResponse:
    return answer(request, payment=id, approved=True)


@method_decorator(policy(locks=["object:{id}"], on_lock_conflict="pause"), name="put")
class ObjectView(View):
    def put(self, request: HttpRequest, id: int) -> JsonResponse:
        return answer(request, object=id, updated=True)


# -- one view per policy field the denial table needs ----------------------------------------------------------

def policy_view(**fields: Any) -> Any:
    @policy(**fields)
    def view(request: HttpRequest, **kwargs: Any) -> JsonResponse:
        return answer(request)
    return view


@policy(locks=["doc:{id}"])
def docs(request: HttpRequest, id: int) -> JsonResponse:
    assert isinstance(id, int)  # Django's converter ran
    return answer(request)


@policy(locks=["adoc:{id}"])
async def async_docs(request: HttpRequest, id: int) -> JsonResponse:
    APP.record(request)["ticket_id"] = request.sa.ticket_id  # type: ignore[attr-defined]
    await APP.apark(request)
    locks = [[lk.key, lk.ticket_id] for lk in await get_guard().alocks()]
    return JsonResponse({**context(request), "locks": locks})


@policy(exclusive=True, locks=["boom:{id}"])
def boom(request: HttpRequest, id: int) -> HttpResponse:
    APP.record(request)["ticket_id"] = request.sa.ticket_id  # type: ignore[attr-defined]
    raise RuntimeError("the view failed")


@policy(exclusive=True, locks=["boom:{id}"])
async def async_boom(request: HttpRequest, id: int) -> HttpResponse:
    raise RuntimeError("the async view failed")


def _stream(request: HttpRequest, kind: str) -> Iterator[bytes]:
    record = APP.record(request)
    try:
        yield b"first"
        APP.park(request)
        if kind == "boom":
            raise RuntimeError("the stream failed")
        if kind == "events":
            for _ in range(100_000):  # keeps writing until the server finds the client gone
                yield b"x" * 1024
            record["stream_completed"] = True
            return
        yield b"last"
        record["locks_after_last_chunk"] = {lk.ticket_id for lk in get_guard().locks()}
    except GeneratorExit:
        record["closed_early"] = True
        raise


@policy(exclusive=True, locks=["stream:{id}"])
def stream(request: HttpRequest, id: int, kind: str = "stream") -> StreamingHttpResponse:
    APP.record(request)["ticket_id"] = request.sa.ticket_id  # type: ignore[attr-defined]
    return StreamingHttpResponse(_stream(request, kind), content_type="text/plain")


@policy(exclusive=True, locks=["stream:{id}"])
async def async_stream(request: HttpRequest, id: int) -> StreamingHttpResponse:
    APP.record(request)["ticket_id"] = request.sa.ticket_id  # type: ignore[attr-defined]

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        await APP.apark(request)
        yield b"last"

    return StreamingHttpResponse(chunks(), content_type="text/plain")


@policy(exclusive=True, locks=["stream:{id}"])
async def async_events(request: HttpRequest, id: int) -> StreamingHttpResponse:
    """A long async stream: it runs until the client goes away (Django >= 5 notices) or 10 MB were sent."""
    record = APP.record(request)
    record["ticket_id"] = request.sa.ticket_id  # type: ignore[attr-defined]

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        await APP.apark(request)
        for _ in range(10_000):
            yield b"x" * 1024
            await asyncio.sleep(0)  # a send to a gone client returns at once: let Django see the disconnect
        record["stream_completed"] = True

    return StreamingHttpResponse(chunks(), content_type="text/plain")


class _Parked:
    """A file-like object whose first read parks at the request's gate (FileResponse reads it lazily)."""

    def __init__(self, request: HttpRequest) -> None:
        self.request = request
        self.chunks = [b"first", b"last"]
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        if len(self.chunks) == 1:
            APP.park(self.request)
        return self.chunks.pop(0) if self.chunks else b""

    def close(self) -> None:
        self.closed = True
        APP.record(self.request)["file_closed"] = True


@policy(exclusive=True, locks=["file:{id}"])
def file(request: HttpRequest, id: int) -> FileResponse:
    APP.record(request)["ticket_id"] = request.sa.ticket_id  # type: ignore[attr-defined]
    response = FileResponse(_Parked(request), content_type="text/plain")
    response.block_size = 5
    return response


# -- class-based views: a class policy, a method_decorator override, a plain @policy on a method ---------------

@policy(locks=["cbv:{id}"], max_in_flight=5)
@method_decorator(policy(exclusive=True, locks=["cbv-post:{id}"]), name="post")
class Thing(View):
    def get(self, request: HttpRequest, id: int) -> JsonResponse:
        return answer(request)

    def post(self, request: HttpRequest, id: int) -> JsonResponse:
        return answer(request)

    @policy(public=True)
    def options(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return answer(request)


class Plain(View):
    """No policy anywhere: the Guard's table, then default_policy."""

    def get(self, request: HttpRequest, **kwargs: Any) -> JsonResponse:
        return answer(request)


@policy(public=True)
class AsyncThing(View):
    async def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse(context(request))

    @policy(public=False, locks=["athing"])  # a plain @policy works on a method too
    async def post(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse(context(request))


org_patterns = [
    path("items/<slug:name>", policy_view(locks=["org:{org}:item:{name}"]), name="org-item"),
]

urlpatterns = [
    path("health", health),
    path("_demo/<str:action>/<str:name>", demo_control),
    path("whoami", whoami),
    path("tickets", Tickets.as_view()),
    path("payments/<int:id>/approve", approve_payment),
    path("objects/<int:id>", ObjectView.as_view()),
    path("docs/<int:id>", docs),
    path("async-docs/<int:id>", async_docs),
    path("exclusive", policy_view(exclusive=True)),
    path("slot", policy_view(max_in_flight=1)),
    path("once", policy_view(one_time=True)),
    path("admin", policy_view(scopes={"admin"})),
    path("mfa", policy_view(max_auth_age=300, acr_values=["urn:example:mfa"])),
    path("device", policy_view(require_compliant_device=True)),
    path("solo", policy_view(max_sessions=1)),
    path("risky", policy_view(raises_risk=1, risk_window=60)),
    path("careful", policy_view(max_risk=0)),
    path("open", policy_view(fail_open=True)),
    path("boom/<int:id>", boom),
    path("async-boom/<int:id>", async_boom),
    path("stream/<int:id>", stream),
    path("boom-mid/<int:id>", stream, {"kind": "boom"}),
    path("events/<int:id>", stream, {"kind": "events"}),
    path("async-stream/<int:id>", async_stream),
    path("async-events/<int:id>", async_events),
    path("file/<int:id>", file),
    path("things/<int:id>", Thing.as_view()),
    path("plain/<int:id>", Plain.as_view()),
    path("decorated-as-view/<int:id>", policy(locks=["dav:{id}"])(Plain.as_view())),
    path("athing", AsyncThing.as_view()),
    path("orgs/<int:org>/", include(org_patterns)),
    path("uuids/<uuid:key>", policy_view(locks=["thing:{key}"])),
    re_path(r"^legacy/(?P<year>[0-9]{4})/$", policy_view(locks=["year:{year}"])),
]

