"""Flask adapter (contract): ``SessionAware(app=None, guard=None)`` with ``init_app(app)``, and ``policy``.

``init_app`` wraps ``app.wsgi_app`` in the WSGI middleware (:class:`~sa_middleware.wsgi.SessionAwareWSGIMiddleware`)
and matches every request with the app's own ``url_map`` (rule templates and converters, blueprints, ``SCRIPT_NAME``,
subdomains and hosts), so a policy can sit on the view::

    sa = SessionAware()              # the Guard is built from the SA_* config keys; or SessionAware(guard=Guard(...))
    sa.init_app(app)

    @app.post("/payments/<int:id>/approve")
    @policy(exclusive=True, locks=["payment:{id}"], scopes={"payments:approve"})
    def approve(id: int) -> dict[str, object]:
        return {"fence": g.sa.fencing_tokens[f"payment:{id}"]}

``policy(...)`` also decorates ``View`` / ``MethodView`` classes and their methods, and blueprints:
``policy(scopes={"admin"})(admin_bp)`` covers every view of ``admin_bp`` (and of blueprints nested in it). Fields
combine, the later winning: ``default_policy`` < Guard table (``SA_POLICIES``) < blueprint (parent, then child) <
view class < view function < method. A request for which Flask runs no view (404, 405, an automatic ``OPTIONS``, a
redirect Flask makes itself such as strict slashes) is decided by the Guard's table and ``default_policy`` alone:
it needs a token unless the table says public.

A refused request is answered with ``application/problem+json`` before Flask runs. An admitted request's ticket is
released when the server closes the response (after the last chunk of a streamed response), or at once when the app
raises; the view, its error handlers and its streams find the context in ``flask.g.sa``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flask import Blueprint, Flask, current_app, g, has_request_context
from flask import request as flask_request
from flask.testing import FlaskClient
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.test import TestResponse

from sa_middleware.context import VIEW_POLICIES_READ, RequestInfo
from sa_middleware.errors import ConfigurationError
from sa_middleware.guard import Guard
from sa_middleware.policy import Policy, RouteMatch, as_policy
from sa_middleware.wsgi import Environ, SessionAwareWSGIMiddleware, WSGIApp

from ._common import (
    POLICY_ATTR,
    check_table,
    dispatcher_name,
    policy,
    policy_of,
    register_attach_hook,
    register_refusal,
    view_refusal,
)

__all__ = ["SessionAware", "SessionAwareTestClient", "guard_from_config", "policy"]

EXTENSION = "sa_middleware"  # the key in app.extensions (its value is the app's Guard)

_OPTIONS: tuple[str, ...] = tuple(inspect.signature(Guard).parameters)
CONFIG_KEYS: dict[str, str] = {f"SA_{name.upper()}": name for name in _OPTIONS}  # "SA_JWKS_URL" -> "jwks_url"
_KEY_MATERIAL = ("SA_KEYS", "SA_JWKS", "SA_JWKS_URL")


# -- @policy on blueprints ---------------------------------------------------------------------------------------

def _attached(target: object) -> Policy | None:
    """The policy that ``policy(...)(blueprint)`` attached (``policy`` from ``_common`` works on any object)."""
    found = getattr(target, POLICY_ATTR, None)
    return found if isinstance(found, Policy) else None


def _combine(layers: Iterable[Policy | None]) -> Policy | None:
    """Outermost first: each later layer's set fields win."""
    combined: Policy | None = None
    for layer in layers:
        if layer is not None:
            combined = layer.merged(combined)
    return combined


# -- configuration -------------------------------------------------------------------------------------------------

