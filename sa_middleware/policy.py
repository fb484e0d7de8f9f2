"""Per-route policies (a contract) and the route table that matches a request to one.

Routes are keyed ``"METHOD /path/{param}"`` with Starlette's path syntax (``{id}``, ``{id:int}``, ``{id:float}``,
``{id:uuid}``, ``{rest:path}``); ``"* /path"`` matches any method. The most specific match wins: more literal path
characters first, then fewer ``path`` parameters, then an exact method over ``*`` (so a catch-all such as
``GET /{rest:path}`` never shadows ``* /api/payments``). A path that matches no route is tried again with runs of
slashes collapsed and a trailing slash removed (``//payments/42/approve/`` is decided as ``/payments/42/approve``,
as routers that merge slashes would serve it). ``default_policy`` fills every field a route leaves unset, and
applies alone to requests that match no route.

Keys ``"TOOL <name>"``, ``"PROMPT <name>"`` and ``"RESOURCE <uri or uri template>"`` hold the policies of an MCP
server's tools, prompts and resources: HTTP requests never match them; the MCP adapter
(:mod:`sa_middleware.adapters.mcp`) reads them with :meth:`RouteTable.target` and refuses to start when one names
nothing on its server.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import string
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ConfigurationError, InvalidRequest
from .frozen import fast_init

__all__ = [
    "MAX_LOCK_KEY", "TARGET_KINDS", "EffectivePolicy", "Policy", "RouteMatch", "RouteTable", "as_policy", "lock_fields",
    "render_lock_key", "sample_paths", "starlette_syntax",
]

#: The longest lock key, in characters after rendering; a request whose key is longer gets 400 invalid_request.
MAX_LOCK_KEY = 512

SessionLimitAction = Literal["reject", "evict_oldest"]
LockConflictAction = Literal["reject", "wait", "pause"]
LockMode = Literal["exclusive", "shared"]

_SESSION_LIMIT_ACTIONS = ("reject", "evict_oldest")
_LOCK_CONFLICT_ACTIONS = ("reject", "wait", "pause")
_LOCK_MODES = ("exclusive", "shared")


def _str_set(value: Any, name: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, Iterable):
        raise ConfigurationError(f"{name} must be a set of strings")
    items = frozenset(value)
    if not all(isinstance(item, str) and item for item in items):
        raise ConfigurationError(f"{name} must contain non-empty strings")
    return items


@dataclass(frozen=True, slots=True)
class Policy:
    """What a route requires. Every field is optional; ``None`` means "unset: take it from ``default_policy``".

    See the "Policies" page of the documentation for the meaning and the default of each field. An unknown
    keyword raises :class:`~sa_middleware.errors.ConfigurationError` with the closest field name.
    """

    public: bool | None = None
    scopes: Set[str] | None = None
    max_sessions: int | None = None
    on_session_limit: SessionLimitAction | None = None
    max_in_flight: int | None = None
    exclusive: bool | None = None
    tags: Set[str] | None = None
    conflicts: Set[str] | None = None
    raises_risk: int | None = None
    risk_window: float | None = None
    max_risk: int | None = None
    locks: Sequence[str] | None = None
    lock_mode: LockMode | None = None
    on_lock_conflict: LockConflictAction | None = None
    lock_wait: float | None = None
    one_time: bool | None = None
    require_compliant_device: bool | None = None
    max_auth_age: int | None = None
    acr_values: Sequence[str] | None = None
    fail_open: bool | None = None
    _problem: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Values are normalised now; a bad value is reported by validate(), which the Guard (naming the route) and
        # the adapters' @policy decorators (naming the view) call, so the error says where the policy sits.
        try:
            self._normalise()
        except ConfigurationError as exc:
            object.__setattr__(self, "_problem", str(exc))

    def validate(self, where: str = "policy") -> Policy:
        """Raise :class:`ConfigurationError` naming ``where`` and the field if any value is invalid."""
        if self._problem is not None:
            raise ConfigurationError(f"{where}: {self._problem}")
        return self

    def _normalise(self) -> None:
        setattr_ = object.__setattr__
        for name in ("scopes", "tags", "conflicts"):
            setattr_(self, name, _str_set(getattr(self, name), name))
        for name in ("locks", "acr_values"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):
                    value = (value,) if name == "locks" else tuple(value.split())
                value = tuple(value)
                if not all(isinstance(item, str) and item for item in value):
                    raise ConfigurationError(f"{name} must be a list of non-empty strings")
                setattr_(self, name, value)
        for name in ("public", "exclusive", "one_time", "require_compliant_device", "fail_open"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigurationError(f"{name} must be True or False")
        for name, minimum in (("max_sessions", 1), ("max_in_flight", 1), ("raises_risk", 0),
                              ("max_risk", 0), ("max_auth_age", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ConfigurationError(f"{name} must be an integer >= {minimum}")
        for name in ("risk_window", "lock_wait"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value < 0):
                raise ConfigurationError(f"{name} must be a finite number of seconds >= 0")
        for name, allowed in (("on_session_limit", _SESSION_LIMIT_ACTIONS),
                              ("on_lock_conflict", _LOCK_CONFLICT_ACTIONS), ("lock_mode", _LOCK_MODES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}")
        for template in self.locks or ():
            _lock_fields(template)
            if len(template) > MAX_LOCK_KEY:
                raise ConfigurationError(f"locks: a template longer than {MAX_LOCK_KEY} characters renders no key")

    def merged(self, fallback: Policy | None) -> Policy:
        """This policy with every unset field taken from ``fallback``."""
        if fallback is None:
            return self
        return replace(fallback, **{f.name: getattr(self, f.name) for f in fields(self)
                                    if f.init and getattr(self, f.name) is not None})

    def effective(self) -> EffectivePolicy:
        """The policy with the library defaults filled in."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init and getattr(self, f.name) is not None}
        return EffectivePolicy(**values)


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


