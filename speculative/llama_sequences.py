"""Sequence ids of a shared llama.cpp context with a KV stream per sequence: both llama.cpp backends' plumbing.

With a KV stream per sequence (what keeps the verifier batch-invariant), llama.cpp
evaluates a batch in one pass per run of consecutive sequence ids: which ids sessions
take (``SequenceIds``, which also keeps a closed session's tokens for the next prompt
that starts with them), when they move down to close a gap (``Compaction``), the order
rows go into a batch (``in_sequence_order``) and when padding a row keeps a step in one
pass (``padded_width``). The verifier (``verifier_llama``), the draft (``draft_llama``) and the
SmolLM2 teacher's runner build on these (a decode's logits: ``llama_logits``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from speculative.errors import ModelLoadError

if TYPE_CHECKING:
    from speculative.prompt_stash import PromptStash

R = TypeVar("R")


# A move into a free id below copies the session's whole KV stream: measured on the demo verifier (Q8_0, two
# threads, 2026-12-03) the decode after a move took 2.0-2.1 ms longer, once, where a free id between sessions
# cost each step 0.4 ms more (one more pass), at 4 and at 16 sessions alike. The draft's ratio is alike.
COPY_PASSES = 5  # a move's cost, in the extra passes of a split step


class Compaction:
    """When to move sessions into the free ids below them: once their split has cost what the moves would.

    A session that ends leaves a free id among the others, and every lockstep step then runs
    one more pass over the weights for each gap, until a new session fills the lowest free id
    (a served client's next request, a few steps later) or the sessions above move down. The
    moves cost several passes at once, so they wait until the gaps have cost as much (ski
    rental: never more than twice the better choice in hindsight): in the platform at 4 and
    16 sessions, moving at once spent 12-18% of the verifier's decode time on copies for gaps
    that the next request would have filled.
    """

    def __init__(self) -> None:
        self.owed = 0  # extra passes the current gaps have cost so far

    def due(self, seqs: Iterable[int], steps: int = 1) -> bool:
        """Whether to move sessions now, before ``steps`` lockstep steps over ``seqs`` (counting their split if not)."""
        ids = sorted(seqs)
        if not ids or ids[-1] - ids[0] + 1 == len(ids):
            self.owed = 0
            return False
        movers = sum(1 for seq in ids if seq >= ids[0] + len(ids))  # the lowest stays; those past its run move
        if self.owed >= COPY_PASSES * movers:
            self.owed = 0
            return True
        self.owed += steps * _gaps(ids)
        return False

    def accrue(self, seqs: Iterable[int], steps: int) -> None:
        """Count ``steps`` lockstep steps over ``seqs`` that ran without asking ``due`` (native steps run together)."""
        self.owed += steps * _gaps(sorted(seqs))


def _gaps(ids: list[int]) -> int:
    """The gaps between sorted sequence ids: a lockstep step's extra passes over the weights (one a gap)."""
    return sum(1 for a, b in zip(ids, ids[1:], strict=False) if b != a + 1)


# A kept prefix this much longer than what an id beside the others keeps takes a session apart from them: a prefill
# of the demo verifier costs about 0.2 ms a position, a free id between sessions 0.4 ms a step until it closes
# (a new session fills it, or a move: ``Compaction``).
PREFIX_OVER_GAP = 32
# Where the context can copy a stream (``SequenceIds(copy=...)``), a kept prefix this much longer than what an id
# beside the others keeps is copied into one of those instead: the copy is of the whole stream, done at the next
# decode (measured, two threads: SmolLM2-135M-Instruct's 2,048-position stream 5.7 ms against 3.6 ms a prompt
# position prefilled; the demo verifier's 1.4 ms against 0.26), and the session stays beside the others.
COPY_OVER = 8


MAX_SEQUENCES = 256  # llama.cpp's limit on a context's sequences


# Tokens one session may hold at most, by default (prompt and answer): every session's KV stream is
# allocated whole when the model loads, so a model's own context is a cost paid for every session even
# idle. SmolLM2-135M-Instruct's 8,192 for 32 sessions made the verifier's process 6.3 GB (2026-12-03);
# 2,048 makes it about 1.6. The demo pair's own contexts are shorter, so it is unchanged.
DEFAULT_MAX_CONTEXT = 2048


def session_context(n_ctx_train: int, max_context: int | None) -> int:
    """A session's context: the model's own (``n_ctx_train``) capped at ``max_context`` (None: no cap)."""
    if max_context is None:
        return n_ctx_train
    if max_context < 1:
        raise ModelLoadError(f"max_context must be at least 1 token (None: the model's own), got {max_context}")
    return min(n_ctx_train, max_context)


def check_context_sizes(max_sessions: int, batch_tokens: int) -> None:
    """Refuse sizes llama.cpp cannot make a context of: it aborts the process (``GGML_ASSERT`` on its outputs)
    when a batch holds fewer positions than the context has sequences, as it reserves an output for each."""
    if not 1 <= max_sessions <= MAX_SEQUENCES:
        raise ModelLoadError(
            f"max_sessions must lie in [1, {MAX_SEQUENCES}] (llama.cpp's sequence limit), got {max_sessions}"
        )
    if batch_tokens < max_sessions:
        raise ModelLoadError(f"batch_tokens ({batch_tokens}) must be at least max_sessions ({max_sessions})")


class KvStreams(Protocol):
    """What ``SequenceIds.of_context`` needs of a llama.cpp context (llama-cpp-python's ``LlamaContext``)."""

    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool: ...

    def kv_cache_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int, p1: int) -> Any: ...


