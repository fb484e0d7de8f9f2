"""Denial -> HTTP response: status, ``WWW-Authenticate`` (RFC 6750, RFC 9470), ``Retry-After`` and an
``application/problem+json`` body (RFC 9457) with the extension member ``code``."""

from __future__ import annotations

import json
import re

from .denials import Denial

__all__ = ["denial_response"]

_RETRY_STATUSES = frozenset({409, 423, 429, 503})
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')  # RFC 6750: error_description is %x20-21 / %x23-5B / %x5D-7E


def _quote(value: str) -> str:
    return _UNSAFE.sub("", value)


def _challenge(denial: Denial, realm: str | None) -> str | None:
    # the DPoP scheme (RFC 9449 section 7.1) when the request used it or the token needs it; else Bearer
    dpop = denial.extra.get("auth_scheme") == "DPoP"
    params: list[str] = [f'realm="{realm}"'] if realm else []
    if denial.code == "missing_token":
        pass  # RFC 6750 section 3.1: no error attribute when the request carried no token
    elif denial.status == 401:
        error = "insufficient_user_authentication" if denial.code == "step_up_required" else "invalid_token"
        if dpop and denial.extra.get("auth_error") == "invalid_dpop_proof":
            error = "invalid_dpop_proof"
        params += [f'error="{error}"', f'error_description="{_quote(denial.detail)}"']
        if denial.max_age is not None:
            params.append(f'max_age="{denial.max_age}"')
        if denial.acr_values:
            params.append(f'acr_values="{_quote(" ".join(denial.acr_values))}"')
    elif denial.code == "insufficient_scope":
        params += ['error="insufficient_scope"', f'error_description="{_quote(denial.detail)}"']
        if denial.scope:
            params.append(f'scope="{_quote(" ".join(denial.scope))}"')
    elif denial.status != 403:
        return None
    algs = denial.extra.get("dpop_algs")
    if dpop and isinstance(algs, str) and algs:
        params.append(f'algs="{_quote(algs)}"')
    scheme = "DPoP" if dpop else "Bearer"
    return f"{scheme} " + ", ".join(params) if params else scheme


def denial_response(denial: Denial, realm: str | None = None,
                    default_retry_after: int = 1) -> tuple[int, list[tuple[str, str]], bytes]:
    """The status, headers and body for a denial. The body never contains a token or a secret."""
    body: dict[str, object] = {
        "type": f"urn:sa-middleware:problem:{denial.code}",
        "title": denial.title,
        "status": denial.status,
        "detail": denial.detail or denial.title,
        "code": denial.code,
    }
    if denial.scope:
        body["scope"] = " ".join(denial.scope)
    if denial.max_age is not None:
        body["max_age"] = denial.max_age
    if denial.acr_values:
        body["acr_values"] = " ".join(denial.acr_values)
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = [("content-type", "application/problem+json"), ("content-length", str(len(payload))),
               ("cache-control", "no-store")]
    challenge = _challenge(denial, realm)
    if challenge is not None:
        headers.append(("www-authenticate", challenge))
    if denial.status in _RETRY_STATUSES:
        headers.append(("retry-after", str(denial.retry_after or default_retry_after)))
    return denial.status, headers, payload