POLICY_FIELDS = frozenset(f.name for f in fields(Policy) if f.init)
_dataclass_init = Policy.__init__


@functools.wraps(_dataclass_init)
def _policy_init(self: Policy, *args: Any, **kwargs: Any) -> None:
    for name in kwargs:
        if name not in POLICY_FIELDS:
            raise ConfigurationError(f"Policy has no field {name!r}{_did_you_mean(name, POLICY_FIELDS)}")
    _dataclass_init(self, *args, **kwargs)


setattr(Policy, "__init__", _policy_init)  # noqa: B010  (unknown keywords: a ConfigurationError, not a TypeError)


def as_policy(value: Any, where: str) -> Policy:
    """``value`` as a :class:`Policy`: a Policy as is, or a dict of Policy fields (``{"max_sessions": 5}``)."""
    if isinstance(value, Policy):
        return value
    if isinstance(value, Mapping):
        for name in value:
            if name not in POLICY_FIELDS:
                hint = _did_you_mean(str(name), POLICY_FIELDS)
                raise ConfigurationError(f"{where}: unknown Policy field {name!r}{hint}")
        return Policy(**value)
    raise ConfigurationError(f"{where} must be a Policy or a dict of Policy fields")


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """A policy with every field resolved (library defaults for anything left unset)."""

    public: bool = False
    scopes: frozenset[str] = frozenset()
    max_sessions: int | None = None
    on_session_limit: SessionLimitAction = "reject"
    max_in_flight: int | None = None
    exclusive: bool = False
    tags: frozenset[str] = frozenset()
    conflicts: frozenset[str] = frozenset()
    raises_risk: int = 0
    risk_window: float = 60.0
    max_risk: int | None = None
    locks: tuple[str, ...] = ()
    lock_mode: LockMode = "exclusive"
    on_lock_conflict: LockConflictAction = "reject"
    lock_wait: float = 5.0
    one_time: bool = False
    require_compliant_device: bool = False
    max_auth_age: int | None = None
    acr_values: tuple[str, ...] = ()
    fail_open: bool = False


