"""ASGI entry point: HTTP (console, OpenAI-compatible API) and websockets (Channels)."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
django_asgi_app = get_asgi_application()  # before anything imports models

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from inference.api_handler import ApiASGIHandler, by_path  # noqa: E402
from inference.engines import warm_engines_in_background  # noqa: E402
from inference.routing import websocket_urlpatterns  # noqa: E402
from inference.ws_origin import browser_origin_validator  # noqa: E402

YOUNG_COLLECTION_THRESHOLD = 7000  # allocations net of deallocations between young collections (CPython: 700)

site = ProtocolTypeRouter(
    {
        # static files straight from the apps' folders, asynchronously (a sync-only static
        # middleware such as WhiteNoise's would push every request through two thread hops)
        "http": ASGIStaticFilesHandler(django_asgi_app) if settings.TANDEM_SERVE_STATIC else django_asgi_app,
        "websocket": browser_origin_validator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
# /v1/ (bearer keys only, so no session/CSRF/messages middleware) goes straight to its handler
application = by_path(ApiASGIHandler(), site)
warm_engines_in_background()  # a server is starting: load the weights before the first request

# Everything imported so far lives as long as the process: move it out of the collector's
# reach, so a full collection in the middle of a request scans only what requests made.
# Measured on the router's checks: a collection during a PII scan added 6-8 ms to its p99.
gc.collect()
gc.freeze()
# A relayed request leaves a few hundred container objects for the collector to count; at
# CPython's default threshold (700) that was a young collection every four or five requests
# and a full one (23 ms) every ~600. Measured with the relay benchmark's requests: the
# collector's share went from 0.09 to 0.045 ms a request, and no full collection ran in 3,500.
gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, 10, 10)
