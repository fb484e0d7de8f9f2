"""Framework-free helpers shared by every adapter: the ``policy(...)`` decorator and its lookup ``policy_of``.

``policy(...)`` takes exactly the :class:`~sa_middleware.Policy` fields (keyword-only), validates them when it is
applied (a mistake raises :class:`~sa_middleware.ConfigurationError` naming the view) and attaches the Policy to the
view under the attribute ``__sa_policy__``. Stacked decorators combine: the outer one's fields win; on a subclass,
the class's own decorator refines its base's policy.

A decorated view never runs unless an adapter's middleware decided its request with the view's policy: a function
is returned wrapped (``functools.wraps``: the signature FastAPI reads is the view's), a class keeps its identity and
has its dispatcher wrapped in place, and the wrapper answers ``503`` (``application/problem+json``, code
``view_not_guarded``) when no adapter admitted the request (the middleware is missing, or only the core middleware,
which does not read ``@policy``, decided it). Each adapter registers how it answers in its framework
(:func:`register_refusal`); other targets (Flask blueprints) get a hook (:func:`register_attach_hook`).

``policy_of(endpoint, method)`` reads it back for one request. On a class-based view (the class, or a function made
by ``as_view()`` that carries ``view_class``) the class's policy applies to every method, then its dispatcher's
(``dispatch_request`` / ``dispatch``), and the handler method's own policy wins field by field. This module imports
no framework; adapters import it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any, TypeVar

from sa_middleware.context import VIEW_POLICIES_READ
from sa_middleware.errors import ConfigurationError
from sa_middleware.policy import (
    LockConflictAction,
    LockMode,
    Policy,
    RouteTable,
    SessionLimitAction,
    sample_paths,
    starlette_syntax,
)

__all__ = ["POLICY_ATTR", "check_table", "dispatcher_name", "policy", "policy_of", "register_attach_hook",
           "register_refusal", "view_name", "view_refusal"]

POLICY_ATTR = "__sa_policy__"
_GUARDED_ATTR = "__sa_guarded__"

V = TypeVar("V")

log = logging.getLogger("sa_middleware")

#: ``refusal(view, args, kwargs) -> response | None``: an adapter's answer for a call it recognises as its own
Refusal = Callable[[object, tuple[Any, ...], Mapping[str, Any]], object]
_REFUSALS: list[Refusal] = []
_FALLBACK_REFUSALS: list[Refusal] = []
_ATTACH_HOOKS: list[Callable[[object], None]] = []


def register_refusal(refusal: Refusal, *, fallback: bool = False) -> None:
    """Register how an adapter answers a decorated view called without a Guard decision (its framework's 503
    response, or ``None`` when the call is not one of its framework's). The first answer wins; ``fallback``
    refusals are asked after all the others."""
    registry = _FALLBACK_REFUSALS if fallback else _REFUSALS
    if refusal not in registry:
        registry.append(refusal)


def register_attach_hook(hook: Callable[[object], None]) -> None:
    """Register a hook called with every target that is neither a function nor a class (a Flask blueprint)."""
    if hook not in _ATTACH_HOOKS:
        _ATTACH_HOOKS.append(hook)


def view_refusal(view: object, read: bool | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """The 503 problem+json answer of a decorated view that no adapter decided (``read``: the context variable)."""
    why = ("only the core middleware, which reads the Guard's table but not @policy, decided this request"
           if read is False else "no sa-middleware middleware decided this request")
    log.error("sa-middleware: refused to run %s: %s; install the framework adapter's middleware",
              view if isinstance(view, str) else view_name(view), why)
    body = json.dumps({"type": "urn:sa-middleware:problem:view_not_guarded", "title": "Authorisation not in place",
                       "status": 503, "detail": "this endpoint's authorisation is not configured",
                       "code": "view_not_guarded"}, separators=(",", ":")).encode()
    return 503, [("content-type", "application/problem+json"), ("content-length", str(len(body))),
                 ("cache-control", "no-store")], body


def _refuse(view: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> object:
    for refusal in (*_REFUSALS, *_FALLBACK_REFUSALS):
        answer = refusal(view, args, kwargs)
        if answer is not None:
            return answer
    raise RuntimeError(f"sa-middleware: {view_name(view)} has a @policy but no sa-middleware adapter decided this "
                       "request; install the framework adapter's middleware")


def _marked_async(view: object) -> bool:
    """Whether a sync callable is marked as a coroutine function (asgiref's / Python 3.12's marker)."""
    return getattr(view, "_is_coroutine", None) is not None or getattr(view, "_is_coroutine_marker", None) is not None


async def _already(answer: object) -> object:
    return answer


def _guarded(view: Callable[..., Any]) -> Callable[..., Any]:
    """``view`` wrapped so that it runs only inside a request an adapter decided (see the module docstring)."""
    if inspect.iscoroutinefunction(view):
        @functools.wraps(view)
        async def guarded_async(*args: Any, **kwargs: Any) -> Any:
            if VIEW_POLICIES_READ.get() is not True:
                answer = _refuse(guarded_async, args, kwargs)
                return await answer if inspect.isawaitable(answer) else answer
            return await view(*args, **kwargs)
        wrapper: Callable[..., Any] = guarded_async
    else:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if VIEW_POLICIES_READ.get() is not True:
                answer = _refuse(guarded, args, kwargs)
                return _already(answer) if _marked_async(view) and not inspect.isawaitable(answer) else answer
            return view(*args, **kwargs)
        wrapper = guarded
    setattr(wrapper, _GUARDED_ATTR, True)
    return wrapper


def _protect(view: Any) -> Any:
    """The target to attach the policy to: ``view`` guarded (see :func:`_guarded`)."""
    if getattr(view, _GUARDED_ATTR, False) is True:
        return view
    if isinstance(view, type):
        name = dispatcher_name(view)
        dispatcher = getattr(view, name, None)
        if callable(dispatcher) and getattr(dispatcher, _GUARDED_ATTR, False) is not True:
            setattr(view, name, _guarded(dispatcher))
        return view
    if inspect.isfunction(view) or inspect.ismethod(view) or isinstance(view, functools.partial):
        return _guarded(view)
    for hook in _ATTACH_HOOKS:
        hook(view)
    return view


def view_name(view: object) -> str:
    module = getattr(view, "__module__", None)
    qualname = getattr(view, "__qualname__", None) or getattr(view, "__name__", None) or repr(view)
    return f"{module}.{qualname}" if module else str(qualname)


def policy(
    *,
    public: bool | None = None,
    scopes: Set[str] | None = None,
    max_sessions: int | None = None,
    on_session_limit: SessionLimitAction | None = None,
    max_in_flight: int | None = None,
    exclusive: bool | None = None,
    tags: Set[str] | None = None,
    conflicts: Set[str] | None = None,
    raises_risk: int | None = None,
    risk_window: float | None = None,
    max_risk: int | None = None,
    locks: Sequence[str] | None = None,
    lock_mode: LockMode | None = None,
    on_lock_conflict: LockConflictAction | None = None,
    lock_wait: float | None = None,
    one_time: bool | None = None,
    require_compliant_device: bool | None = None,
    max_auth_age: int | None = None,
    acr_values: Sequence[str] | None = None,
    fail_open: bool | None = None,
) -> Callable[[V], V]:
    """Attach a :class:`~sa_middleware.Policy` with these fields to a view function, method or class.

    Fields left unset come from the Guard's table entry for the request, then from ``default_policy``.
    """
    new = Policy(public=public, scopes=scopes, max_sessions=max_sessions, on_session_limit=on_session_limit,
                 max_in_flight=max_in_flight, exclusive=exclusive, tags=tags, conflicts=conflicts,
                 raises_risk=raises_risk, risk_window=risk_window, max_risk=max_risk, locks=locks,
                 lock_mode=lock_mode, on_lock_conflict=on_lock_conflict, lock_wait=lock_wait, one_time=one_time,
                 require_compliant_device=require_compliant_device, max_auth_age=max_auth_age,
                 acr_values=acr_values, fail_open=fail_open)

    def attach(view: V) -> V:
        new.validate(f"view {view_name(view)}")
        existing = getattr(view, POLICY_ATTR, None)
        combined = new.merged(existing) if isinstance(existing, Policy) else new
        try:
            setattr(view, POLICY_ATTR, combined)  # probe first: an object that takes no attribute is refused as is
            target: V = _protect(view)
            setattr(target, POLICY_ATTR, combined)
        except (AttributeError, TypeError):
            raise TypeError(f"policy(...) cannot be attached to {view_name(view)}: put it on the view function, "
                            "method or class itself") from None
        return target

    return attach


def dispatcher_name(cls: type) -> str:
    """The name of the method a class-based view calls for every request: Flask's ``dispatch_request``, else
    ``dispatch`` (Django's ``View``, Starlette's endpoints)."""
    return "dispatch_request" if hasattr(cls, "dispatch_request") else "dispatch"


def policy_of(endpoint: object, method: str | None = None) -> Policy | None:
    """The policy attached to ``endpoint`` for a request with this ``method`` (``None`` when there is none).

    ``method`` is the HTTP method; a class's handler is its attribute ``method.lower()`` (``HEAD`` falls back to
    ``get``). Adapters whose handlers are named otherwise pass the handler's name (e.g. ``"on_connect"``).
    Layers, the later winning field by field: the class, the view function (``as_view()``), the class's dispatcher
    (:func:`dispatcher_name`: it runs for every method), the handler method.
    ``functools.partial`` endpoints are looked through.
    """
    while isinstance(endpoint, functools.partial) and not isinstance(getattr(endpoint, POLICY_ATTR, None), Policy):
        endpoint = endpoint.func
    own = getattr(endpoint, POLICY_ATTR, None)
    cls = endpoint if isinstance(endpoint, type) else getattr(endpoint, "view_class", None)
    layers: list[object] = [own]
    if isinstance(cls, type):
        handler = None
        if method:
            name = method.lower()
            handler = getattr(cls, name, None)
            if handler is None and name == "head":
                handler = getattr(cls, "get", None)
        # the dispatcher runs for every method (a plain Flask View has no other handler): its policy applies too
        dispatcher = getattr(cls, dispatcher_name(cls), None)
        class_policy = getattr(cls, POLICY_ATTR, None)
        layers = [class_policy, None if own is class_policy else own, getattr(dispatcher, POLICY_ATTR, None),
                  None if handler is dispatcher else getattr(handler, POLICY_ATTR, None)]
    result: Policy | None = None
    for layer in layers:
        if isinstance(layer, Policy):
            result = layer.merged(result)
    return result


def check_table(table: RouteTable, templates: Iterable[str], routed: Callable[[str], bool]) -> None:
    """Raise :class:`ConfigurationError` for the first Guard table entry that matches no route of the app, naming
    it with the closest route template (did you mean ...?).

    ``templates`` are the app's route templates (Starlette, Flask or Django syntax, full paths with a leading
    ``/``); ``routed(path)`` says whether the app's router has a route for a concrete path (any method). An entry is
    used when its pattern matches a sample path of some app route, or when the router routes a sample path of the
    entry (a mounted app without routes of its own, a regex route).
    """
    known = [t if t.startswith("/") else "/" + t for t in templates]
    samples = [path for template in known for path in sample_paths(starlette_syntax(template))]
    for key, path, regex in table.entries():
        if any(regex.match(sample) for sample in samples) or any(routed(p) for p in sample_paths(path)):
            continue
        near = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigurationError(f"route {key!r} of the Guard's policies matches no route of the app, so it would "
                                 f"never apply{hint}")
