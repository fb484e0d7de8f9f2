"""Django adapter: a middleware that decides every request with the resolved URL pattern's policy.

``settings.py``::

    INSTALLED_APPS = [..., "sa_middleware.adapters.django.SAMiddlewareConfig"]   # system checks (optional)
    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "sa_middleware.adapters.django.SessionAwareMiddleware",
        ...
    ]
    SA_MIDDLEWARE = {                      # the Guard's keyword arguments
        "store": "sqlite:///sa.db",
        "keys": PUBLIC_KEY_PEM,
        "algorithms": ["RS256"],
        "issuer": "https://idp.example", "audience": "payments-api",
        "default_policy": Policy(max_sessions=5),
    }

``views.py``::

    @policy(exclusive=True, locks=["payment:{id}"])
    def approve(request, id): ...           # request.sa is the SAContext

The middleware is both sync- and async-capable with one code path: it resolves ``request.path_info`` with the
request's URLconf, names the route ``"METHOD /<full route>"`` (``"POST /payments/<int:id>/approve"``, the prefixes
of included URLconfs joined in; a ``re_path``'s regex as written), fills lock keys from the pattern's keyword
arguments, and combines the view's ``@policy`` (on a function view; on a class-based view the class's, then
``as_view()``'s or ``dispatch``'s, then the handler method's, each winning field by field; ``method_decorator``
works) with the Guard's table: view fields win over the table entry for ``(method, path_info)``, which wins over
``default_policy``. A path no pattern matches is decided by the table alone (fail closed: it still needs a token).
A refused request gets the core's problem+json response; an admitted one runs with ``request.sa`` set, and its
ticket is released when the middleware returns, or, for a streamed response (``StreamingHttpResponse``,
``FileResponse``), when Django closes the response after the last chunk (WSGI and ASGI alike).

``SA_MIDDLEWARE`` is read on first use and again whenever it changes (``override_settings`` works); the Guard
built from it is :func:`get_guard`. System checks (ids ``sa_middleware.E001``...) are registered when this module
is imported: by the middleware at start-up, or earlier, at ``manage.py check``, when ``SAMiddlewareConfig`` is in
``INSTALLED_APPS``. See the "Django" page of the documentation.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.apps import AppConfig  # type: ignore[import-untyped, unused-ignore]
from django.conf import settings  # type: ignore[import-untyped, unused-ignore]
from django.core import checks  # type: ignore[import-untyped, unused-ignore]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped, unused-ignore]
from django.core.signals import setting_changed  # type: ignore[import-untyped, unused-ignore]
from django.http import FileResponse, HttpRequest, HttpResponse  # type: ignore[import-untyped, unused-ignore]
from django.urls import Resolver404, URLPattern, URLResolver, get_resolver, resolve  # type: ignore[import-untyped, unused-ignore]
from django.utils.module_loading import import_string  # type: ignore[import-untyped, unused-ignore]

from sa_middleware.asgi import request_info as _scope_info
from sa_middleware.context import VIEW_POLICIES_READ, RequestInfo, admitted
from sa_middleware.denials import Denial
from sa_middleware.errors import ConfigurationError, SAMiddlewareError
from sa_middleware.guard import Guard, Outcome
from sa_middleware.policy import RouteMatch, render_lock_key
from sa_middleware.records import Ticket
from sa_middleware.responses import denial_response
from sa_middleware.stores.base import Store
from sa_middleware.wsgi import request_info as _environ_info

from ._common import check_table, policy, policy_of, register_refusal, view_name, view_refusal

__all__ = ["SAMiddlewareConfig", "SessionAwareMiddleware", "get_guard", "policy"]

SETTING = "SA_MIDDLEWARE"
MIDDLEWARE_PATH = "sa_middleware.adapters.django.SessionAwareMiddleware"
_OPTIONS = frozenset(inspect.signature(Guard).parameters)
_REQUIRED = frozenset(name for name, p in inspect.signature(Guard).parameters.items() if p.default is p.empty)
_CACHE_MIDDLEWARE = ("django.middleware.cache.FetchFromCacheMiddleware", "django.middleware.cache.CacheMiddleware")
_LOCALE_MIDDLEWARE = "django.middleware.locale.LocaleMiddleware"
_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


# -- the Guard, built from settings.SA_MIDDLEWARE on first use and whenever the setting changes ---------------------

class _GuardHolder:
    """The Guard of the current ``SA_MIDDLEWARE`` value (compared by identity, so a new dict means a new Guard)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: tuple[object, Guard, bool] | None = None  # (setting value, its Guard, we opened the store)

    def get(self) -> Guard:
        conf = getattr(settings, SETTING, None)
        state = self._state
        if state is not None and state[0] is conf:
            return state[1]
        with self._lock:
            state = self._state
            if state is not None and state[0] is conf:
                return state[1]
            self._drop()
            options = _guard_options(conf)
            try:
                guard = Guard(**options)
            except (SAMiddlewareError, TypeError, ValueError) as exc:  # a bad option, or a store that cannot open
                raise ImproperlyConfigured(f"{SETTING}: {exc}") from exc
            self._state = (conf, guard, not isinstance(options.get("store"), Store))
            return guard

    def reset(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        state, self._state = self._state, None
        if state is not None and state[2]:  # a store object given in the settings is its owner's to close
            state[1].close()


_holder = _GuardHolder()


def _guard_options(conf: object) -> dict[str, Any]:
    """``SA_MIDDLEWARE`` checked as the Guard's keyword arguments; raises ImproperlyConfigured naming the problem."""
    if conf is None:
        raise ImproperlyConfigured(f"{SETTING} is not set: a dict of Guard keyword arguments (store, keys or "
                                   "jwks_url, algorithms, issuer, audience, policies, default_policy, ...)")
    if not isinstance(conf, Mapping):
        raise ImproperlyConfigured(f"{SETTING} must be a dict of Guard keyword arguments, not "
                                   f"{type(conf).__name__}")
    unknown = sorted(str(key) for key in conf if key not in _OPTIONS)
    if unknown:
        raise ImproperlyConfigured(f"{SETTING}: unknown option(s) {', '.join(map(repr, unknown))}; the options are "
                                   f"{', '.join(sorted(_OPTIONS))}")
    missing = sorted(_REQUIRED - set(conf))
    if missing:
        hint = " (an explicit allow-list such as ['RS256'])" if missing == ["algorithms"] else ""
        raise ImproperlyConfigured(f"{SETTING}: {', '.join(map(repr, missing))} is required{hint}")
    return dict(conf)


def get_guard() -> Guard:
    """The Guard built from ``settings.SA_MIDDLEWARE`` (built on first use, rebuilt when the setting changes).

    Use it for the operations: ``get_guard().rotate(sub)``, ``await get_guard().apause_session(sid)``, ...
    Raises :class:`~django.core.exceptions.ImproperlyConfigured` when the setting is missing or invalid.
    """
    return _holder.get()


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING:
        _holder.reset()  # closes the Guard built for the old value (and its store, if the adapter opened it)


setting_changed.connect(_on_setting_changed, dispatch_uid="sa_middleware.adapters.django")


# -- the shared steps of both paths --------------------------------------------------------------------------------

def _match(request: Any, guard: Guard) -> tuple[RequestInfo, RouteMatch | None]:
    """The request as the Guard reads it, and its match: the resolved URL pattern's, else (no pattern, 404) the
    Guard table's alone. The table is looked up by ``path_info``; the request (DPoP ``htu``) has the full path."""
    scope = getattr(request, "scope", None)  # ASGI: the scope has the real scheme and the TLS client certificate
    info = _scope_info(scope) if isinstance(scope, dict) else _environ_info(request.META)
    info = replace(info, method=request.method, path=request.path, app_path=request.path_info)
    try:
        found = resolve(request.path_info, urlconf=getattr(request, "urlconf", None))
    except Resolver404:
        return info, guard.routes.match(request.method, request.path_info)
    route = f"{request.method} /{found.route}"
    try:
        return info, guard.routes.resolve(policy_of(found.func, request.method), route, found.kwargs,
                                          method=request.method, path=request.path_info)
    except ConfigurationError as exc:  # a start-up mistake (system check sa_middleware.E003): never run the view
        raise ImproperlyConfigured(f"view {view_name(found.func)}: {exc}") from exc


def _refusal(view: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> object:
    """A decorated view called without the middleware's decision: a 503 problem+json response (awaitable for an
    async class-based view's ``dispatch``)."""
    request = next((arg for arg in args if isinstance(arg, HttpRequest)), None)
    if request is None:
        return None
    status, headers, body = view_refusal(view, VIEW_POLICIES_READ.get())
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response[name] = value
    if args and getattr(type(args[0]), "view_is_async", False) is True:
        async def answer() -> Any:
            return response
        return answer()
    return response


register_refusal(_refusal)


class _Release:
    """Releases one ticket exactly once, whichever comes first: the middleware, the response's close(), the
    response being garbage collected without a close (a backstop), from any thread."""

    def __init__(self, guard: Guard, ticket: Ticket | None) -> None:
        self._guard = guard
        self._ticket = ticket
        self._lock = threading.Lock()

    def _claim(self) -> Ticket | None:
        with self._lock:
            ticket, self._ticket = self._ticket, None
        return ticket

    def __call__(self) -> None:
        self._guard.release(self._claim())

    async def arelease(self) -> None:
        ticket = self._claim()
        await self._guard.arelease(ticket)


def _enter(request: Any, outcome: Outcome, guard: Guard) -> Any:
    """A refused request's problem+json response; or, for an admitted one, its :class:`_Release` after putting the
    context on ``request.sa``."""
    if isinstance(outcome, Denial):
        status, headers, body = denial_response(outcome, guard.realm, guard.retry_after)
        response = HttpResponse(body, status=status)
        for name, value in headers:
            response[name] = value
        return response
    request.sa = outcome.context
    return _Release(guard, outcome.ticket)


def _release_on_close(response: Any, release: _Release) -> bool:
    """For a streamed response, defer the release to the response's end: True. A complete response: False."""
    if not getattr(response, "streaming", False):
        return False
    # Django calls response.close() when the response is done: the WSGI server after the last chunk (or when the
    # client went away), the ASGI handler after the last chunk was sent. close() runs the response's resource
    # closers, the hook StreamingHttpResponse and FileResponse use to close their own iterators and files.
    response._resource_closers.append(release)
    # Django's ASGI handler skips close() when the content raises mid-stream: release then (the documented way
    # for a middleware to wrap streamed content; FileResponse is left alone to keep wsgi.file_wrapper).
    if not isinstance(response, FileResponse):
        if response.is_async:
            response.streaming_content = _awatch(response.streaming_content, release)
        else:
            response.streaming_content = _watch(response.streaming_content, release)
    # a backstop for a response that is dropped without close() (an outer middleware replaced it, a broken server)
    weakref.finalize(response, release).atexit = False
    return True


def _watch(content: Iterable[bytes], release: _Release) -> Iterator[bytes]:
    try:
        yield from content
    except BaseException:  # raised mid-stream, or closed early (GeneratorExit)
        release()
        raise


async def _awatch(content: AsyncIterable[bytes], release: _Release) -> AsyncIterator[bytes]:
    try:
        async for chunk in content:
            yield chunk
    except BaseException:  # raised mid-stream, or closed early (GeneratorExit)
        await release.arelease()
        raise


class SessionAwareMiddleware:
    """Session-aware authorisation for a Django project (both sync- and async-capable).

    Add ``"sa_middleware.adapters.django.SessionAwareMiddleware"`` to ``MIDDLEWARE`` (early: after
    ``SecurityMiddleware``, before anything that answers from a cache) and configure ``SA_MIDDLEWARE``.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        _refuse_unrouted_entries()

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self.__acall__(request)
        guard = get_guard()
        info, match = _match(request, guard)
        release = _enter(request, guard.admit(info, match), guard)
        if not isinstance(release, _Release):
            return release  # refused
        try:
            with admitted(True):
                response = self.get_response(request)
        except BaseException:
            release()
            raise
        if not _release_on_close(response, release):
            release()
        return response

    async def __acall__(self, request: Any) -> Any:
        guard = get_guard()
        info, match = _match(request, guard)
        release = _enter(request, await guard.aadmit(info, match), guard)
        if not isinstance(release, _Release):
            return release  # refused
        try:
            with admitted(True):
                response = await self.get_response(request)
        except BaseException:
            await release.arelease()
            raise
        if not _release_on_close(response, release):
            await release.arelease()
        return response


def _refuse_unrouted_entries() -> None:
    """sa_middleware.E006 when the middleware is loaded too (servers such as gunicorn and uvicorn never run the
    system checks): a Guard table entry that matches no URL pattern stops the start-up, unless E006 is silenced."""
    if "sa_middleware.E006" in getattr(settings, "SILENCED_SYSTEM_CHECKS", ()):
        return
    for message in check_routing():
        if message.id == "sa_middleware.E006":
            raise ImproperlyConfigured(f"{message.msg} ({message.hint})")


# -- system checks -------------------------------------------------------------------------------------------------

class SAMiddlewareConfig(AppConfig):  # type: ignore[misc, unused-ignore]
    """Optional app: put ``"sa_middleware.adapters.django.SAMiddlewareConfig"`` in ``INSTALLED_APPS`` so that
    ``manage.py check`` (and every command that runs the checks) runs the ``sa_middleware`` checks."""

    name = "sa_middleware.adapters.django"
    label = "sa_middleware"
    verbose_name = "sa-middleware"


def _middleware_classes() -> list[tuple[int, str, type | None]]:
    found: list[tuple[int, str, type | None]] = []
    for index, path in enumerate(getattr(settings, "MIDDLEWARE", None) or ()):
        try:
            cls = import_string(path) if isinstance(path, str) else None
        except ImportError:  # Django reports a broken entry itself when it loads the middleware
            cls = None
        found.append((index, str(path), cls if isinstance(cls, type) else None))
    return found


def _is(cls: type | None, path: str, target: str) -> bool:
    if path == target:
        return True
    try:
        return cls is not None and issubclass(cls, import_string(target))
    except ImportError:
        return False


@checks.register("sa_middleware")  # type: ignore[untyped-decorator, unused-ignore]
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """sa_middleware.E001 (SA_MIDDLEWARE missing or not a dict), E002 (not valid Guard options)."""
    conf = getattr(settings, SETTING, None)
    if not isinstance(conf, Mapping):
        state = "is not set" if conf is None else f"is a {type(conf).__name__}"
        return [checks.Error(f"{SETTING} {state}; it must be a dict of Guard keyword arguments.",
                             hint="SA_MIDDLEWARE = {'store': 'sqlite:///sa.db', 'keys': PUBLIC_KEY_PEM, "
                                  "'algorithms': ['RS256'], 'issuer': ..., 'audience': ...}",
                             id="sa_middleware.E001")]
    try:
        get_guard()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), hint="See the documentation: 'Guard options' and 'Policies'.",
                             id="sa_middleware.E002")]
    return []


@checks.register("sa_middleware")  # type: ignore[untyped-decorator, unused-ignore]
def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """sa_middleware.E004 (listed twice), W001 (after a cache middleware), W002 (before LocaleMiddleware),
    W003 (not in MIDDLEWARE)."""
    entries = _middleware_classes()
    ours = [index for index, path, cls in entries if _is(cls, path, MIDDLEWARE_PATH)]
    if not ours:
        return [checks.Warning("SessionAwareMiddleware is not in MIDDLEWARE: no request is authorised by "
                               "sa-middleware.", hint=f"Add {MIDDLEWARE_PATH!r} to MIDDLEWARE.",
                               id="sa_middleware.W003")]
    messages: list[checks.CheckMessage] = []
    if len(ours) > 1:
        messages.append(checks.Error("SessionAwareMiddleware is listed more than once in MIDDLEWARE: every "
                                     "request would be admitted twice (and refuse itself on exclusive routes).",
                                     id="sa_middleware.E004"))
    first = ours[0]
    for index, path, cls in entries:
        if index < first and any(_is(cls, path, target) for target in _CACHE_MIDDLEWARE):
            messages.append(checks.Warning(
                f"{path} comes before SessionAwareMiddleware: it answers cached responses without authorisation.",
                hint="Put SessionAwareMiddleware before the cache middleware.", id="sa_middleware.W001"))
        if index > first and _is(cls, path, _LOCALE_MIDDLEWARE):
            messages.append(checks.Warning(
                f"{path} comes after SessionAwareMiddleware: i18n_patterns URLs do not resolve before the "
                "language is activated, so their views' policies would not apply.",
                hint="Put SessionAwareMiddleware after LocaleMiddleware.", id="sa_middleware.W002"))
    return messages


def _url_patterns(resolver: Any, route: str = "", params: frozenset[str] = frozenset()
                  ) -> Iterator[tuple[str, Any, frozenset[str]]]:
    """Every URL pattern: its full route, its view and the keyword arguments the view receives."""
    for entry in resolver.url_patterns:
        regex = getattr(entry.pattern, "regex", None)
        names = params | frozenset(getattr(regex, "groupindex", ()))
        full = route + str(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from _url_patterns(entry, full, names | frozenset(entry.default_kwargs))
        elif isinstance(entry, URLPattern):
            yield full, entry.callback, names | frozenset(entry.default_args)


def _routed(path: str) -> bool:
    try:
        resolve(path)
    except Resolver404:
        return False
    except Exception:  # a converter refusing the sample path: not routed
        return False
    return True


@checks.register("sa_middleware", checks.Tags.urls)  # type: ignore[untyped-decorator, unused-ignore]
def check_routing(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """sa_middleware.E005 (views have a ``@policy`` but SessionAwareMiddleware is not in MIDDLEWARE: they would
    refuse every request), E006 (an entry of the Guard's table matches no URL pattern)."""
    try:
        patterns = list(_url_patterns(get_resolver()))
    except Exception:  # a broken URLconf is reported by Django's own checks
        return []
    messages: list[checks.CheckMessage] = []
    guarded = [view for _, view, _ in patterns
               if any(policy_of(view, m) is not None for m in (None, *_HTTP_METHODS))]
    if guarded and not any(_is(cls, path, MIDDLEWARE_PATH) for _, path, cls in _middleware_classes()):
        messages.append(checks.Error(
            f"{len(guarded)} view(s) have an sa-middleware @policy (e.g. {view_name(guarded[0])}) but "
            "SessionAwareMiddleware is not in MIDDLEWARE: they would answer every request with 503.",
            hint=f"Add {MIDDLEWARE_PATH!r} to MIDDLEWARE.", id="sa_middleware.E005"))
    try:
        guard = get_guard()
    except ImproperlyConfigured:  # reported as E001 / E002
        return messages
    try:
        check_table(guard.routes, ["/" + route for route, _, _ in patterns], _routed)
    except ConfigurationError as exc:
        messages.append(checks.Error(f"{SETTING}: {exc}", hint="Fix the path, or silence sa_middleware.E006 if "
                                     "something other than the URLconf answers it.", id="sa_middleware.E006"))
    return messages


@checks.register("sa_middleware", checks.Tags.urls)  # type: ignore[untyped-decorator, unused-ignore]
def check_view_policies(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """sa_middleware.E003: a view's policy is invalid, or a lock names a parameter its URL pattern lacks."""
    try:
        patterns = list(_url_patterns(get_resolver()))
    except Exception:  # a broken URLconf is reported by Django's own checks
        return []
    messages: list[checks.CheckMessage] = []
    seen: set[tuple[str, str]] = set()
    for route, view, params in patterns:
        cls = getattr(view, "view_class", None)
        methods: tuple[str | None, ...] = _HTTP_METHODS if isinstance(cls, type) else (None,)
        for method in methods:
            try:
                found = policy_of(view, method)
                if found is None:
                    continue
                where = f"view {view_name(view)} at route {'/' + route!r}"
                found.validate(where)
                for template in found.locks or ():
                    try:
                        render_lock_key(template, dict.fromkeys(params, ""))
                    except KeyError as missing:
                        raise ConfigurationError(
                            f"{where}: lock {template!r} names {{{missing.args[0]}}}, not a parameter of the URL "
                            f"pattern (it has: {', '.join(sorted(params)) or 'none'})") from None
            except ConfigurationError as exc:
                if (route, str(exc)) not in seen:
                    seen.add((route, str(exc)))
                    messages.append(checks.Error(str(exc), obj=view, id="sa_middleware.E003"))
    return messages

