#!/usr/bin/env python
"""The workbench's manage.py. Run the example (from the repository root)::

    python examples/django_project/manage.py runserver

or under ASGI::

    uvicorn --app-dir examples/django_project workbench.asgi:application
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workbench.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
