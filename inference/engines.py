"""The models this process serves, each with its engines per tier, loaded once.

``get_engines()`` builds the set named by ``settings.TANDEM_ENGINES`` on first use
(loading weights takes seconds, so never at import time) and keeps it for the process.
Each :class:`ModelEntry` is one public model id (what ``GET /v1/models`` lists and a
request's ``model`` names) with a speculative engine (draft + verifier) and an edge
engine (the draft alone), plus the versions the ledger records.

Two sets ship: the demo pair (the default) and a trivial, deterministic engine for the
platform's own tests and overhead benchmark, which needs no model and no thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from inference.breakers import CircuitBreaker
from inference.cloud import CloudEngine, CloudRequest, UpstreamDirectory
from inference.errors import ContextTooLong, InvalidRequest, ModelNotFound
from speculative.completion import CompletionRequest, TokenStream, build_request
from speculative.errors import ContextOverflowError, InvalidRequestError
from speculative.types import SamplingParams, TokenEvent
from tenants.tiers import Tier

log = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 2048  # longer prompts are tokenised on a thread, off the event loop
DEFAULT_LOCAL_SLOTS = 64  # an engine that does not say how many streams it runs at once


class LocalEngine(Protocol):
    """What the gateway needs of an engine that runs here (SpeculativeEngine, EdgeEngine, TrivialEngine)."""

    def request(self, prompt: str | Sequence[int], **kwargs) -> CompletionRequest: ...

    def stream(self, prompt: str | Sequence[int], **kwargs) -> TokenStream: ...


# A local engine runs on a stream thread; the cloud engine is async and runs on the event loop.
Engine = LocalEngine | CloudEngine


@dataclass(frozen=True)
class DraftEngines:
    """Another draft version of a model, loaded beside the one its entry started with."""

    version: str
    speculative: LocalEngine
    edge: LocalEngine | None


@dataclass
class ModelEntry:
    """One public model id and its engine on each tier it is served on, with a breaker per remote tier.

    The speculative engine's breaker watches its verifier; the cloud engine's, its
    upstream. The edge runs in this process and has none.
    """

    name: str
    speculative: LocalEngine | None
    edge: LocalEngine | None
    verifier_version: str
    draft_version: str
    context_length: int
    tokenizer: object
    description: str = ""
    cloud: CloudEngine | None = None
    local_slots: int = DEFAULT_LOCAL_SLOTS  # streams its edge and speculative tiers run at once (they share the draft)
    created: int = field(default_factory=lambda: int(time.time()))
    breakers: dict[Tier, CircuitBreaker] = field(default_factory=dict)
    # other draft versions loaded beside this one (registry: rollouts' candidates, tenants' pins)
    drafts: dict[str, DraftEngines] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The cloud engine keeps a breaker per upstream itself (inference.cloud).
        self.breakers.setdefault(Tier.SPECULATIVE, CircuitBreaker(f"{self.name}/verifier"))
        self._in_flight = dict.fromkeys(Tier, 0)  # streams running on each tier (changed on the event loop)
        self._variants: dict[str, ModelEntry] = {}

    def add_draft(self, version: str, speculative: LocalEngine, edge: LocalEngine | None) -> None:
        """Serve draft ``version`` too (its engines share this entry's verifier); ``with_draft`` picks it."""
        self.drafts[version] = DraftEngines(version, speculative, edge)
        self._variants.pop(version, None)

    def with_draft(self, version: str) -> ModelEntry:
        """This model served by draft ``version``: the same entry (slots, breakers, in-flight counts, cloud
        engine) with that draft's engines and version, so the ledger records the draft that served."""
        if version == self.draft_version:
            return self
        variant = self._variants.get(version)
        if variant is None:
            loaded = self.drafts[version]
            variant = dataclasses.replace(
                self, speculative=loaded.speculative, edge=loaded.edge, draft_version=version, drafts={}
            )
            variant._in_flight = self._in_flight  # one count per model and tier, whichever draft serves
            self._variants[version] = variant
        return variant

    def in_flight(self, tier: Tier) -> int:
        """Streams of this model running on ``tier`` in this process: its queue depth, for routing."""
        return self._in_flight[tier]

    def enter(self, tier: Tier) -> None:
        self._in_flight[tier] += 1

    def leave(self, tier: Tier) -> None:
        self._in_flight[tier] -= 1

    def pool(self, tier: Tier) -> tuple[str, int]:
        """The name and size of the pool of slots a stream on ``tier`` takes (inference.queueing)."""
        if tier is Tier.CLOUD:
            return f"{self.name}/cloud", settings.TANDEM_CLOUD_MAX_STREAMS
        return f"{self.name}/local", self.local_slots

    def engine(self, tier: Tier) -> Engine | None:
        return {Tier.SPECULATIVE: self.speculative, Tier.EDGE: self.edge, Tier.CLOUD: self.cloud}[tier]

    @property
    def engines(self) -> dict[Tier, Engine]:
        return {tier: engine for tier in Tier if (engine := self.engine(tier)) is not None}

    def serves(self, tier: Tier, tenant_id: int | None = None) -> bool:
        """Served on ``tier`` (for this tenant: a cloud upstream names the tenants that may use it)."""
        engine = self.engine(tier)
        if engine is None:
            return False
        allows = getattr(engine, "allows", None)
        return allows is None or allows(tenant_id)

    def available(self, tier: Tier, tenant_id: int | None = None) -> bool:
        """Served here for this tenant, and its breaker (or one of its upstreams') lets a request through now."""
        if not self.serves(tier, tenant_id):
            return False
        engine_available = getattr(self.engine(tier), "available", None)
        if engine_available is not None:
            return engine_available(tenant_id)
        breaker = self.breakers.get(tier)
        return breaker is None or breaker.available()

    def breaker(self, tier: Tier) -> CircuitBreaker | None:
        return self.breakers.get(tier)


def request_for(
    entry: ModelEntry, tier: Tier, call, tenant_id: int | None = None
) -> tuple[Engine, CompletionRequest | CloudRequest]:
    """``entry``'s engine on ``tier`` and the call as that engine's request (the prompt tokenised, limits checked)."""
    engine = entry.engine(tier)
    assert engine is not None, f"{entry.name} is not served on {tier}"
    seed = call.seed if call.seed is not None else secrets.randbits(31)
    try:
        sampling = SamplingParams(call.temperature, call.top_k, call.top_p, seed)
        if isinstance(engine, CloudEngine):
            # a cloud upstream renders chats itself, continues a partial answer its own way,
            # and serves only the tenants it names
            request: CompletionRequest | CloudRequest = engine.request(
                call.prompt,
                max_tokens=call.max_tokens,
                sampling=sampling,
                stop=call.stop,
                messages=call.messages,
                tenant_id=tenant_id,
                continuation=call.continue_from,
                stream=call.stream,
                logprobs=call.logprobs,
            )
        else:
            prompt = call.prompt + call.continue_from
            request = engine.request(
                prompt, max_tokens=call.max_tokens, sampling=sampling, stop=call.stop, logprobs=call.logprobs
            )
    except ContextOverflowError as exc:
        raise ContextTooLong(str(exc), param="max_tokens") from None
    except InvalidRequestError as exc:
        raise InvalidRequest(str(exc)) from None
    return engine, request


async def arequest_for(
    entry: ModelEntry, tier: Tier, call, tenant_id: int | None = None
) -> tuple[Engine, CompletionRequest | CloudRequest]:
    """``request_for`` from the event loop: a short prompt tokenises in microseconds, a long one on a thread."""
    if len(call.prompt) <= INLINE_TOKENIZE_CHARS:
        return request_for(entry, tier, call, tenant_id)
    return await asyncio.to_thread(request_for, entry, tier, call, tenant_id)


class EngineSet:
    """The models this process serves; with ``cloud``, each also on the cloud tier through the registered upstreams."""

    def __init__(
        self, entries: Sequence[ModelEntry], closers: Sequence[Callable[[], None]] = (), *, cloud: bool = False
    ):
        self.models = {e.name: e for e in entries}
        self._closers = list(closers)
        self.upstreams: UpstreamDirectory | None = None
        if cloud:
            self.upstreams = UpstreamDirectory(ttl_s=settings.TANDEM_UPSTREAMS_TTL_S)
            for entry in entries:
                if entry.cloud is None:
                    entry.cloud = CloudEngine(entry.name, entry.tokenizer, self.upstreams)

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"the model {name!r} does not exist (served here: {known})", param="model") from None

    def close(self) -> None:
        for close in self._closers:
            close()