def guard_from_config(config: Mapping[str, Any]) -> Guard:
    """A :class:`~sa_middleware.Guard` from a Flask config: each ``SA_<NAME>`` key is the Guard keyword argument
    ``<name>`` (``SA_STORE`` -> ``store``, ``SA_JWKS_URL`` -> ``jwks_url``...); ``None`` counts as unset.

    Also accepted: ``SA_ALGORITHMS`` / ``SA_REQUIRED_CLAIMS`` as one string (``"RS256 ES256"`` or
    ``"RS256,ES256"``), ``SA_JWKS`` as a JSON string, and ``SA_POLICIES`` / ``SA_DEFAULT_POLICY`` values as dicts of
    Policy fields. Every mistake raises :class:`~sa_middleware.ConfigurationError` naming the key.
    """
    for key in config:
        if isinstance(key, str) and key.startswith("SA_") and key not in CONFIG_KEYS:
            near = difflib.get_close_matches(key, list(CONFIG_KEYS), n=1, cutoff=0.8)
            if near:  # a typo such as SA_AUDEINCE would silently switch a check off
                raise ConfigurationError(f"{key} is not a sa-middleware option; did you mean {near[0]}?")
    options = {name: config[key] for key, name in CONFIG_KEYS.items() if config.get(key) is not None}
    if "algorithms" not in options:
        raise ConfigurationError("SA_ALGORITHMS is required: the allow-list of JWS algorithms, e.g. ['RS256']")
    material = [key for key in _KEY_MATERIAL if CONFIG_KEYS[key] in options]
    if len(material) != 1:
        got = f" (got {', '.join(material)})" if material else ""
        raise ConfigurationError(f"give exactly one of SA_KEYS, SA_JWKS or SA_JWKS_URL{got}")
    for name in ("algorithms", "required_claims"):
        if isinstance(options.get(name), str):
            options[name] = [word for word in re.split(r"[\s,]+", options[name]) if word]
    if isinstance(options.get("jwks"), str | bytes):
        try:
            options["jwks"] = json.loads(options["jwks"])
        except ValueError:
            raise ConfigurationError("SA_JWKS: not a JSON JWK set") from None
    if "policies" in options:
        table = options["policies"]
        if not isinstance(table, Mapping):
            raise ConfigurationError("SA_POLICIES must map 'METHOD /path' to a Policy (or a dict of Policy fields)")
        options["policies"] = {route: _as_policy(value, f"SA_POLICIES[{route!r}]") for route, value in table.items()}
    if "default_policy" in options:
        options["default_policy"] = _as_policy(options["default_policy"], "SA_DEFAULT_POLICY")
    try:
        return Guard(**options)
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{_culprit(str(exc), material[0])}: {exc}") from exc


def _as_policy(value: Any, where: str) -> Policy:
    return as_policy(value, where)


def _culprit(message: str, material: str) -> str:
    """The SA_* key a Guard error is about (the Guard names its keyword arguments, not our keys)."""
    if message.startswith("route "):
        return "SA_POLICIES"
    if message.startswith("default_policy"):
        return "SA_DEFAULT_POLICY"
    for name in sorted(_OPTIONS, key=len, reverse=True):
        if re.search(rf"\b{name}\b", message):
            return f"SA_{name.upper()}"
    lowered = message.lower()
    if "algorithm" in lowered:
        return "SA_ALGORITHMS"
    if any(word in lowered for word in ("sqlite", "redis", "uri")):
        return "SA_STORE"
    return material


# -- the middleware ----------------------------------------------------------------------------------------------

