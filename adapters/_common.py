"""Framework-free helpers shared by every adapter: the ``policy(...)`` decorator and its lookup ``policy_of``.

``policy(...)`` takes exactly the :class:`~sa_middleware.Policy` fields (keyword-only), validates them when it is
applied (a mistake raises :class:`~sa_middleware.ConfigurationError` naming the view) and attaches the Policy to the
view under the attribute ``__sa_policy__``; it returns the very same object, so signatures (FastAPI) and class
identity are untouched. Stacked decorators combine: the outer one's fields win; on a subclass, the class's own
decorator refines its base's policy.

``policy_of(endpoint, method)`` reads it back for one request. On a class-based view (the class, or a function made
by ``as_view()`` that carries ``view_class``) the class's policy applies to every method, then its dispatcher's
(``dispatch_request`` / ``dispatch``), and the handler method's own policy wins field by field. This module imports
no framework; adapters import it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence, Set
from typing import TypeVar

from sa_middleware.policy import LockConflictAction, LockMode, Policy, SessionLimitAction

__all__ = ["POLICY_ATTR", "dispatcher_name", "policy", "policy_of", "view_name"]

POLICY_ATTR = "__sa_policy__"

V = TypeVar("V")


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
            setattr(view, POLICY_ATTR, combined)
        except (AttributeError, TypeError):
            raise TypeError(f"policy(...) cannot be attached to {view_name(view)}: put it on the view function, "
                            "method or class itself") from None
        return view

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
