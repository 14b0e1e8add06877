"""Websocket URL routes (Channels); ``config.asgi`` wraps them in the session and origin checks."""

from django.urls import path

from inference.consumers import CompletionConsumer

WEBSOCKET_PATH = "ws/v1/completions"  # the console's JS is given this path (one source of truth)

websocket_urlpatterns = [
    path(WEBSOCKET_PATH, CompletionConsumer.as_asgi(), name="ws-completions"),
]