class _FlaskMiddleware(SessionAwareWSGIMiddleware):
    """The WSGI middleware with a ``match()`` that uses the Flask app's ``url_map`` and the views' policies."""

    view_policies = True

    def __init__(self, app: WSGIApp, *, guard: Guard, flask_app: Flask, check_table: bool = True) -> None:
        super().__init__(app, guard=guard)
        self.flask_app = flask_app
        self.check_table = check_table
        self._policies: dict[tuple[str, str], tuple[Callable[..., Any], Policy | None]] = {}
        self._checked = False
        self._check_lock = threading.Lock()

    def match(self, environ: Environ, request: RequestInfo) -> RouteMatch | None:
        if not self._checked:
            self._check_once()
        app = self.flask_app
        try:  # exactly as Flask will match it: SERVER_NAME, subdomain / host matching, trusted hosts
            adapter = app.create_url_adapter(app.request_class(environ, populate_request=False, shallow=True))
            if adapter is None:
                return None
            rule, args = adapter.match(return_rule=True)
        except HTTPException:
            # 404, 405, a redirect Flask answers itself (strict slashes...), a bad host: no view runs, so the
            # Guard's own table / default_policy decides (fail closed: a token is needed unless it says public)
            return None
        method = request.method
        if method == "OPTIONS" and getattr(rule, "provide_automatic_options", False):
            return None  # Flask answers an automatic OPTIONS without calling the view
        view = app.view_functions.get(rule.endpoint)
        if view is None:
            return None
        return self.guard.routes.resolve(self._policy(rule.endpoint, view, method), f"{method} {rule.rule}", args,
                                         method=method, path=request.route_path)

    def _policy(self, endpoint: str, view: Callable[..., Any], method: str) -> Policy | None:
        cached = self._policies.get((endpoint, method))
        if cached is not None and cached[0] is view:
            return cached[1]
        blueprints = endpoint.split(".")[:-1]  # "parent.child.view": blueprints "parent", "parent.child"
        layers = [_attached(self.flask_app.blueprints.get(".".join(blueprints[:i])))
                  for i in range(1, len(blueprints) + 1)]
        found = _combine([*layers, policy_of(view, method)])
        self._policies[(endpoint, method)] = (view, found)
        return found

    def check(self) -> None:
        """Raise :class:`ConfigurationError` naming the view if a view's lock template names a parameter that its
        URL rule does not have, or if a view class has a ``@policy`` method that no request ever reads (neither an
        HTTP method's handler nor the dispatcher)."""
        app = self.flask_app
        for rule in app.url_map.iter_rules():
            view = app.view_functions.get(rule.endpoint)
            if view is None:
                continue
            _check_unreachable(rule.endpoint, getattr(view, "view_class", None), rule.methods or ())
            params = dict.fromkeys({*rule.arguments, *(rule.defaults or {})}, 0)
            for method in sorted(rule.methods or {"GET"}):
                found = self._policy(rule.endpoint, view, method)
                if found is None:
                    continue
                try:
                    self.guard.routes.resolve(found, f"{method} {rule.rule}", params)
                except ConfigurationError as exc:
                    raise ConfigurationError(f"view {rule.endpoint!r}: {exc}") from None

    def _check_once(self) -> None:
        # views are usually registered after init_app (app factories): check all of them at the first request
        with self._check_lock:
            if not self._checked:
                self.check()
                if self.check_table:
                    check_table(self.guard.routes, [rule.rule for rule in self.flask_app.url_map.iter_rules()],
                                self._routed)
                self._checked = True

    def _routed(self, path: str) -> bool:
        """Whether the app's ``url_map`` has a rule for ``path`` (any method; a redirect counts)."""
        try:
            self.flask_app.url_map.bind("localhost").match(path)
        except HTTPException as exc:  # 405 and redirects: the path has a rule
            return not isinstance(exc, NotFound)
        except Exception:  # host matching without a host, a converter refusing the sample: not routed here
            return False
        return True


_HTTP_METHODS = frozenset({"get", "head", "post", "put", "patch", "delete", "options", "trace", "connect"})


def _check_unreachable(endpoint: str, cls: object, methods: Iterable[str]) -> None:
    """A ``@policy`` on a view class's method that :func:`policy_of` never reads would be silently ignored."""
    if not isinstance(cls, type):
        return
    reachable = _HTTP_METHODS | {m.lower() for m in methods} | {dispatcher_name(cls)}
    for name in sorted({name for klass in cls.__mro__ for name in vars(klass)} - reachable):
        member = inspect.getattr_static(cls, name, None)
        if isinstance(member, staticmethod | classmethod):
            member = member.__func__
        if not isinstance(member, type) and isinstance(getattr(member, POLICY_ATTR, None), Policy):
            raise ConfigurationError(
                f"view {endpoint!r}: @policy on {cls.__qualname__}.{name} is never applied; put it on the class, "
                f"on {dispatcher_name(cls)} or on an HTTP method's handler (get, post...)")


