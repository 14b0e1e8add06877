"""The registry's errors: one small hierarchy, mapped at the console's edge to a message."""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error the registry's services raise on purpose."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(RegistryError):
    """A caller passed something the registry refuses (a missing file, an unknown format, a bad share)."""


class InvalidTransition(RegistryError):
    """The rollout is not in a state that allows this (promote a failed rollout, pause a finished one)."""


class StepFailed(RegistryError):
    """A rollout step found the candidate unfit (tokenizer differs, logits disagree, acceptance too low)."""
