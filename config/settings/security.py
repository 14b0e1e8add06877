"""Transport security and sign-in throttling: the settings that depend on whether the site is served over HTTPS.

One switch, ``TANDEM_HTTPS``, says whether browsers reach the site over HTTPS (directly or
through a TLS-terminating proxy). Off, as for ``make run`` on http://127.0.0.1, cookies
must travel over plain http or nobody could sign in; on (production's default), cookies
are Secure, http is redirected to https and HSTS is sent. Each piece can still be
overridden on its own:

    TANDEM_HTTPS                     1/0 (default: 0 in base/local, 1 in production)
    TANDEM_SSL_REDIRECT              redirect http to https (default: TANDEM_HTTPS)
    TANDEM_SECURE_COOKIES            Secure session and CSRF cookies (default: TANDEM_HTTPS)
    TANDEM_HSTS_SECONDS              Strict-Transport-Security max-age (default: a year with HTTPS, else 0: none)
    TANDEM_HSTS_INCLUDE_SUBDOMAINS   includeSubDomains (default: 1)
    TANDEM_HSTS_PRELOAD              preload (default: 0: a submission to browsers' lists is the operator's call)
    TANDEM_PROXY_SSL_HEADER          the header a TLS proxy sets to "https" (default: X-Forwarded-Proto in
                                     production, none elsewhere; "none": trust no header). Only behind a
                                     proxy that overwrites it: a client could otherwise claim https.
    TANDEM_SIGNIN_MAX_FAILURES       failed sign-ins per username in a window before 429 (default 5)
    TANDEM_SIGNIN_MAX_FAILURES_PER_ADDRESS  per client address (default 20: offices share one address)
    TANDEM_SIGNIN_WINDOW_S           the window, and the longest a refused user waits (default 300)

The client address is the connection's (``REMOTE_ADDR``); behind a proxy, uvicorn puts the
real one there from ``X-Forwarded-For`` when the proxy is listed in its
``FORWARDED_ALLOW_IPS`` (default 127.0.0.1), never from a header a client could forge.
"""

from __future__ import annotations

from typing import Any

from config.env import as_bool, get_env

HSTS_ONE_YEAR_S = 31_536_000


def transport_security(*, https_default: bool, proxy_header_default: str = "") -> dict[str, Any]:
    """Django's security settings for a site served over HTTPS or not (``TANDEM_HTTPS``, default ``https_default``)."""
    https = get_env("TANDEM_HTTPS", https_default, as_bool)
    secure_cookies = get_env("TANDEM_SECURE_COOKIES", https, as_bool)
    include_subdomains = get_env("TANDEM_HSTS_INCLUDE_SUBDOMAINS", True, as_bool)
    preload = get_env("TANDEM_HSTS_PRELOAD", False, as_bool)
    proxy_header: str = get_env("TANDEM_PROXY_SSL_HEADER", proxy_header_default)
    silenced = []
    if not preload:
        # W021 asks for HSTS preload; preloading is a hard-to-undo submission of the whole
        # domain to browsers' built-in lists, so it stays the operator's explicit choice.
        silenced.append("security.W021")
    if not include_subdomains:
        silenced.append("security.W005")  # turned off on purpose by the environment
    return {
        "SECURE_SSL_REDIRECT": get_env("TANDEM_SSL_REDIRECT", https, as_bool),
        "SESSION_COOKIE_SECURE": secure_cookies,
        "CSRF_COOKIE_SECURE": secure_cookies,
        # Django sends HSTS only on https responses; 0 sends none
        "SECURE_HSTS_SECONDS": get_env("TANDEM_HSTS_SECONDS", HSTS_ONE_YEAR_S if https else 0, int),
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": include_subdomains,
        "SECURE_HSTS_PRELOAD": preload,
        "SECURE_PROXY_SSL_HEADER": _proxy_ssl_header(proxy_header),
        "SILENCED_SYSTEM_CHECKS": silenced,
    }


def _proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """``X-Forwarded-Proto`` -> Django's ``("HTTP_X_FORWARDED_PROTO", "https")``; empty or ``none`` -> None."""
    name = name.strip()
    if not name or name.lower() == "none":
        return None
    return ("HTTP_" + name.upper().replace("-", "_"), "https")


def signin_throttle() -> dict[str, int]:
    """How many failed sign-ins a username and a client address get in a window (``frontend.signin``)."""
    return {
        "TANDEM_SIGNIN_MAX_FAILURES": get_env("TANDEM_SIGNIN_MAX_FAILURES", 5, int),
        "TANDEM_SIGNIN_MAX_FAILURES_PER_ADDRESS": get_env("TANDEM_SIGNIN_MAX_FAILURES_PER_ADDRESS", 20, int),
        "TANDEM_SIGNIN_WINDOW_S": get_env("TANDEM_SIGNIN_WINDOW_S", 300, int),
    }