def _lock_fields(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigurationError(f"locks: template {template!r} is malformed: {exc}") from None
    for name in names:
        if not name.isidentifier():
            raise ConfigurationError(f"locks: template {template!r}: {{{name}}} is not a plain parameter name")
    return names


def lock_fields(template: str) -> list[str]:
    """The parameter names a lock template uses (``"payment:{id}"`` -> ``["id"]``)."""
    return _lock_fields(template)


def _target_key(key: object) -> str | None:
    """``"TOOL <name>"`` (``PROMPT``, ``RESOURCE``) normalised (kind upper-case, one space), or ``None`` for a
    route."""
    if not isinstance(key, str):
        return None
    kind, _, name = key.strip().partition(" ")
    kind = kind.upper()
    if kind not in TARGET_KINDS:
        return None
    name = name.strip()
    if kind == "RESOURCE":
        if not _TARGET_URI.fullmatch(name):
            raise ConfigurationError(f"{key!r}: expected 'RESOURCE <uri or uri template>' of 1-1024 printable "
                                     "ASCII characters without spaces")
    elif not _TARGET_NAME.fullmatch(name):
        raise ConfigurationError(f"{key!r}: expected '{kind} <name>', the name 1-128 characters of "
                                 "letters, digits, '_', '-', '.' and '/'")
    return f"{kind} {name}"


def render_lock_key(template: str, params: Mapping[str, Any]) -> str:
    """Render ``"payment:{id}"`` with the route's path parameters, so that one object has one key.

    Each value is taken as the router gives it (percent-decoded once, never again), put in Unicode NFC and
    normalised as a path: empty segments are dropped (``a//b/`` -> ``a/b``). A value with a ``.`` or ``..``
    segment, or a key longer than :data:`MAX_LOCK_KEY` characters, raises
    :class:`~sa_middleware.errors.InvalidRequest` (the request gets 400 ``invalid_request``). A template naming a
    missing parameter raises ``KeyError``.
    """
    key = template.format_map({name: _lock_value(value) for name, value in params.items()})
    if len(key) > MAX_LOCK_KEY:
        raise InvalidRequest(f"the lock key of this URL is longer than {MAX_LOCK_KEY} characters")
    return key


def _lock_value(value: Any) -> str:
    text = unicodedata.normalize("NFC", str(value))  # canonically equivalent spellings are one object
    if "/" not in text and text not in (".", ".."):
        return text
    segments = text.split("/")
    if "." in segments or ".." in segments:
        raise InvalidRequest("a path parameter that names a lock has a '.' or '..' segment")
    return "/".join(segment for segment in segments if segment)


_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::([a-zA-Z_][a-zA-Z0-9_]*))?}")
_CONVERTORS: dict[str, tuple[str, Any]] = {
    "str": ("[^/]+", str),
    "path": (".*", str),
    # any Unicode decimal digit and a sign, as int() / float() and werkzeug's converters take them: a path a
    # framework routes to a view is never missed by the table (and so never left to default_policy)
    "int": (r"-?\d+", int),
    "float": (r"-?\d+(?:\.\d+)?", float),
    "uuid": ("[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", uuid.UUID),
}
#: the kinds of non-HTTP table keys ("TOOL <name>"), kept for the MCP adapter
TARGET_KINDS = ("TOOL", "PROMPT", "RESOURCE")
_TARGET_NAME = re.compile(r"[A-Za-z0-9_./-]{1,128}")
_TARGET_URI = re.compile(r"[!-~]{1,1024}")  # printable ASCII, no spaces
_MANY_SLASHES = re.compile(r"//+")
_FOREIGN_PARAM = re.compile(r"<(?:([a-zA-Z_][a-zA-Z0-9_]*)(?:\([^)]*\))?:)?([a-zA-Z_][a-zA-Z0-9_]*)>")
_FOREIGN_CONVERTORS = {"int": "int", "float": "float", "uuid": "uuid", "path": "path"}


def _starlette_param(m: re.Match[str]) -> str:
    """``<int:id>`` -> ``{id:int}``; ``<id>``, ``<string:id>``, ``<slug:id>`` -> ``{id}``."""
    conv = _FOREIGN_CONVERTORS.get(m.group(1) or "")
    return f"{{{m.group(2)}:{conv}}}" if conv else f"{{{m.group(2)}}}"


def starlette_syntax(template: str) -> str:
    """A Flask / Django route template in Starlette's syntax: ``/items/<int:id>`` -> ``/items/{id:int}``."""
    return _FOREIGN_PARAM.sub(_starlette_param, template)


_SAMPLES = {"int": ("1",), "float": ("1.5",), "uuid": ("00000000-0000-4000-8000-000000000000",),
            "path": ("a", "a/b")}


def sample_paths(template: str, limit: int = 16) -> list[str]:
    """Concrete paths a Starlette-syntax template matches (one or two values a parameter, at most ``limit``)."""
    paths = [""]
    pos = 0
    for m in _PARAM.finditer(template):
        values = _SAMPLES.get(m.group(2) or "str", ("1", "a"))
        paths = [p + template[pos:m.start()] + v for p in paths for v in values][:limit]
        pos = m.end()
    return [p + template[pos:] for p in paths]


_METHODS = frozenset({"*", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
                      "WEBSOCKET"})


