"""The PII package's one error hierarchy; callers (the router) catch ``PiiError`` and fail closed."""

from __future__ import annotations


class PiiError(Exception):
    """Base of every error this package raises."""


class PiiModelError(PiiError):
    """The shipped name model (``inference/assets/pii/``) is missing or does not match this code."""
