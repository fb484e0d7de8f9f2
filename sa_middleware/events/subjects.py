"""Subjects of security events (RFC 9493, SSF 1.0 section 3) and how they name our principals, sessions and devices.

Parsing (:func:`parse_subject`) accepts the formats this receiver can act on: ``iss_sub``, ``email``, ``opaque``,
``jwt_id`` and ``complex`` (with ``user``, ``device`` and ``session`` members; other members such as ``tenant``
are kept by name and not acted on). Any other format is refused (``invalid_request``).

Resolution (:meth:`SubjectResolver.resolve`) maps a subject to :class:`Targets`:

- ``iss_sub``: the principal ``sub`` (our tokens' ``sub``), when ``iss`` is a trusted issuer (the SET issuer, the
  Guard's token issuer, or ``subject_issuers``); otherwise nothing. When ``iss`` is one of the Guard's token
  issuers, the principal is that issuer's (principal state is kept per issuer); for every other subject the
  Guard's operations pick the issuer (its one issuer, or the one the store knows the subject under).
- ``email``: the principal whose ``sub`` is that address (IdPs that use e-mail addresses as ``sub``); pass a
  ``subject_resolver`` to the receiver to map it otherwise.
- ``opaque``: a session id for the session events (``session-revoked``), a device id for
  ``device-compliance-change``, the stream id for the SSF stream events, and a principal ``sub`` for every other
  event.
- ``jwt_id``: the session whose id is that ``jti`` (our session id is the token's ``sid``, else its ``jti``),
  when ``iss`` is trusted.
- ``complex``: ``user`` names the principal, ``device`` the device (the ``device_id`` claim of our tokens) and
  ``session`` the session (its ``sid``), each by one of the simple formats above (``iss_sub`` names a device or
  session by its ``sub``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SETError

__all__ = ["SIMPLE_FORMATS", "Subject", "SubjectId", "SubjectResolver", "Targets", "parse_subject"]

#: the simple subject identifier formats this receiver understands
SIMPLE_FORMATS = frozenset({"iss_sub", "email", "opaque", "jwt_id"})
_ACTED_MEMBERS = ("user", "device", "session")
_MAX_ID = 256  # the Guard's limit for principal, session and device ids
_VALUE_MEMBER = {"iss_sub": "sub", "email": "email", "opaque": "id", "jwt_id": "jti"}


@dataclass(frozen=True, slots=True)
class SubjectId:
    """One simple subject identifier: its format, its identifying value (``sub``, ``email``, ``id`` or ``jti``)
    and, for ``iss_sub`` and ``jwt_id``, its issuer."""

    format: str
    value: str
    issuer: str | None = None


@dataclass(frozen=True, slots=True)
class Subject:
    """The subject of an event: a simple identifier, or the members of a complex one."""

    format: str
    simple: SubjectId | None = None
    user: SubjectId | None = None
    device: SubjectId | None = None
    session: SubjectId | None = None
    other_members: tuple[str, ...] = ()

    def describe(self) -> str:
        """A short, loggable description (formats and member names, no identifier values)."""
        if self.simple is not None:
            return self.format
        members = [name for name in _ACTED_MEMBERS if getattr(self, name) is not None]
        return f"complex({', '.join([*members, *self.other_members])})"


@dataclass(frozen=True, slots=True)
class Targets:
    """What a subject names here. Empty fields name nothing; ``discard`` says why an event must be dropped."""

    principal: str | None = None
    session: str | None = None
    device: str | None = None
    stream: str | None = None
    discard: str | None = None
    issuer: str | None = None  # the principal's token issuer, when the subject names it (None: the Guard picks)


def _string(value: Any, what: str, limit: int = _MAX_ID) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise SETError("invalid_request", f"{what} must be a non-empty string of at most {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SETError("invalid_request", f"{what} must be valid UTF-8") from None
    return value


def _simple(value: Any, where: str) -> SubjectId:
    if not isinstance(value, Mapping):
        raise SETError("invalid_request", f"{where} must be a JSON object")
    fmt = value.get("format")
    if fmt not in SIMPLE_FORMATS:
        raise SETError("invalid_request", f"{where}: unsupported subject format")
    ident = _string(value.get(_VALUE_MEMBER[fmt]), f"{where}.{_VALUE_MEMBER[fmt]}")
    issuer = None
    if fmt in ("iss_sub", "jwt_id"):
        issuer = _string(value.get("iss"), f"{where}.iss", 2048)
    return SubjectId(fmt, ident, issuer)


def parse_subject(value: Any, where: str = "sub_id") -> Subject:
    """Parse a subject member; raise :class:`SETError` (``invalid_request``) for a malformed or unsupported one."""
    if not isinstance(value, Mapping):
        raise SETError("invalid_request", f"{where} must be a JSON object")
    fmt = value.get("format")
    if fmt != "complex":
        return Subject(str(fmt), simple=_simple(value, where))
    members: dict[str, SubjectId] = {}
    others: list[str] = []
    for name, member in value.items():
        if name == "format":
            continue
        if name in _ACTED_MEMBERS:
            members[name] = _simple(member, f"{where}.{name}")
        elif isinstance(member, Mapping) and isinstance(name, str) and len(name) <= 64:
            others.append(name)
        else:
            raise SETError("invalid_request", f"{where}: complex subject members must be subject identifiers")
    if not members and not others:
        raise SETError("invalid_request", f"{where}: a complex subject needs at least one member")
    return Subject("complex", None, members.get("user"), members.get("device"), members.get("session"),
                   tuple(sorted(others)))


class SubjectResolver:
    """Maps subjects to principals, sessions and devices (see the module docstring)."""

    def __init__(self, issuers: Iterable[str], critical_members: Iterable[str] = (),
                 state_issuers: Iterable[str] = ()) -> None:
        self.issuers = frozenset(issuers)
        self.critical_members = frozenset(critical_members)
        self.state_issuers = frozenset(state_issuers)  # the token issuers principal state is kept under

    def _trusted(self, ident: SubjectId) -> bool:
        return ident.issuer is None or ident.issuer in self.issuers

    def principal(self, ident: SubjectId | None) -> str | None:
        if ident is None or ident.format == "jwt_id" or not self._trusted(ident):
            return None
        return ident.value

    def session(self, ident: SubjectId | None) -> str | None:
        if ident is None or ident.format == "email" or not self._trusted(ident):
            return None
        return ident.value

    def principal_issuer(self, ident: SubjectId | None) -> str | None:
        """The token issuer an ``iss_sub`` subject names (None: any other subject, or an issuer of no tokens)."""
        if ident is None or ident.format != "iss_sub" or ident.issuer not in self.state_issuers:
            return None
        return ident.issuer

    def device(self, ident: SubjectId | None) -> str | None:
        return self.session(ident)  # the same formats name a device: opaque id, iss_sub sub, jwt_id jti

    def resolve(self, subject: Subject, kind: str) -> Targets:
        """``kind`` is what a simple ``opaque`` subject names for this event: ``"session"``, ``"device"``,
        ``"stream"`` or ``"principal"``."""
        simple = subject.simple
        if simple is not None:
            if simple.format == "jwt_id":
                return Targets(session=self.session(simple))
            if kind == "stream":
                return Targets(stream=simple.value if simple.format == "opaque" else None)
            if kind == "device" and simple.format in ("opaque", "iss_sub"):
                return Targets(device=self.device(simple))
            if kind == "session" and simple.format == "opaque":
                return Targets(session=simple.value)
            return Targets(principal=self.principal(simple), issuer=self.principal_issuer(simple))
        critical = sorted(self.critical_members.intersection(subject.other_members))
        if critical:
            return Targets(discard=f"critical subject member(s) not understood: {', '.join(critical)}")
        targets = Targets(self.principal(subject.user), self.session(subject.session), self.device(subject.device),
                          issuer=self.principal_issuer(subject.user))
        mapped = {"user": targets.principal, "device": targets.device, "session": targets.session}
        for name, value in mapped.items():  # a critical member we read but could not map is not processed either
            if name in self.critical_members and getattr(subject, name) is not None and value is None:
                return Targets(discard=f"critical subject member {name} names nothing here")
        return targets