class SequenceIds:
    """The sequence ids of a shared llama.cpp context: which are free, and what each free one's KV stream still holds.

    A closed session's stream keeps its tokens (``release(seq, kept)``), and a new session
    takes the free id whose kept tokens share the longest prefix with what it will hold
    (``take``): those positions need no evaluation. As llama.cpp's own server reuses a slot's
    cache, so a chat's next turn, or a prompt behind a shared system prompt, evaluates only
    what is new. The kept positions hold what a fresh evaluation would compute: the same
    tokens at the same positions of a stream that holds nothing else, and a stream's values
    do not depend on what is batched beside it (each sequence has a KV stream of its own);
    the verifier's tests check its plain decoding after reuse against a fresh one.

    Where nothing is kept, ids go low-first. llama.cpp evaluates a step in one pass per run
    of consecutive ids (``micro_batches``), so a session takes one of the ids that add fewest
    runs (a free id between open ones, or beside them), the one that keeps the longest prefix
    (then the lowest). A prefix kept elsewhere ``COPY_OVER`` tokens longer is copied into one
    of those (``copy(source, destination)``: a whole stream, cell for cell, so the copy holds
    what the source does); without ``copy`` the session goes apart from the open ones for a
    prefix ``PREFIX_OVER_GAP`` tokens longer. Where the id it takes keeps a prompt of at least
    ``COPY_OVER`` tokens it would not reuse (a prompt may come again, or a chat's next turn
    after it; an answer alone rarely does), those are first copied to a free id apart from the
    open ones (``_preserve``), or with a ``stash`` put into host memory (``PromptStash``, the verifier's),
    as ``llama-server``'s prompt cache keeps them. With no prefix to
    reuse it takes an id that keeps nothing, or else the one whose tokens were kept longest ago,
    so that many prompts stay kept at once (one each, a client cycling through 8 prompts on 32
    ids). ``remove(seq, from_position)`` drops a stream's positions from ``from_position`` on.

    Measured on SmolLM2-135M-Instruct's chat prompts (16 sessions, 16 prompts each sent twice
    a wave, two threads, 2026-12-03): without copies a session opening beside the others found
    only the shared system prompt there and evaluated 1,591 of the wave's 2,250 prompt positions
    (``llama-server``, whose slots keep their prompts, about 600); with them 82-349, and plain
    decoding went from 98 to 133-159 tokens/s. The demo pair's prompts (about 5 tokens) are not
    worth a copy: one copy in such a wave, where copying every answer apart took 46.
    """

    def __init__(
        self,
        n: int,
        remove: Callable[[int, int], object],
        *,
        reuse: bool = True,
        copy: Callable[[int, int], object] | None = None,
        stash: PromptStash | None = None,
    ):
        self.n = n
        self.free = list(range(n - 1, -1, -1))  # low ids last: ``free[-1]`` is the lowest
        self.reuse = reuse
        self.reused = 0  # positions found kept, not evaluated again
        self._kept: dict[int, list[int]] = {}  # free id -> the tokens its stream holds at positions 0..
        self._order: dict[int, int] = {}  # free id -> when its tokens were kept (the oldest goes first)
        self._prompts: dict[int, int] = {}  # free id -> how many of its kept tokens were the prompt it was taken for
        self._wanted: dict[int, int] = {}  # open id -> the length of the prompt it was taken for
        self._released = 0
        self._remove = remove
        self._copy = copy  # (source, destination): the destination's stream becomes a copy of the source's
        self.copies = 0  # kept prefixes copied beside the open ids
        self._stash = stash  # host memory a kept prompt goes to before it is overwritten (else: copied apart)
        # ids a copy writes at the next decode (``applied``): their data is not yet what they are said to hold
        self.pending: set[int] = set()
        self._sources: set[int] = set()  # and the ids it reads then: written over now, the copy would read that

    @classmethod
    def of_context(cls, ctx: KvStreams, n: int, *, reuse: bool = True, stash: PromptStash | None = None) -> SequenceIds:
        """The ids of ``ctx``'s ``n`` sequences: positions dropped with ``llama_memory_seq_rm``, streams copied
        whole with ``llama_memory_seq_cp`` (done at the next decode), as both llama.cpp backends do."""
        return cls(
            n,
            lambda seq, start: ctx.kv_cache_seq_rm(seq, start, -1),
            reuse=reuse,
            copy=lambda source, seq: ctx.kv_cache_seq_cp(source, seq, -1, -1),
            stash=stash,
        )

    def applied(self) -> None:
        """A decode ran: the copies waiting for it are done."""
        self.pending.clear()
        self._sources.clear()

    def plan(self, wants: Sequence[Sequence[int]]) -> list[int | None]:
        """Ids for sessions opening together (``take(want, prefer=...)`` each, in order), by what their ids keep.

        ``take`` chooses for one session at a time: beside the open ones first, by kept prefix
        second, unless another id keeps ``PREFIX_OVER_GAP`` tokens more. A wave of sessions opening
        where an earlier wave ended then put the first beside nothing, the others beside it, each
        on whatever that id kept: demo pair, 16 clients cycling through 16 prompts of 3-9 tokens,
        33-67 of a wave's 67 cached prompt positions evaluated again, prefills of 10-26 ms split in
        passes (2026-12-04), where the previous wave's 16 ids kept every prompt. Here the
        longest kept prefixes are matched first, one id each, where the ids matched (with the open
        ones) form no more runs of consecutive ids than the open ones alone (or one run, where
        none is open); else, and for a session matching none, ``None``: ``take`` chooses as before.
        """
        plan: list[int | None] = [None] * len(wants)
        if len(wants) < 2 or not self._kept:
            return plan
        matches = sorted(
            (
                (shared, -seq, i)
                for i, want in enumerate(wants)
                for seq, kept in self._kept.items()
                if (shared := common_prefix(kept, want)) > 0
            ),
            reverse=True,
        )
        taken: set[int] = set()
        for _, neg_seq, i in matches:
            if plan[i] is None and -neg_seq not in taken:
                plan[i] = -neg_seq
                taken.add(-neg_seq)
        free = set(self.free)
        open_ids = {seq for seq in range(self.n) if seq not in free}
        if _runs(open_ids | taken) > max(1, _runs(open_ids)):
            return [None] * len(wants)
        return plan

    def take(self, want: Sequence[int] = (), prefer: int | None = None) -> tuple[int, int]:
        """A free id for a session whose first positions will hold ``want``; how many of them it holds already.

        ``prefer``: the id ``plan`` chose for it (taken if it is still free, with what it keeps).
        """
        want = list(want)
        if prefer is not None and prefer in self._kept:
            seq, reused, source = prefer, common_prefix(self._kept[prefer], want), None
        elif self._kept and want:
            seq, reused, source = self._choose(want)
        else:
            seq, reused, source = self.free[-1], 0, None
        stashed = self._stashed(want, reused)  # a longer prefix kept in host memory, to write into ``seq``
        if stashed is not None and self._copying(seq):  # written over now, a copy at the next decode would miss it
            other = self._not_copying()
            if other is None:
                stashed = None  # no id to write it into before the next decode: as if there were no stash
            else:
                seq, source = other, None
        self.free.remove(seq)
        kept = self._kept.pop(seq, None)
        order, prompt, copy = self._order.pop(seq, 0), self._prompts.pop(seq, 0), self._copy
        own = reused if source is None and stashed is None else 0  # what ``seq`` keeps that the session reuses
        # a prompt it would lose goes to host memory where there is a stash (0.2-0.5 ms for SmolLM2's, where a copy
        # apart was 5.7 at the next decode and was lost if another session took that id before it), else apart
        if kept is not None and _a_prompt(kept, prompt, own):
            if self._stash is not None:
                self._stash_away(seq, kept)
            elif copy is not None:
                self._preserve(copy, seq, kept, (order, prompt), source)
        if stashed is not None:
            if self._unstash(seq, *stashed):  # no copy, nothing kept to trim
                self.reused += stashed[0]
                self._wanted[seq] = len(want)
                return seq, stashed[0]
            kept, reused = None, reused if source is not None else 0  # the stream is empty now
        if source is not None and copy is not None:  # the source stays free, keeping its tokens for another prompt
            self._copy_stream(copy, source, seq)
            kept = self._kept[source]
            self.copies += 1
        if kept is not None and len(kept) > reused:
            self._remove(seq, reused)
        self.reused += reused
        self._wanted[seq] = len(want)
        return seq, reused

    def release(self, seq: int, kept: Sequence[int] = ()) -> None:
        """Free ``seq``; its stream keeps ``kept`` (the tokens at its positions 0..), or nothing."""
        wanted = self._wanted.pop(seq, 0)
        if self.reuse and kept:
            self._kept[seq] = list(kept)
            self._order[seq] = self._released = self._released + 1
            self._prompts[seq] = wanted
        else:
            self._remove(seq, 0)
        self.free.append(seq)
        self.free.sort(reverse=True)

    def moved(self, hole: int, seq: int) -> None:
        """A session moves from ``seq`` into the free id ``hole`` (its stream copied over, ``seq``'s emptied): told
        before the copy is made, so that a prompt ``hole`` keeps goes to host memory first, where there is a stash."""
        kept, prompt = self._kept.pop(hole, None), self._prompts.pop(hole, 0)
        if kept is not None and _a_prompt(kept, prompt):
            self._stash_away(hole, kept)
        self.pending.add(hole)
        self._sources.add(seq)
        self.free.remove(hole)
        self._order.pop(hole, None)
        self._wanted[hole] = self._wanted.pop(seq, 0)
        self.free.append(seq)
        self.free.sort(reverse=True)

    def _runs_added(self) -> dict[int, int]:
        """Each free id: the passes a step over the open ids and it takes, less theirs (-1, 0 or 1)."""
        free, n = set(self.free), self.n
        # (each session opening reads this for every free id: booleans summed, not a generator each, ~4x faster)
        return {
            seq: 1 - ((seq > 0 and seq - 1 not in free) + (seq + 1 < n and seq + 1 not in free)) for seq in self.free
        }

    def _copy_stream(self, copy: Callable[[int, int], object], source: int, seq: int) -> None:
        copy(source, seq)
        self.pending.add(seq)
        self._sources.add(source)

    def _stash_away(self, seq: int, kept: list[int]) -> None:
        """Put what ``seq`` keeps into host memory before it is overwritten (where its data is in place)."""
        if self._stash is not None and seq not in self.pending:
            self._stash.save(seq, kept)

    def _stashed(self, want: list[int], reused: int) -> tuple[int, tuple[int, ...]] | None:
        """(positions of ``want``, tokens) of the stash holding ``COPY_OVER`` positions more than ``reused``, if any."""
        if self._stash is None or not want:
            return None
        length, key = self._stash.longest(want)
        return (length, key) if key is not None and length >= reused + COPY_OVER else None

    def _copying(self, seq: int) -> bool:
        """Whether a copy waiting for the next decode reads or writes ``seq``'s stream."""
        return seq in self.pending or seq in self._sources

    def _not_copying(self) -> int | None:
        """Of the free ids no waiting copy touches, one adding fewest runs: empty, else kept longest ago."""
        added = self._runs_added()
        ids = [seq for seq in self.free if not self._copying(seq)]
        fewest = min((added[seq] for seq in ids), default=0)
        return self._expendable([seq for seq in ids if added[seq] == fewest])

    def _unstash(self, seq: int, length: int, key: tuple[int, ...]) -> bool:
        """Write the stash of ``key`` into ``seq``, keeping its first ``length`` positions."""
        assert self._stash is not None
        self._remove(seq, 0)
        return self._stash.restore(key, seq, length)

    def _preserve(
        self, copy: Callable[[int, int], object], seq: int, kept: list[int], stamp: tuple[int, int], avoid: int | None
    ) -> None:
        """Copy what ``seq`` kept into a free id apart from the open ones (which a new session takes last): one
        that keeps nothing, else the one kept longest ago if older. So a prompt outlives the next session opening
        beside the others (a chat's next turn, a prompt sent again) as ``llama-server``'s prompt cache keeps it.
        ``stamp``: when ``seq``'s tokens were kept, and how many of them were its prompt."""
        order, prompt = stamp
        added = self._runs_added()
        fewest = min(added.values(), default=0)
        spare = self._expendable([f for f in self.free if f != avoid and added[f] > fewest])
        if spare is None or (spare in self._kept and self._order[spare] > order):
            return
        self._copy_stream(copy, seq, spare)
        self._kept[spare], self._order[spare], self._prompts[spare] = kept, order, prompt
        self.copies += 1

    def _expendable(self, ids: list[int]) -> int | None:
        """Of ``ids``, the one whose stream to lose: the lowest that keeps nothing, else the one kept longest ago."""
        empty = [seq for seq in ids if seq not in self._kept]
        return min(empty) if empty else min(ids, key=lambda seq: self._order[seq], default=None)

    def _choose(self, want: list[int]) -> tuple[int, int, int | None]:
        """(the id to take, the positions of ``want`` it will hold, the id whose stream to copy there or None)."""
        added = self._runs_added()
        fewest = min(added.values())
        # the best of the ids that add fewest runs, by kept prefix, then the lowest; and the best of the others
        beside = [seq for seq in self.free if added[seq] == fewest]
        near = max(
            ((common_prefix(self._kept[seq], want), -seq) for seq in beside if seq in self._kept), default=(0, 0)
        )
        # nothing to reuse (or a few positions, not worth cutting the short prompt kept there while an id keeps
        # nothing): an id that keeps nothing, else the one kept longest, is the one to lose
        expendable = self._expendable(beside)
        assert expendable is not None  # ``beside`` holds the ids adding fewest runs: never none
        if near[0] == 0 or (expendable not in self._kept and self._cuts_short_prompt(-near[1], near[0], len(want))):
            near = (0, -expendable)
        far = max(
            ((common_prefix(kept, want), -seq) for seq, kept in self._kept.items() if added[seq] > fewest),
            default=(0, 0),
        )
        if self._copy is not None and far[0] >= near[0] + COPY_OVER:
            return expendable, far[0], -far[1]
        best = far if far[0] >= near[0] + PREFIX_OVER_GAP else near
        return -best[1], best[0], None

    def _cuts_short_prompt(self, seq: int, shared: int, wanted: int) -> bool:
        """Whether a session reusing ``shared`` of ``wanted`` positions from ``seq`` saves too little to cut its prompt.

        Its prefill still takes a decode (it reuses less than it wants), which costs about what it would
        without the few shared positions (fewer than ``COPY_OVER``), while the prompt ``seq`` keeps beyond them
        would be evaluated again when it comes back where it is too short to be stashed or copied apart (and
        stashed at a cost otherwise). The demo pair's
        prompts of 3-7 tokens, two pairs sharing their first word: a client cycling through them had a
        prefill decode on half its requests (0.5-0.9 ms of a 64-token request's ~35), none with empty ids taken.
        """
        kept_prompt = min(self._prompts.get(seq, 0), len(self._kept[seq]))
        return shared < min(COPY_OVER, wanted) and kept_prompt > shared


