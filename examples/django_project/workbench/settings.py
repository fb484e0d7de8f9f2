"""Settings of the workbench example. sa-middleware needs three things: the middleware in MIDDLEWARE, the dict
SA_MIDDLEWARE (the Guard's keyword arguments) and, for ``manage.py check``, the app in INSTALLED_APPS.

Environment: SA_STORE (store URI, default sqlite:///sa-django.db), SA_DEV_KEY (development key file, default
~/.config/sa-middleware/dev-key.pem, created if missing), WORKBENCH_BACKEND (optional "system of record" URL).
Mint a token with the same key:  sa-middleware token agent-7 --kind agent --scope "tickets payments:approve"
"""

from __future__ import annotations

import os

from sa_middleware import Policy
from sa_middleware.devkeys import DEV_AUDIENCE, DEV_ISSUER, dev_key

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "workbench-development-only")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = ["sa_middleware.adapters.django.SAMiddlewareConfig"]  # runs its system checks
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "sa_middleware.adapters.django.SessionAwareMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "workbench.urls"
WSGI_APPLICATION = "workbench.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

SA_MIDDLEWARE = {
    "store": os.environ.get("SA_STORE", "sqlite:///sa-django.db"),
    "keys": dev_key().public_pem,  # development only: trust your identity provider (jwks_url=...) in production
    "algorithms": ["RS256"],
    "issuer": DEV_ISSUER,
    "audience": DEV_AUDIENCE,
    "default_policy": Policy(max_sessions=3),
}

WORKBENCH_BACKEND = os.environ.get("WORKBENCH_BACKEND")
