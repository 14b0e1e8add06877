"""The difficulty package's errors: one small hierarchy that the router maps at its edge."""

from __future__ import annotations


class DifficultyError(Exception):
    """Base class for every error raised by ``inference.difficulty``."""


class ArtifactError(DifficultyError):
    """The committed classifier (tokenizer, embeddings or head) is missing, corrupt or inconsistent."""


class InvalidThresholds(DifficultyError, ValueError):
    """Thresholds outside [0, 1]."""