def _runs(ids: set[int]) -> int:
    """How many runs of consecutive ids ``ids`` make (llama.cpp's passes over one position of each)."""
    return sum(1 for seq in ids if seq - 1 not in ids)


def _a_prompt(kept: list[int], prompt: int, reused: int = 0) -> bool:
    """Whether ``kept`` (tokens a stream keeps, the first ``prompt`` of them a prompt) holds a prompt worth keeping
    beyond its first ``reused``: a prompt may come again, or a chat's next turn after it; an answer alone rarely does."""
    return min(prompt, len(kept)) - reused >= COPY_OVER


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (slice comparisons, a logarithmic number of them)."""
    if not a or not b or a[0] != b[0]:  # most kept streams of another prompt: no copies made to say so
        return 0
    a, b = (x if isinstance(x, list) else list(x) for x in (a, b))
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def in_sequence_order(rows: Iterable[R], seq: Callable[[R], int]) -> list[R]:
    """``rows`` for one ``llama_batch``, in increasing sequence ids (a sequence's own rows keep their order).

    With a KV stream per sequence, llama.cpp splits a batch into micro-batches of
    *consecutive* ids (``split_equal``, sequential), each a graph evaluation of its own. Ids
    come from low-first free lists, so sorted rows are one run, where the order sessions
    joined a round made up to one micro-batch a session: measured on the demo verifier (Q8_0,
    two threads, 16 sessions, plain decoding) 1,570-1,590 -> 3,230-3,350 tokens/s. The
    verifier, the draft and the SmolLM2 teacher's runner all build their batches through here.
    """
    return sorted(rows, key=seq)


# What a micro-batch costs llama.cpp beyond its positions, in positions' cost: measured on the demo verifier
# (Q8_0, two threads, 2026-12-02) a pass cost about 0.6 ms, each sequence it reads 0.22 ms (its KV stream's
# attention) and each position 0.28 ms; the draft's ratios are alike.
PASS_COST = 2.0
STREAM_COST = 0.8


def micro_batches(rows: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(sequences, positions) of each micro-batch llama.cpp evaluates ``rows`` of (sequence id, positions) in.

    With a KV stream per sequence llama.cpp splits a batch ``split_equal`` and sequential: from
    the lowest sequence with positions left, the run of consecutive ids after it, each taking
    as many positions as the run's shortest has left. So sequences 0-15 of one position each
    are one pass, and one row shorter than the others, or a free id between two sessions,
    makes two: measured on the demo verifier at 16 sessions of 3 positions, 16.3 ms in one
    pass against 20.3 ms with one row of 2.
    """
    left = {seq: n for seq, n in rows if n > 0}
    passes = []
    while left:
        order = sorted(left)
        run = [order[0]]
        for seq in order[1:]:
            if seq != run[-1] + 1:
                break
            run.append(seq)
        take = min(left[seq] for seq in run)
        passes.append((len(run), take * len(run)))
        for seq in run:
            left[seq] -= take
            if not left[seq]:
                del left[seq]
    return passes


def _passes_cost(passes: list[tuple[int, int]]) -> float:
    return sum(PASS_COST + STREAM_COST * streams + positions for streams, positions in passes)


def padded_width(rows: Sequence[tuple[int, int]]) -> int:
    """The length to pad every row of (sequence id, positions) to, or 0 to evaluate them as they are.

    Padding a shorter row with positions nobody reads (rolled back after the decode) keeps a
    batch in one micro-batch where its rows' lengths differ; it pays where the positions it
    adds cost less than the passes it saves (``micro_batches``): one short row among 16, not
    one long row among 16 short ones.
    """
    width = max((n for _, n in rows), default=0)
    if all(n == width for _, n in rows):
        return 0
    padded = _passes_cost(micro_batches((seq, width) for seq, _ in rows))
    return width if padded < _passes_cost(micro_batches(rows)) else 0
