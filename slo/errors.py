"""The slo app's errors: one small hierarchy, mapped to form errors and HTTP statuses by the console."""

from __future__ import annotations


class SloError(Exception):
    """Base of every error the slo services raise on purpose."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(SloError):
    """A value the service refuses (a threshold that is no bucket edge, a target outside (0, 1), a bad URL)."""
