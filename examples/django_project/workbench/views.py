"""The workbench's views. Each view's ``@policy`` is combined with SA_MIDDLEWARE's ``default_policy``; the view reads
who is calling, and the fencing tokens of the locks it holds, from ``request.sa``."""

from __future__ import annotations

import json
import urllib.request
import uuid
from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.http import require_GET, require_POST

from sa_middleware import SAContext
from sa_middleware.adapters.django import policy


def context(sa: SAContext) -> dict[str, Any]:
    return {"principal": sa.principal, "kind": sa.kind, "session_id": sa.session_id, "route": sa.route,
            "fencing_tokens": dict(sa.fencing_tokens)}


def backend(resource: str, id: int | None, sa: SAContext) -> None:
    """Record the action in the system of record, with the fencing tokens that prove we still hold the locks."""
    if not settings.WORKBENCH_BACKEND:
        return
    body = json.dumps({"principal": sa.principal, "session_id": sa.session_id, "id": id,
                       "fencing_tokens": dict(sa.fencing_tokens)}).encode()
    call = urllib.request.Request(f"{settings.WORKBENCH_BACKEND.rstrip('/')}/{resource}", data=body,
                                  method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(call, timeout=30):  # a sync view: Django runs it in a thread under ASGI
        pass


@require_GET
@policy(public=True)
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


@require_GET
def whoami(request: HttpRequest) -> JsonResponse:  # no decorator: the default policy (at most 3 sessions)
    return JsonResponse(context(request.sa))


@policy(tags={"tickets"}, raises_risk=1, risk_window=60)  # on the class: for every method of the view
class Tickets(View):
    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> JsonResponse:
        backend("tickets", None, request.sa)
        return JsonResponse({"ticket": uuid.uuid4().hex, "context": context(request.sa)}, status=201)


@require_POST
@policy(exclusive=True, max_risk=0, locks=["payment:{id}"], scopes={"payments:approve"})
def approve_payment(request: HttpRequest, id: int) -> JsonResponse:
    backend("payments", id, request.sa)
    return JsonResponse({"payment": id, "approved": True, "context": context(request.sa)})


@method_decorator(policy(locks=["object:{id}"], on_lock_conflict="pause"), name="put")  # for PUT only
class ObjectView(View):
    http_method_names = ["put"]

    def put(self, request: HttpRequest, id: int) -> JsonResponse:
        backend("objects", id, request.sa)
        return JsonResponse({"object": id, "updated": True, "context": context(request.sa)})
