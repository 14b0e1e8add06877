"""Sign-in with a throttle: too many failed sign-ins for one username or from one address are refused for a while.

Failures are counted in Django's cache (Redis when ``REDIS_URL`` is set, so every web
process shares the counts; else this process's memory) in a fixed window of
``TANDEM_SIGNIN_WINDOW_S`` seconds that starts at the first failure. Past
``TANDEM_SIGNIN_MAX_FAILURES`` for a username, or ``TANDEM_SIGNIN_MAX_FAILURES_PER_ADDRESS``
from a client address, sign-in is refused until the window ends: the console answers 429
with ``Retry-After`` and says so on the form. Nobody is locked out for longer than one
window, and nothing an attacker sends extends it (refused attempts are not counted).

The check sits in the authentication backend (``settings.AUTHENTICATION_BACKENDS``), so it
guards every sign-in form, the admin's included; the console's view refuses before the
form runs, to answer with 429 and a message instead of "wrong password".
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth import views as auth_views
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse

log = logging.getLogger(__name__)

CACHE_PREFIX = "tandem:signin"


@dataclass(frozen=True)
class Refusal:
    """Sign-in is refused for now; ``retry_after`` seconds until the window that refused it ends."""

    retry_after: int

    @property
    def message(self) -> str:
        minutes = max(1, -(-self.retry_after // 60))
        unit = "minute" if minutes == 1 else "minutes"
        return (
            f"Too many failed sign-ins for this account or from your network. "
            f"Try again in {minutes} {unit}, or ask an administrator to reset your password."
        )


def _keys(kind: str, value: str) -> tuple[str, str]:
    # Hashed: usernames are user input (any characters, any length) and do not belong in
    # cache keys or in a shared Redis as they were typed (a password typed into it, say).
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    base = f"{CACHE_PREFIX}:{kind}:{digest}"
    return f"{base}:count", f"{base}:until"


def _subjects(request: HttpRequest | None, username: str | None) -> list[tuple[str, str, int]]:
    """(kind, value, most failures allowed) for the username and the client address."""
    subjects = []
    if username:
        # Case-folded: the same person's "Alice" and "alice" share one count.
        subjects.append(("user", username.casefold(), settings.TANDEM_SIGNIN_MAX_FAILURES))
    address = request.META.get("REMOTE_ADDR") if request is not None else None
    if address:
        subjects.append(("addr", address, settings.TANDEM_SIGNIN_MAX_FAILURES_PER_ADDRESS))
    return subjects


def signin_refusal(request: HttpRequest | None, username: str | None) -> Refusal | None:
    """A refusal while the username or the address has used up its failures in the current window."""
    now = time.time()
    waits = []
    for kind, value, allowed in _subjects(request, username):
        count_key, until_key = _keys(kind, value)
        if (cache.get(count_key) or 0) >= allowed:
            until = cache.get(until_key) or now + settings.TANDEM_SIGNIN_WINDOW_S
            waits.append(max(1, int(until - now + 0.999)))
    return Refusal(retry_after=max(waits)) if waits else None


def signin_failed(request: HttpRequest | None, username: str | None) -> None:
    """Count one failed sign-in against the username and the address."""
    window = settings.TANDEM_SIGNIN_WINDOW_S
    for kind, value, _ in _subjects(request, username):
        count_key, until_key = _keys(kind, value)
        # add() only creates: the window starts at the first failure and is never extended;
        # incr() is atomic (locmem and Redis), so concurrent guesses are all counted.
        if cache.add(until_key, time.time() + window, timeout=window):
            cache.set(count_key, 0, timeout=window)
        try:
            cache.incr(count_key)
        except ValueError:  # the count expired between add() and incr(): a new window
            cache.set(count_key, 1, timeout=window)


def signin_succeeded(request: HttpRequest | None, username: str | None) -> None:
    """The real user got in: forget the username's failures (typos before do not add up later).

    The address's count is kept: an attacker with an account of their own could otherwise
    clear their address's count by signing into it between guesses at other accounts.
    """
    if username:
        cache.delete_many(_keys("user", username.casefold()))


class ThrottledModelBackend(ModelBackend):
    """Django's username/password backend behind the throttle: refuses, without checking, past the limit."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        refusal = signin_refusal(request, username)
        if refusal is not None:
            # PermissionDenied stops django.contrib.auth.authenticate() at once (no other
            # backend is tried); the password is never checked, so guessing gains nothing.
            # Logged with the address only: a username field sometimes holds a password.
            address = request.META.get("REMOTE_ADDR") if request is not None else None
            log.warning("sign-in refused from %s: too many failures (retry after %ss)", address, refusal.retry_after)
            raise PermissionDenied(refusal.message)
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            signin_failed(request, username)
        else:
            signin_succeeded(request, username)
        return user


class SignInView(auth_views.LoginView):
    """The console's sign-in page: a throttled sign-in gets 429, ``Retry-After`` and a message on the form."""

    template_name = "frontend/login.html"
    redirect_authenticated_user = True

    def post(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        refusal = signin_refusal(request, request.POST.get("username"))
        if refusal is None:
            return super().post(request, *args, **kwargs)
        form = self.get_form_class()(request, initial={"username": request.POST.get("username", "")})
        context = self.get_context_data(form=form, throttled=refusal.message)
        response = self.render_to_response(context, status=429)
        response["Retry-After"] = str(refusal.retry_after)
        return response
