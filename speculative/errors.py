"""The decoding core's error hierarchy.

Every failure the core can report derives from :class:`SpeculativeError`, so adapters
(the gateway, the verifier server, the CLI) map errors to HTTP statuses, OpenAI error
bodies or websocket frames in one place.
"""

from __future__ import annotations


class SpeculativeError(Exception):
    """Base class of every error raised by ``speculative``."""


class ModelLoadError(SpeculativeError):
    """A model path or id could not be loaded (missing, unreadable, wrong format)."""


class VocabularyMismatchError(ModelLoadError):
    """Draft and verifier do not share a tokenizer, so draft tokens mean nothing to the verifier."""


class InvalidRequestError(SpeculativeError):
    """A request is malformed: empty prompt, negative draft length, bad sampling values."""


class ContextOverflowError(InvalidRequestError):
    """The prompt (plus what must be generated) does not fit the model's context window."""


class VerifierUnavailableError(SpeculativeError):
    """The verifier could not be reached or failed; the caller may fall back to the edge tier."""


class VerifierBusyError(VerifierUnavailableError):
    """The verifier is at capacity; try another verifier or the edge tier."""


class DraftBusyError(SpeculativeError):
    """Every session slot of the draft model is in use; try again or another edge node."""


class SessionNotFoundError(SpeculativeError):
    """A verifier was asked about a session it does not hold (expired, never opened, or lost)."""
