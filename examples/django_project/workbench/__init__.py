"""The "agent workbench" API on Django, protected by sa-middleware (see ``settings.SA_MIDDLEWARE``)."""