_engines: EngineSet | None = None
_engines_lock = threading.Lock()


def get_engines() -> EngineSet:
    """The process's engine set, built from ``settings.TANDEM_ENGINES`` on first use."""
    global _engines
    if _engines is None:
        with _engines_lock:
            if _engines is None:
                _engines = import_string(settings.TANDEM_ENGINES)()
    return _engines


async def aget_engines() -> EngineSet:
    """``get_engines`` for the event loop: a first load (seconds) runs on a thread, never on the loop."""
    if _engines is not None:
        return _engines
    return await asyncio.to_thread(get_engines)


def loaded_engines() -> EngineSet | None:
    """The process's engine set if it is loaded already (never loads it: a worker serves nothing)."""
    return _engines


def warm_engines_in_background() -> None:
    """Start loading the engines (and the router's checks) now, so the first request does not wait for them."""

    def load() -> None:
        try:
            get_engines()
        except Exception:  # noqa: BLE001 - the first request reports it again, to its client
            log.exception("loading the engines failed")
        try:
            from inference.signals import warm_up

            warm_up()  # the router's checks: the PII detector and the difficulty classifier
        except Exception:  # noqa: BLE001 - the first request that needs them reports it again
            log.exception("loading the router's checks failed")
        freeze_what_loaded()

    threading.Thread(target=load, name="engines-warmup", daemon=True).start()


