"""Websocket origin check: a browser's handshake must come from one of our hosts.

Browsers always send ``Origin`` on a websocket handshake, and a page on another site
could otherwise ride the console's session cookie (cross-site websocket hijacking), so a
present Origin must match ``ALLOWED_HOSTS``. Channels' own validator also refuses a
handshake with no Origin at all, which would lock out every non-browser client (SDKs,
the benchmark) that authenticates with an API key and carries no cookie: those pass.
"""

from __future__ import annotations

from channels.security.websocket import OriginValidator
from django.conf import settings


class BrowserOriginValidator(OriginValidator):
    def valid_origin(self, parsed_origin) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)


def browser_origin_validator(application):
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return BrowserOriginValidator(application, hosts)