@fast_init
@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The route a request matched, its path parameters and its resolved policy."""

    route: str | None
    params: Mapping[str, Any]
    policy: EffectivePolicy
    lock_keys: tuple[str, ...]
    refusal: str | None = None  # why the request cannot be decided (400 invalid_request), e.g. a bad lock key


@dataclass(slots=True)
class _Route:
    key: str
    method: str
    regex: re.Pattern[str]
    typed: dict[str, Any]  # the convertors of the parameters that are not str
    policy: EffectivePolicy
    rank: tuple[int, int, int]
    params: frozenset[str] = field(default_factory=frozenset)
    raw: Policy = field(default_factory=lambda: Policy())


class RouteTable:
    """Matches ``(method, path)`` to the most specific route policy."""

    def __init__(self, policies: Mapping[str, Policy | Mapping[str, Any]] | None,
                 default_policy: Policy | Mapping[str, Any] | None = None) -> None:
        if default_policy is not None:
            default_policy = as_policy(default_policy, "default_policy")
        self.default_policy = (default_policy or Policy()).validate("default_policy")
        if default_policy is not None and default_policy.locks:
            raise ConfigurationError("default_policy: locks need a route's path parameters; set them per route")
        self._default = self.default_policy.effective()
        self._routes: list[_Route] = []
        self._cache: dict[tuple[str, str], RouteMatch] = {}
        self._resolved: dict[tuple[Policy | None, Policy | None], EffectivePolicy] = {}
        self.targets: dict[str, Policy] = {}
        """The ``"TOOL <name>"`` / ``"PROMPT <name>"`` / ``"RESOURCE <uri>"`` entries (normalised keys), which HTTP
        requests never match."""
        for key, policy in (policies or {}).items():
            target = _target_key(key)
            if target is not None:
                if not isinstance(policy, Policy):
                    raise ConfigurationError(f"{target!r}: the value must be a Policy")
                self.targets[target] = policy.validate(target)
                continue
            self._routes.append(self._compile(key, policy))
        self._routes.sort(key=lambda r: r.rank, reverse=True)

    def _compile(self, key: str, value: Policy | Mapping[str, Any]) -> _Route:
        if not isinstance(key, str):
            raise ConfigurationError(f"route {key!r}: keys are strings like 'GET /items/{{id}}'")
        if not isinstance(value, Policy | Mapping):
            raise ConfigurationError(f"route {key!r}: the value must be a Policy or a dict of Policy fields")
        policy = as_policy(value, f"route {key!r}")
        method, _, path = key.strip().partition(" ")
        method = method.upper()
        path = path.strip()
        if method not in _METHODS or not path.startswith("/"):
            raise ConfigurationError(f"route {key!r}: expected 'METHOD /path' with METHOD one of "
                                     f"{', '.join(sorted(_METHODS))}")
        foreign = _FOREIGN_PARAM.search(path)
        if foreign is not None:
            raise ConfigurationError(f"route {key!r}: route keys use Starlette's path syntax, not Flask's: write "
                                     f"{f'{method} {starlette_syntax(path)}'!r} ({foreign.group(0)!r}: write "
                                     f"{_starlette_param(foreign)!r})")
        pattern, convert, literal, path_params, pos = "^", {}, 0, 0, 0
        for m in _PARAM.finditer(path):
            pattern += re.escape(path[pos:m.start()])
            literal += m.start() - pos
            name, conv = m.group(1), m.group(2) or "str"
            if conv not in _CONVERTORS:
                raise ConfigurationError(f"route {key!r}: unknown convertor {conv!r}")
            if name in convert:
                raise ConfigurationError(f"route {key!r}: parameter {name!r} appears twice")
            regex, func = _CONVERTORS[conv]
            pattern += f"(?P<{name}>{regex})"
            convert[name] = func
            path_params += conv == "path"
            pos = m.end()
        if "{" in path[pos:] or "}" in path[pos:]:
            raise ConfigurationError(f"route {key!r}: malformed path parameter")
        pattern += re.escape(path[pos:]) + "$"
        literal += len(path) - pos
        policy.validate(f"route {key!r}")
        try:
            merged = policy.merged(self.default_policy)
            for template in policy.locks or ():
                missing = [n for n in _lock_fields(template) if n not in convert]
                if missing:
                    raise ConfigurationError(f"locks: {template!r} uses {{{missing[0]}}}, not a parameter of the path")
            effective = merged.effective()
        except ConfigurationError as exc:
            raise ConfigurationError(f"route {key!r}: {exc}") from None
        rank = (literal, -path_params, method != "*")
        typed = {name: func for name, func in convert.items() if func is not str}
        return _Route(key, method, re.compile(pattern), typed, effective, rank, frozenset(convert), policy)

    def _effective(self, policy: Policy | None, table: Policy | None) -> EffectivePolicy:
        """``policy`` (an endpoint's ``@policy``) over the table entry ``table`` over ``default_policy``; cached."""
        effective = self._resolved.get((policy, table))
        if effective is None:
            base = table.merged(self.default_policy) if table is not None else self.default_policy
            effective = (policy or Policy()).merged(base).effective()
            if len(self._resolved) < 4096:
                self._resolved[(policy, table)] = effective
        return effective

    def target(self, key: str, policy: Policy | None, params: Mapping[str, Any] | None) -> RouteMatch:
        """The match for an MCP tool or prompt (``key`` is ``"TOOL <name>"``): ``policy`` (the function's
        ``@policy``) wins over the table entry for ``key``, which wins over ``default_policy``; ``params`` (the
        call's checked arguments) fill the lock keys (``None``: the policy only, no lock keys)."""
        effective = self._effective(policy, self.targets.get(key))
        if params is None:
            return RouteMatch(key, {}, effective, ())
        try:
            keys = tuple(render_lock_key(t, params) for t in effective.locks)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(f"{key!r}: a lock template names a missing parameter {exc}") from None
        return RouteMatch(key, dict(params), effective, keys)

    def entries(self) -> list[tuple[str, str, re.Pattern[str]]]:
        """The table's routes: ``(key, path template, compiled path pattern)``."""
        return [(r.key, r.key.strip().partition(" ")[2].strip(), r.regex) for r in self._routes]

    def match(self, method: str, path: str) -> RouteMatch:
        """The most specific route for this request, or the default policy (``route=None``)."""
        cache_key = (method, path)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        result = self._match(method.upper(), path)
        if not result.params and len(self._cache) < 4096:
            self._cache[cache_key] = result  # parameter-free paths are few; parametrised ones are not cached
        return result

    def _find(self, method: str, path: str) -> tuple[_Route, dict[str, Any]] | None:
        found = self._find_exact(method, path)
        if found is None:
            # routers that merge slashes (werkzeug, Flask) or ignore a trailing one route these to the same view:
            # the route's policy applies to them too, never default_policy
            normal = _MANY_SLASHES.sub("/", path)
            normal = normal[:-1] if len(normal) > 1 and normal.endswith("/") else normal
            if normal != path:
                found = self._find_exact(method, normal)
        return found

    def _find_exact(self, method: str, path: str) -> tuple[_Route, dict[str, Any]] | None:
        for route in self._routes:
            if route.method not in ("*", method) and not (route.method == "GET" and method == "HEAD"):
                continue
            m = route.regex.match(path)
            if m is None:
                continue
            params = m.groupdict()
            try:
                for name, func in route.typed.items():
                    params[name] = func(params[name])
            except (ValueError, OverflowError):  # e.g. an int of more digits than Python converts: not this route
                continue
            return route, params
        return None

    def _match(self, method: str, path: str) -> RouteMatch:
        found = self._find(method, path)
        if found is None:
            return RouteMatch(None, {}, self._default, ())
        route, params = found
        try:
            keys = tuple(render_lock_key(t, params) for t in route.policy.locks)
        except InvalidRequest as exc:
            return RouteMatch(route.key, params, route.policy, (), str(exc))
        return RouteMatch(route.key, params, route.policy, keys)

    def resolve(self, policy: Policy | None, route: str | None, params: Mapping[str, Any], *,
                method: str | None = None, path: str | None = None) -> RouteMatch:
        """A match for a route found by a framework's own router (the adapters call this).

        The fields set by the endpoint's ``policy`` win over the Guard table's policy for this request (looked up
        by ``method`` and ``path`` when both are given), which wins over ``default_policy``. ``route`` names the
        route (``"POST /payments/<int:id>/approve"``); ``params`` are the framework's path parameters, which fill
        the lock keys (over the table route's own parameters of the same name). A lock template that names a
        parameter neither provides raises :class:`ConfigurationError`.
        """
        where = f"route {route!r}"
        if policy is not None:
            policy.validate(where)
        table: Policy | None = None
        merged_params: dict[str, Any] = dict(params)
        if method is not None and path is not None:
            found = self._find(method.upper(), path)
            if found is not None:
                table = found[0].raw
                merged_params = {**found[1], **merged_params}
        effective = self._effective(policy, table)
        try:
            keys = tuple(render_lock_key(t, merged_params) for t in effective.locks)
        except InvalidRequest as exc:
            return RouteMatch(route, merged_params, effective, (), str(exc))
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(f"{where}: a lock template names a missing path parameter {exc}") from None
        return RouteMatch(route, merged_params, effective, keys)
