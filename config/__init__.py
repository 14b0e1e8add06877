"""The Django project: settings, URL and ASGI routing, the Celery app. No business logic."""

from config.celery_app import app as celery_app

__all__ = ["celery_app"]
