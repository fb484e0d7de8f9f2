"""The workbench's routes; the policies sit on the views (``workbench.views``)."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("whoami", views.whoami),
    path("tickets", views.Tickets.as_view()),
    path("payments/<int:id>/approve", views.approve_payment),
    path("objects/<int:id>", views.ObjectView.as_view()),
]