def freeze_what_loaded() -> None:
    """Move the objects the engines and checks made out of the cyclic collector's reach, as ``config.asgi`` does.

    The engines load after the server has frozen its imports, and what they make (the
    tokenizers, transformers' and torch's modules, the models) lives as long as the process
    but was left to the collector: on the demo pair about 300,000 objects, which a full
    collection scans. Measured with the platform's default engines loaded (``python -m
    config.serve``'s settings, 2026-12-03): a full collection took 246-291 ms, in which no
    thread runs Python (the scheduler's thread waits for it between two decodes, every stream
    stalls); frozen, under 1 ms. CPython runs one whenever the objects promoted since the last
    reach a quarter of the old ones (here some 75,000 of a busy server's). Objects reached only
    by reference counts are freed as ever; an engine loaded later (a rollout) is left to the
    collector.
    """
    gc.collect()
    gc.freeze()


class DraftChooser(Protocol):
    """Which draft version serves a new session (the registry's: current, canary candidate or tenant pin)."""

    def stale(self) -> bool: ...

    def refresh(self) -> None: ...  # ORM work: reads the plan, loads drafts it names

    def choose(self, entry: ModelEntry, tenant_id: int | None) -> str | None: ...


_draft_chooser: DraftChooser | None = None


def set_draft_chooser(chooser: DraftChooser | None) -> DraftChooser | None:
    """Install the chooser ``serving_entry`` asks (the registry app does, once); return the previous one."""
    global _draft_chooser
    previous, _draft_chooser = _draft_chooser, chooser
    return previous


def draft_chooser() -> DraftChooser | None:
    return _draft_chooser


def serving_entry(entry: ModelEntry, tenant_id: int | None) -> ModelEntry:
    """The entry a new session of ``tenant_id`` is served by: ``entry`` with the draft the chooser picks,
    where that draft is loaded here (otherwise ``entry`` as it is). A session keeps the entry, and so
    the engines, it started with: a promotion or a rollback never moves a stream in flight."""
    chooser = _draft_chooser
    version = chooser.choose(entry, tenant_id) if chooser is not None else None
    if version is None or (version != entry.draft_version and version not in entry.drafts):
        return entry
    return entry.with_draft(version)


