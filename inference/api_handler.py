"""The Django handler that serves the OpenAI-compatible API (``/v1/``) with a short middleware chain.

API clients send a bearer key, never cookies, so the session, CSRF, authentication,
messages and clickjacking middleware have nothing to do for them. Under ASGI they are not
free: each sync ``process_request``/``process_response`` hook is a hop to a thread and
back, about ten per request. ``config/asgi.py`` sends ``/v1/`` here; everything else
(the console, the admin) keeps the full chain.

For the same reason the handler's own sync work (the ``request_started`` and
``request_finished`` signals, ``response.close``) runs on one long-lived thread instead of
a thread Django starts for each request and joins after it: that start and join cost the
event loop up to 2 ms per request on a busy machine. Nothing else of a ``/v1/`` request
runs on that thread (the ORM work has its own, ``inference.runtime.db``), so requests do
not wait on each other there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.middleware.security import SecurityMiddleware

API_MIDDLEWARE = ["inference.api_handler.InlineSecurityMiddleware"]
API_PREFIX = "/v1/"


class InlineSecurityMiddleware(SecurityMiddleware):
    """Django's SecurityMiddleware, its two hooks called inline on the event loop.

    Django runs a sync ``process_request``/``process_response`` under ASGI through a
    thread hop each; these two only read settings and set headers (no I/O, no database),
    so they run where the request is. Same checks and headers as SecurityMiddleware.
    """

    async def __acall__(self, request):
        response = self.process_request(request)
        response = response or await self.get_response(request)
        return self.process_response(request, response)


class ApiASGIHandler(ASGIHandler):
    sync_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-sync")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"the API serves HTTP only, not {scope['type']}")
        async with ThreadSensitiveContext(executor=self.sync_thread):
            await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        # Django builds the chain from settings.MIDDLEWARE; this runs once, while the
        # ASGI application is being built (single-threaded), and puts the setting back.
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full


def by_path(api_app, site_app):
    """An ASGI app sending ``/v1/`` HTTP requests to ``api_app`` and the rest to ``site_app``."""

    async def app(scope, receive, send):
        target = api_app if scope.get("path", "").startswith(API_PREFIX) else site_app
        await target(scope, receive, send)

    return app
