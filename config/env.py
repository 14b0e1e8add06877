"""The one place settings read environment variables; a required one that is missing fails loudly."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from django.core.exceptions import ImproperlyConfigured

T = TypeVar("T")
_REQUIRED = object()


def get_env(name: str, default: object = _REQUIRED, cast: Callable[[str], T] = str) -> T:  # type: ignore[assignment]
    """``os.environ[name]`` cast by ``cast``; ``default`` when unset (an unset required one raises)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is _REQUIRED:
            raise ImproperlyConfigured(f"the environment variable {name} is required")
        return default  # type: ignore[return-value]
    try:
        return cast(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not valid: {exc}") from exc


def as_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def as_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]