def set_engines(engines: EngineSet | None) -> EngineSet | None:
    """Swap the process's engine set (tests, benchmarks); return the previous one."""
    global _engines
    with _engines_lock:
        previous, _engines = _engines, engines
    return previous


def file_version(path: str | Path) -> str:
    """``name@sha256[:12]`` of a weights file or folder: what the ledger records as a model version."""
    path = Path(path)
    if not path.exists():
        return str(path)  # a hub id: its name is the best version there is
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return f"{path.name}@{digest.hexdigest()[:12]}"


def pair_paths(pair: str) -> tuple[str, str]:
    """(verifier, draft) paths of ``pair`` (``TANDEM_PAIR``), unless TANDEM_VERIFIER / TANDEM_DRAFT name others."""
    from speculative.pair import PAIRS, named_pair

    if pair not in PAIRS:
        raise ImproperlyConfigured(f"TANDEM_PAIR must be one of {', '.join(PAIRS)}, not {pair!r}")
    verifier, draft = named_pair(pair, settings.VAR_DIR / "models")  # the backend follows the verifier's file
    return settings.TANDEM_VERIFIER or str(verifier), settings.TANDEM_DRAFT or str(draft)


def load_default_engines() -> EngineSet:
    """The pair ``TANDEM_PAIR`` names (or TANDEM_VERIFIER / TANDEM_DRAFT / TANDEM_VERIFIER_URLS) as model ``tandem-demo``."""
    from speculative.edge import EdgeEngine
    from speculative.engine import SpeculativeEngine
    from speculative.pair import EDGE_PAIRS, PAIRS, load_pair

    verifier_path, draft_path = pair_paths(settings.TANDEM_PAIR)
    verifier, draft, tokenizer = load_pair(
        verifier_path,
        draft_path,
        verifier_threads=settings.TANDEM_VERIFIER_THREADS or None,
        max_context=settings.TANDEM_MAX_CONTEXT or None,
        prompt_stash_bytes=max(0, settings.TANDEM_PROMPT_STASH_MB) * 1024 * 1024,
    )
    if settings.TANDEM_VERIFIER_URLS:
        from speculative.remote import RemoteVerifier
        from speculative.verifier_pool import VerifierPool

        # several verifier servers: each session on the least loaded that is up (speculative.verifier_pool)
        remotes = [RemoteVerifier(url) for url in settings.TANDEM_VERIFIER_URLS]
        verifier = remotes[0] if len(remotes) == 1 else VerifierPool(remotes)
    speculative = SpeculativeEngine(verifier, tokenizer, draft)
    # the draft alone as the edge tier, where it answers on its own (its routine requests go to the verifier else)
    edge = EdgeEngine(draft, tokenizer, tokenizer.eos_token_id) if settings.TANDEM_PAIR in EDGE_PAIRS else None
    entry = ModelEntry(
        name="tandem-demo",
        speculative=speculative,
        edge=edge,
        verifier_version=file_version(verifier_path),
        draft_version=file_version(draft_path),
        context_length=speculative.context_length
        if edge is None
        else min(speculative.context_length, edge.context_length),
        tokenizer=tokenizer,
        local_slots=getattr(draft, "max_sessions", DEFAULT_LOCAL_SLOTS),
        description=PAIRS[settings.TANDEM_PAIR],
    )
    return EngineSet([entry], closers=[speculative.close], cloud=settings.TANDEM_CLOUD)


