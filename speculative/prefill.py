"""Opening verifier sessions: a prompt checked, then prefilled together with the others opening at that moment.

Shared by both verifier backends (``verifier.TransformersVerifier``, ``verifier_llama.LlamaCppVerifier``):
a session to open is a :class:`PrefillTicket` in the backend's queue; whoever holds the
backend's lock next prefills every queued ticket in one forward (``open_batch``), so
sessions that open while a step runs share a prefill. The verify scheduler opens the
sessions that start together with ``open_together`` (the backends' ``open_many``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from speculative.errors import ContextOverflowError, InvalidRequestError, VerifierBusyError
from speculative.sampling import check_sampling
from speculative.types import SamplingParams


def checked_prompt(
    prompt_ids: Sequence[int], params: SamplingParams, context_length: int, vocab_size: int
) -> list[int]:
    """A session's prompt as ints, refused before any work when it or its sampling cannot be served (every backend)."""
    check_sampling(params)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise InvalidRequestError("the prompt is empty")
    if len(prompt) >= context_length:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} tokens; the verifier's context holds {context_length}"
        )
    if any(not 0 <= t < vocab_size for t in prompt):
        raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab_size})")
    return prompt


S = TypeVar("S")  # a backend's session


@dataclass
class PrefillTicket:
    """A session waiting to be opened: filled in by whichever thread runs the batched prefill."""

    session_id: str
    prompt: list[int]
    params: SamplingParams
    done: bool = False
    prefill_ms: float = 0.0  # its share of the prefill's verifier time
    error: BaseException | None = None


def open_when_prefilled(
    ticket: PrefillTicket,
    queue: deque[PrefillTicket],
    queue_lock: threading.Lock,
    lock: threading.Lock,
    prefill_queued: Callable[[], None],
) -> float:
    """Queue ``ticket``, then wait until a batched prefill has opened it (or failed it); its prefill ms.

    Whoever holds ``lock`` next prefills every session queued by then (``prefill_queued``, both
    backends): sessions that open while a step runs (a burst of requests) share the next prefill.
    """
    (result,) = open_all([ticket], queue, queue_lock, lock, prefill_queued)
    if isinstance(result, BaseException):
        raise result
    return result


def open_all(
    tickets: Sequence[PrefillTicket],
    queue: deque[PrefillTicket],
    queue_lock: threading.Lock,
    lock: threading.Lock,
    prefill_queued: Callable[[], None],
) -> list[float | BaseException]:
    """``open_when_prefilled`` for several sessions at once: queued together, so they share prefills.

    Each gets its prefill ms, or the error that kept it from opening (the others open regardless).
    """
    with queue_lock:
        for ticket in tickets:
            queue.append(ticket)
    for ticket in tickets:
        while not ticket.done:
            with lock:
                if not ticket.done:
                    prefill_queued()
    return [ticket.error if ticket.error is not None else ticket.prefill_ms for ticket in tickets]


def open_tickets(
    openings: Sequence[tuple[str, Sequence[int], SamplingParams]], context_length: int, vocab_size: int
) -> tuple[list[PrefillTicket], list[float | BaseException | None]]:
    """Tickets for the openings whose prompts are valid; a result list with the invalid ones' errors filled in."""
    tickets: list[PrefillTicket] = []
    results: list[float | BaseException | None] = []
    for session_id, prompt_ids, params in openings:
        try:
            prompt = checked_prompt(prompt_ids, params, context_length, vocab_size)
        except Exception as exc:  # noqa: BLE001 - this opening fails alone
            results.append(exc)
            continue
        tickets.append(PrefillTicket(session_id, prompt, params))
        results.append(None)
    return tickets, results


def open_together(
    backend: Any, openings: Sequence[tuple[str, Sequence[int], SamplingParams]]
) -> list[float | BaseException]:
    """A backend's ``open_many``: valid openings queued together, each result in the openings' order."""
    tickets, results = open_tickets(openings, backend.context_length, backend.vocab_size)
    opened = iter(open_all(tickets, backend._prefills, backend._prefill_lock, backend._lock, backend._prefill_queued))
    return [next(opened) if result is None else result for result in results]


def open_batch(
    batch: Sequence[PrefillTicket],
    sessions: dict[str, S],
    max_sessions: int,
    new_session: Callable[[PrefillTicket], S],
    release: Callable[[S], None],
    prefill: Callable[[list[tuple[PrefillTicket, S]]], None],
) -> None:
    """Open ``batch``'s sessions and prefill their prompts together (under the verifier's lock).

    A session that cannot open (its id is taken, the verifier holds ``max_sessions``) fails
    alone; a prefill that fails fails every session it carried and ``release`` frees them.
    """
    opened: list[tuple[PrefillTicket, S]] = []
    for ticket in batch:
        if ticket.session_id in sessions or any(t.session_id == ticket.session_id for t, _ in opened):
            ticket.error = InvalidRequestError(f"session {ticket.session_id!r} is already open")
        elif len(sessions) + len(opened) >= max_sessions:
            ticket.error = VerifierBusyError(f"the verifier holds its maximum of {max_sessions} sessions")
        else:
            opened.append((ticket, new_session(ticket)))
    try:
        prefill(opened)
    except BaseException as exc:
        for ticket, session in opened:
            release(session)
            ticket.error = exc
        opened = []
        if not isinstance(exc, Exception):
            raise
    finally:
        for ticket, session in opened:
            sessions[ticket.session_id] = session
        for ticket in batch:
            ticket.done = True
