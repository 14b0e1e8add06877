"""The Django handler that serves the OpenAI-compatible API (``/v1/``) with a short middleware chain.

API clients send a bearer key, never cookies, so the session, CSRF, authentication,
messages and clickjacking middleware have nothing to do for them. Under ASGI they are not
free: each sync ``process_request``/``process_response`` hook is a hop to a thread and
back, about ten per request. ``config/asgi.py`` sends ``/v1/`` here; everything else
(the console, the admin) keeps the full chain.

For the same reason ``handle`` runs Django's steps on the event loop without their hops,
and sends no ``request_started``/``request_finished`` signals. Their receivers (Django's
``reset_queries``, ``close_old_connections``, ``close_caches``, ``reset_urlconf``) tidy the
*calling* thread's database connections, caches and URL conf, and a ``/v1/`` request has
none of those on the event loop: its ORM work runs on ``inference.runtime.db``, whose
threads close their own stale connections around each call (Channels'
``DatabaseSyncToAsync``), the API uses no Django cache, and sets no per-request URL conf.
Measured with ``inference.bench_relay``: first the hops were about 0.5 ms of a
non-streaming relay's 2.7 ms; then the signals sent inline still cost 70 us of 2.1 ms
(``connections.all()`` and ``caches.all()`` look each alias up in a context-local store).

Nor does it open an ``asgiref`` thread-sensitive context per request: with none, anything a
view sends through ``sync_to_async`` runs on asgiref's one long-lived thread, which is what
the per-request context pointed at, for 24 us less a request.
"""

from __future__ import annotations

import asyncio
import contextlib

from asgiref.sync import markcoroutinefunction
from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.middleware.security import SecurityMiddleware
from django.urls import ResolverMatch, get_resolver, set_script_prefix

from inference.arrivals import counted_request

API_MIDDLEWARE = ["inference.api_handler.InlineSecurityMiddleware", "inference.api_handler.ContentLengthMiddleware"]
API_PREFIX = "/v1/"
MAX_STATIC_MATCHES = 64  # a bound, should a URL conf ever hold many routes without parameters


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


class ContentLengthMiddleware:
    """A whole (not streamed) response's ``Content-Length``, as the console's ``CommonMiddleware`` sets it.

    Without it uvicorn sends the API's JSON answers chunked: framing to write, and to parse in
    every client (a pure-Python parser in httpx and the official OpenAI client). Async-only:
    it runs on the event loop.
    """

    sync_capable = False
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        markcoroutinefunction(self)  # so Django awaits it without a thread hop

    async def __call__(self, request):
        response = await self.get_response(request)
        if not response.streaming and not response.has_header("Content-Length"):
            response.headers["Content-Length"] = str(len(response.content))
        return response


class ApiASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        # (resolver, path) -> the match of a route without parameters (the API has a handful)
        self._static_matches: dict[tuple[object, str], ResolverMatch] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"the API serves HTTP only, not {scope['type']}")
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """Django's ``ASGIHandler.handle`` for the API: the same steps, without its thread hops or signals.

        See the module docstring for why the request signals have nothing to do here. A completion
        request counts as on its way to an engine from here (``inference.arrivals``).
        """
        with counted_request(scope):
            await self._handle(scope, receive, send)

    async def _handle(self, scope, receive, send):
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            error_response.close()
            return

        async def process_request():
            response = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # the client left while it was sent
                await self.send_response(response, send)
            return response

        # As Django does: a client that leaves while the view runs cancels the view.
        listener = asyncio.create_task(self.listen_for_disconnect(receive))
        processing = asyncio.create_task(process_request())
        await asyncio.wait((listener, processing), return_when=asyncio.FIRST_COMPLETED)
        for task in (listener, processing):
            if task.done():
                # the task's exception, not raised here: raised, its traceback would hold this frame, which
                # holds the task, which holds the exception: a cycle keeping the whole request (its response,
                # its completion, ~180 objects) for the cyclic collector, at every request, as the listener
                # ends with RequestAborted once the response is sent and the client's connection idles
                error = task.exception()
                if error is not None and not isinstance(error, RequestAborted):
                    if isinstance(error, AssertionError):
                        body_file.close()
                    raise error
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            response = processing.result()
        except asyncio.CancelledError:
            pass
        else:
            _close_without_signal(response)
        body_file.close()

    def resolve_request(self, request):
        """Django's URL resolution, the match of a path without parameters remembered per resolver.

        Resolving walks the URL patterns with regular expressions for every request (about
        3% of a relayed request's CPU); the API's hot routes (``chat/completions``,
        ``completions``, ``models``) take no parameters, so their match is the same object
        every time. A route with parameters (a model id, the catch-all 404) is resolved each
        time, so the map holds at most the API's static routes; a changed URL conf (tests'
        ``ROOT_URLCONF``) is a new resolver and starts afresh.
        """
        if hasattr(request, "urlconf"):
            return super().resolve_request(request)
        key = (get_resolver(), request.path_info)
        match = self._static_matches.get(key)
        if match is None:
            match = super().resolve_request(request)
            if not match.args and not match.kwargs and len(self._static_matches) < MAX_STATIC_MATCHES:
                self._static_matches[key] = match
            return match
        request.resolver_match = match
        return match

    def load_middleware(self, is_async: bool = False) -> None:
        # Django builds the chain from settings.MIDDLEWARE; this runs once, while the
        # ASGI application is being built (single-threaded), and puts the setting back.
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full


def _close_without_signal(response) -> None:
    """``HttpResponseBase.close()`` (Django 5.2) without the ``request_finished`` it sends."""
    for closer in response._resource_closers:
        with contextlib.suppress(Exception):
            closer()
    response._resource_closers.clear()  # free what they still referenced
    response.closed = True


def by_path(api_app, site_app):
    """An ASGI app sending ``/v1/`` HTTP requests to ``api_app`` and everything else to ``site_app``."""

    async def app(scope, receive, send):
        api = scope["type"] == "http" and scope.get("path", "").startswith(API_PREFIX)
        await (api_app if api else site_app)(scope, receive, send)

    return app