# the trivial engine: deterministic text, no model --------------------------------------
class CharTokenizer:
    """One token per character (code point), id 0 reserved as EOS."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i)


TRIVIAL_TEXT = "Tandem drafts at the edge and verifies in batches. "
TRIVIAL_ROUND = 3  # tokens per round: two drafted, one from the "verifier"
TRIVIAL_GPU_MS = 0.75  # per round
TRIVIAL_DRAFTED_LOGPROB = -0.1  # made up: each drafted (accepted) token's log-probability
TRIVIAL_VERIFIER_LOGPROB = -0.5  # made up: the "verifier" token's
TRIVIAL_ALTERNATIVE_GAP = 3.0  # alternative j (1-based) sits at the chosen token's logprob - gap - j + 1


def trivial_logprobs(tokens: Sequence[int], n_drafted: int, top_n: int) -> tuple:
    """Made-up but well-formed logprobs for a round: the chosen token ranks first, then
    ``top_n - 1`` other ids (the next code points) in decreasing order, the probabilities
    summing below 1. Deterministic, so platform tests can check the plumbing exactly."""
    from speculative.types import TokenLogprob  # kept in this section: the imports above are others' work

    entries = []
    for i, token in enumerate(tokens):
        chosen = TRIVIAL_DRAFTED_LOGPROB if i < n_drafted else TRIVIAL_VERIFIER_LOGPROB
        others = tuple((token + j, chosen - TRIVIAL_ALTERNATIVE_GAP - (j - 1)) for j in range(1, top_n))
        entries.append(TokenLogprob(chosen, ((token, chosen), *others) if top_n else ()))
    return tuple(entries)


class TrivialCompletion(TokenStream):
    """Emits TRIVIAL_TEXT over and over in rounds of three, with made-up but consistent costs."""

    def __init__(self, engine: TrivialEngine, request: CompletionRequest):
        self._engine = engine
        super().__init__(engine.tokenizer, CharTokenizer.eos_token_id, request)

    def _run(self) -> Generator[TokenEvent, None, None]:
        text = self._engine.text
        for start in range(0, 1 << 30, TRIVIAL_ROUND):
            tokens = tuple(ord(text[(start + i) % len(text)]) for i in range(TRIVIAL_ROUND))
            if self._engine.fail_after is not None and start >= self._engine.fail_after:
                if self._engine.fail_as is not None:
                    raise self._engine.fail_as
                raise RuntimeError("the trivial engine failed on purpose")
            self.stats.rounds += 1
            self.stats.proposed += TRIVIAL_ROUND - 1
            self.stats.accepted += TRIVIAL_ROUND - 1
            self.stats.gpu_ms += TRIVIAL_GPU_MS
            if self._engine.round_s and start:
                time.sleep(self._engine.round_s)  # a paced engine: each round after the first takes this long
            logprobs = self.request.logprobs
            yield from self._emit(
                tokens,
                TRIVIAL_ROUND - 1,
                TRIVIAL_GPU_MS,
                TRIVIAL_ROUND - 1,
                logprobs=None if logprobs is None else trivial_logprobs(tokens, TRIVIAL_ROUND - 1, logprobs),
            )
            if self.stats.finish_reason is not None:
                return


class TrivialEngine:
    def __init__(
        self,
        *,
        text: str = TRIVIAL_TEXT,
        fail_after: int | None = None,
        fail_as: BaseException | None = None,
        context_length: int = 4096,
        round_s: float = 0.0,
    ):
        self.tokenizer = CharTokenizer()
        self.round_s = round_s  # seconds each round after the first takes (0: tokens as fast as they are read)
        self.text = text
        self.fail_after = fail_after  # raise once this many tokens were produced (error-path tests)
        self.fail_as = fail_as  # what to raise then (default: a RuntimeError)
        self.context_length = context_length

    def request(self, prompt: str | Sequence[int], **kwargs) -> CompletionRequest:
        return build_request(self.tokenizer, self.context_length, prompt, **kwargs)

    def stream(self, prompt: str | Sequence[int], **kwargs) -> TrivialCompletion:
        return TrivialCompletion(self, self.request(prompt, **kwargs))


def trivial_entry(name: str = "tandem-test", **kwargs) -> ModelEntry:
    engine = TrivialEngine(**kwargs)
    edge = TrivialEngine(**kwargs)
    return ModelEntry(
        name=name,
        speculative=engine,
        edge=edge,
        verifier_version="trivial@0",
        draft_version="trivial@0",
        context_length=engine.context_length,
        tokenizer=engine.tokenizer,
        description="a deterministic engine without a model (tests, overhead benchmark)",
    )


def load_test_engines() -> EngineSet:
    """``tandem-test`` (always works) and ``tandem-test-broken`` (fails after 6 tokens)."""
    return EngineSet([trivial_entry(), trivial_entry("tandem-test-broken", fail_after=6)], cloud=settings.TANDEM_CLOUD)
