"""A web console for operators: principals and sessions live, locks, a chart of admissions and denials, the audit
trail, and actions (pause, resume, revoke, rotate, report compromise) audited with the operator's identity.

``sa-middleware console --store URI`` serves it on a loopback address with a one-time login link; an application
can mount :func:`asgi_app` or :func:`wsgi_app` itself, authorised by its Guard (a bearer token with the admin
scope). No framework and no CDN: the page and its script are package data.
"""

from __future__ import annotations

from .app import ACTIONS, DEFAULT_ADMIN_SCOPE, Console
from .server import asgi_app, wsgi_app

__all__ = ["ACTIONS", "DEFAULT_ADMIN_SCOPE", "Console", "asgi_app", "wsgi_app"]
