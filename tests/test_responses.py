"""Tests for sa_middleware.responses: problem+json bodies, WWW-Authenticate (RFC 6750 / RFC 9470), Retry-After."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sa_middleware.denials import CODES, Denial
from sa_middleware.responses import denial_response

CODES_401 = sorted(code for code, (status, _) in CODES.items() if status == 401)
CODES_403 = sorted(code for code, (status, _) in CODES.items() if status == 403)
RETRY_CODES = sorted(code for code, (status, _) in CODES.items() if status in (409, 423, 429, 503))
INVALID_TOKEN_CODES = sorted(set(CODES_401) - {"missing_token", "step_up_required"})


def respond(denial: Denial, realm: str | None = None, default_retry_after: int = 1) -> tuple[int, dict[str, str],
                                                                                            dict[str, Any]]:
    status, headers, body = denial_response(denial, realm, default_retry_after)
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), f"duplicate headers: {names}"
    assert all(name == name.lower() for name in names)
    return status, dict(headers), json.loads(body)


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer")
    return dict(re.findall(r'([a-z_]+)="([^"]*)"', header))


# ---------------------------------------------------------------------------------------------------- body


@pytest.mark.parametrize("code", sorted(CODES))
def test_problem_json_body(code: str) -> None:
    status, headers, body = respond(Denial(code, "something specific happened"))
    expected_status, title = CODES[code]
    assert status == expected_status
    assert body["status"] == expected_status
    assert body["code"] == code
    assert body["title"] == title
    assert body["detail"] == "something specific happened"
    assert isinstance(body["type"], str) and body["type"].endswith(code)
    assert headers["content-type"] == "application/problem+json"
    assert headers["cache-control"] == "no-store"


def test_content_length_matches_body() -> None:
    _, headers, body = denial_response(Denial("object_locked", "x is locked"))
    assert headers[[name for name, _ in headers].index("content-length")][1] == str(len(body))


def test_detail_defaults_to_title() -> None:
    _, _, body = respond(Denial("session_paused"))
    assert body["detail"] == CODES["session_paused"][1]


def test_body_carries_scope_and_step_up_hints() -> None:
    _, _, body = respond(Denial("insufficient_scope", "no", scope=("a", "b")))
    assert body["scope"] == "a b"
    _, _, body = respond(Denial("step_up_required", "no", max_age=300, acr_values=("urn:mfa",)))
    assert (body["max_age"], body["acr_values"]) == (300, "urn:mfa")
    _, _, body = respond(Denial("invalid_token", "no"))
    assert not {"scope", "max_age", "acr_values"} & set(body)


def test_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError):
        Denial("teapot")


# ---------------------------------------------------------------------------------------------------- WWW-Authenticate


def test_missing_token_has_no_error_attribute() -> None:
    _, headers, _ = respond(Denial("missing_token", "send a token"))
    assert headers["www-authenticate"] == "Bearer"
    _, headers, _ = respond(Denial("missing_token", "send a token"), realm="payments")
    assert headers["www-authenticate"] == 'Bearer realm="payments"'


@pytest.mark.parametrize("code", INVALID_TOKEN_CODES)
def test_401_codes_say_invalid_token(code: str) -> None:
    _, headers, _ = respond(Denial(code, "the detail"), realm="api")
    header = headers["www-authenticate"]
    params = challenge_params(header)
    assert params["realm"] == "api"
    assert params["error"] == "invalid_token"
    assert params["error_description"] == "the detail"
    assert header.startswith('Bearer realm="api", ')


def test_insufficient_scope_challenge() -> None:
    status, headers, _ = respond(Denial("insufficient_scope", "need more", scope=("payments:approve", "read")))
    assert status == 403
    params = challenge_params(headers["www-authenticate"])
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "payments:approve read"
    assert params["error_description"] == "need more"


def test_step_up_challenge_rfc_9470() -> None:
    status, headers, _ = respond(Denial("step_up_required", "authenticate again", max_age=300,
                                       acr_values=("urn:mfa", "urn:hwk")))
    assert status == 401
    params = challenge_params(headers["www-authenticate"])
    assert params["error"] == "insufficient_user_authentication"
    assert params["max_age"] == "300"
    assert params["acr_values"] == "urn:mfa urn:hwk"
    assert params["error_description"] == "authenticate again"


def test_step_up_challenge_without_hints() -> None:
    _, headers, _ = respond(Denial("step_up_required", "x"))
    params = challenge_params(headers["www-authenticate"])
    assert params["error"] == "insufficient_user_authentication"
    assert "max_age" not in params and "acr_values" not in params


def test_step_up_max_age_zero_is_sent() -> None:
    _, headers, _ = respond(Denial("step_up_required", "x", max_age=0))
    assert challenge_params(headers["www-authenticate"])["max_age"] == "0"


@pytest.mark.parametrize("code", sorted(set(CODES_403) - {"insufficient_scope"}))
def test_other_403s_carry_a_bearer_challenge_without_error(code: str) -> None:
    _, headers, _ = respond(Denial(code, "x"))
    header = headers["www-authenticate"]
    assert header.startswith("Bearer")
    assert "error=" not in header


@pytest.mark.parametrize("code", RETRY_CODES)
def test_no_challenge_on_409_423_429_503(code: str) -> None:
    _, headers, _ = respond(Denial(code, "x"), realm="api")
    assert "www-authenticate" not in headers


@pytest.mark.parametrize("detail", ['bad "sig"\r\nX-Injected: 1\\', 'a"b\nc\rd\\e\tf', "caf\u00e9 \u2603 ok"])
def test_error_description_is_sanitised(detail: str) -> None:
    _, headers, _ = respond(Denial("invalid_token", detail))
    header = headers["www-authenticate"]
    assert "\r" not in header and "\n" not in header and "\\" not in header and "\t" not in header
    assert all(0x20 <= ord(ch) <= 0x7E for ch in header)
    description = re.search(r'error_description="([^"]*)"', header)
    assert description is not None
    assert '"' not in description.group(1)
    assert header.count('"') % 2 == 0


def test_sanitised_description_keeps_the_safe_characters() -> None:
    _, headers, _ = respond(Denial("invalid_token", 'bad "sig"\r\nX-Injected: 1'))
    assert challenge_params(headers["www-authenticate"])["error_description"] == "bad sigX-Injected: 1"


def test_scope_and_acr_values_are_sanitised() -> None:
    _, headers, _ = respond(Denial("insufficient_scope", "x", scope=('a"b', "c\nd")))
    header = headers["www-authenticate"]
    assert "\n" not in header
    assert challenge_params(header)["scope"] == "ab cd"


# ---------------------------------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize("code", RETRY_CODES)
def test_retry_after_on_409_423_429_503(code: str) -> None:
    _, headers, _ = respond(Denial(code, "x", retry_after=7))
    assert headers["retry-after"] == "7"
    _, headers, _ = respond(Denial(code, "x"), default_retry_after=3)
    assert headers["retry-after"] == "3"


@pytest.mark.parametrize("code", CODES_401 + CODES_403)
def test_no_retry_after_on_401_403(code: str) -> None:
    _, headers, _ = respond(Denial(code, "x", retry_after=7))
    assert "retry-after" not in headers
