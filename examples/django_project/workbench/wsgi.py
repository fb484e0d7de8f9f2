"""WSGI entry point: ``python examples/django_project/manage.py runserver`` (development) or any WSGI server
(``gunicorn --chdir examples/django_project workbench.wsgi``)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workbench.settings")

application = get_wsgi_application()