def _refusal(view: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> object:
    """A decorated view called without the extension's decision: a 503 problem+json response."""
    if not has_request_context():
        return None
    status, headers, body = view_refusal(view, VIEW_POLICIES_READ.get())
    return current_app.response_class(body, status=status, headers=headers)


_BLUEPRINT_GUARD = "__sa_guarded__"


def _guard_blueprint(target: object) -> None:
    """``policy(...)(blueprint)``: the blueprint's views refuse to run without the extension's decision."""
    if not isinstance(target, Blueprint) or getattr(target, _BLUEPRINT_GUARD, False):
        return
    setattr(target, _BLUEPRINT_GUARD, True)

    def require_decision() -> ResponseReturnValue | None:
        if VIEW_POLICIES_READ.get() is True:
            return None
        status, headers, body = view_refusal(f"blueprint {target.name!r}", VIEW_POLICIES_READ.get())
        return current_app.response_class(body, status=status, headers=headers)
    target.before_request(require_decision)


register_refusal(_refusal)
register_attach_hook(_guard_blueprint)


def _expose_context() -> None:
    try:
        g.sa = flask_request.environ["sa_middleware"]
    except KeyError:  # fail closed: never run a view the Guard did not admit
        raise RuntimeError("sa-middleware: this request did not pass through the SessionAware middleware "
                           "(was app.wsgi_app replaced after init_app?)") from None


# -- the extension ---------------------------------------------------------------------------------------------

class SessionAware:
    """Session-aware authorisation for Flask apps.

    ``SessionAware(app)`` or ``sa = SessionAware(); sa.init_app(app)`` (app factories; one instance may serve
    several apps). Without ``guard``, each app's Guard is built from its ``SA_*`` config keys at ``init_app``
    (see :func:`guard_from_config`); with ``guard``, every app shares that Guard and ``SA_*`` keys are not read.
    At the first request, an entry of the Guard's table that matches no URL rule is an error (every request is
    refused until it is fixed); ``check_table=False`` turns that off, for paths something else answers.
    """

    def __init__(self, app: Flask | None = None, guard: Guard | None = None, *, check_table: bool = True) -> None:
        if guard is not None and not isinstance(guard, Guard):
            raise TypeError("SessionAware(guard=...) needs a sa_middleware.Guard")
        self._guard = guard
        self.check_table = check_table
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Wrap ``app.wsgi_app``, expose ``flask.g.sa`` and store the Guard in ``app.extensions["sa_middleware"]``.

        Raises :class:`~sa_middleware.ConfigurationError` for bad ``SA_*`` keys or a view policy that does not fit
        its rule (views registered later are checked at the first request).
        """
        if EXTENSION in app.extensions:
            raise RuntimeError(f"sa-middleware is already initialised on the Flask app {app.name!r}")
        guard = self._guard if self._guard is not None else guard_from_config(app.config)
        middleware = _FlaskMiddleware(app.wsgi_app, guard=guard, flask_app=app, check_table=self.check_table)
        try:
            middleware.check()
        except BaseException:
            if self._guard is None:
                guard.close()
            raise
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions[EXTENSION] = guard
        app.before_request_funcs.setdefault(None, []).insert(0, _expose_context)
        if app.test_client_class is None:
            app.test_client_class = SessionAwareTestClient

    @property
    def guard(self) -> Guard:
        """The Guard given to the constructor, else the current app's."""
        if self._guard is not None:
            return self._guard
        guard = current_app.extensions.get(EXTENSION)
        if not isinstance(guard, Guard):
            raise RuntimeError(f"sa-middleware is not initialised on the Flask app {current_app.name!r}")
        return guard


class SessionAwareTestClient(FlaskClient):
    """Flask's test client, buffering by default: each response is read and closed before ``open()`` returns, so
    its ticket is released before the test's next request (Flask's own client leaves responses open).

    ``init_app`` installs it as ``app.test_client_class`` unless the app has a test client class of its own. To
    test a stream, pass ``buffered=False`` and close the response: ``with client.get(url, buffered=False) as r:``.
    """

    def open(self, *args: Any, buffered: bool = True, follow_redirects: bool = False,
             **kwargs: Any) -> TestResponse:
        return super().open(*args, buffered=buffered, follow_redirects=follow_redirects, **kwargs)
