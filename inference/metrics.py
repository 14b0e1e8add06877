"""Prometheus metrics at ``/metrics``: what the gateway settled and refused, and its live state.

Two kinds of figures, both through ``prometheus-client``:

- **Events**, counted as they happen: each settled request (``observe_settled``, called
  once from ``inference.settlement.charge``) moves the request counters, the token and
  draft counters and the TTFT, inter-token, end-to-end and queue-wait histograms; each
  error an adapter answers (``count_error``, from the OpenAI API's and the websocket's
  error mapping) moves the error counter by its code. Neither ever raises: a metric that
  fails is logged, and the request it describes goes on.
- **State**, read when Prometheus scrapes (:class:`LiveStateCollector`): running and
  waiting requests per engine pool from ``inference.queueing.scheduler``, streams per
  tier and every circuit breaker's state from the engine registry. Nothing is updated per request for
  these, and a scrape never loads the engines: before they are loaded there is no state.

vLLM's names are used where vLLM has the same figure (``vllm:time_to_first_token_seconds``,
``vllm:num_requests_running``, ... with its ``model_name`` label), so dashboards made for
vLLM work; ``tandem_*`` names for the rest. No label ever carries a tenant, a user or a
key: label values are bounded (models, tiers, outcomes, error codes), and who spent what
is the ledger's job, not the metrics'.

One registry per process: each web process (``config.serve``) answers ``/metrics`` with
its own figures, and a scraper scrapes each process (one target per process). The Celery
worker's batch requests are counted in the worker's registry, which no endpoint serves.
prometheus-client's multiprocess mode was not used: it needs a shared directory set
before import and cleaned between runs, and it cannot serve the scrape-time collectors
of other processes' state.

Access: operators only, a staff session or ``Authorization: Bearer <TANDEM_METRICS_TOKEN>``
(compared in constant time; an empty setting turns token access off). Anyone else gets
403, with one body whatever check failed.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inference import engines as engine_registry
from inference.breakers import BreakerState
from inference.queueing import Scheduler, scheduler
from tenants.tiers import Tier

if TYPE_CHECKING:
    from inference.completion import UsageSummary
    from inference.engines import EngineSet
    from inference.errors import GatewayError

log = logging.getLogger(__name__)

# Seconds, from a cached answer's few milliseconds to a long generation's minute.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
# vLLM's finished_reason for a request that ended before it finished (the client left).
ABORTED = "abort"
GENERATED = "generation"  # the source of an answer an engine generated (not replayed from a cache)
CACHE_SOURCES = {"exact_cache": "exact", "semantic_cache": "semantic"}


class Metrics:
    """This process's registry: event metrics fed by the gateway, state collected at scrape time."""

    def __init__(
        self,
        *,
        pools: Scheduler = scheduler,
        loaded_engines: Callable[[], EngineSet | None] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r = self.registry
        per_request = ["model_name", "tier", "source"]
        self.requests = Counter(
            "tandem_requests",
            "Settled requests (delivered something, or completed), by the tier that ended them, outcome and source.",
            ["model_name", "tier", "outcome", "source"],
            registry=r,
        )
        self.success = Counter(
            "vllm:request_success",
            "Requests that finished, by finish reason (stop, length; abort: the client left).",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.failovers = Counter(
            "tandem_request_failovers",
            "Settled requests that another tier took over (a failover or an escalation), by the tier that ended them.",
            ["model_name", "tier"],
            registry=r,
        )
        self.cache_hits = Counter(
            "tandem_cache_hits",
            "Requests answered from a cache (kind: exact or semantic).",
            ["model_name", "kind"],
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from the request's start (admission included) to its first token.",
            per_request,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "vllm:inter_token_latency_seconds",
            "Mean time between a request's tokens after the first (one observation per request).",
            per_request,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from the request's start to its settlement.",
            per_request,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited in the fair queue for an engine slot (0: it started at once).",
            ["model_name", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of settled requests.", ["model_name", "source"], registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Completion tokens delivered (source: generated, or replayed from a cache).",
            ["model_name", "source"],
            registry=r,
        )
        self.draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens",
            "Tokens the draft proposed to the verifier (generated answers; fractional where a round's "
            "rejected drafts are shared among its tokens).",
            ["model_name"],
            registry=r,
        )
        self.accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens",
            "Draft tokens the verifier accepted (acceptance rate: rate(accepted) / rate(draft)).",
            ["model_name"],
            registry=r,
        )
        self.errors = Counter(
            "tandem_request_errors",
            "Errors answered to clients by code and HTTP status: refusals (402 budget_exceeded, 429, "
            "503 overloaded / queue_full / queue_timeout, ...) and failures mid-stream (502 engine_error).",
            ["code", "status"],
            registry=r,
        )
        r.register(LiveStateCollector(pools=pools, loaded_engines=loaded_engines or _loaded_engines))

    def observe_settled(self, slo: Mapping[str, Any], summary: UsageSummary) -> None:
        """One settled request: ``slo`` is its SLO sample (``inference.settlement``), ``summary`` its usage."""
        model, tier, source, outcome = slo["model"], slo["route_tier"], slo.get("source", GENERATED), slo["outcome"]
        series = self._series
        series(self.requests, model, tier, outcome, source).inc()
        if outcome == "completed" and summary.finish_reason:
            series(self.success, model, summary.finish_reason).inc()
        elif outcome == "cancelled":
            series(self.success, model, ABORTED).inc()
        if slo.get("fallback"):
            series(self.failovers, model, tier).inc()
        if source in CACHE_SOURCES:
            series(self.cache_hits, model, CACHE_SOURCES[source]).inc()
        for histogram, value_ms in ((self.ttft, slo["ttft_ms"]), (self.inter_token, slo["inter_token_ms"])):
            if value_ms is not None:
                series(histogram, model, tier, source).observe(value_ms / 1e3)
        series(self.e2e, model, tier, source).observe(slo["e2e_ms"] / 1e3)
        if source == GENERATED:  # a replay waits for no slot, and its drafts were counted when it was generated
            series(self.queue_time, model, tier).observe(slo.get("queued_ms", 0.0) / 1e3)
            series(self.draft_tokens, model).inc(float(summary.drafted_tokens))
            series(self.accepted_tokens, model).inc(summary.accepted_tokens)
        series(self.prompt_tokens, model, source).inc(summary.prompt_tokens)
        series(self.generation_tokens, model, source).inc(summary.completion_tokens)

    def count_error(self, error: GatewayError) -> None:
        self._series(self.errors, error.code or "", str(error.status)).inc()

    def _series(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: ``labels()`` validates and locks on every call (~6 us each, a
        dozen per request), a dict lookup does not. Bounded: label values are models, tiers, outcomes, codes."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


class LiveStateCollector(Collector):
    """Queue depth per engine pool and breaker states, read from their owners at each scrape."""

    def __init__(self, *, pools: Scheduler, loaded_engines: Callable[[], EngineSet | None]) -> None:
        self._pools = pools
        self._loaded_engines = loaded_engines

    def collect(self) -> Iterator[Metric]:
        engines = self._loaded_engines()
        yield from self._pools_now()
        yield self._tiers_now(engines)
        yield self._breakers_now(engines)

    def _pools_now(self) -> Iterator[Metric]:
        labels = ["model_name", "pool"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests holding a slot of the pool now.", labels=labels
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting in the pool's fair queue now.", labels=labels
        )
        slots = GaugeMetricFamily("tandem_pool_slots", "Slots of the pool (streams it runs at once).", labels=labels)
        for name, pool in sorted(self._pools.pools().items()):
            # ModelEntry.pool names them "<model>/local" (edge + speculative) and "<model>/cloud"
            model, _, kind = name.rpartition("/")
            values = [model or name, kind]
            running.add_metric(values, pool.running)
            waiting.add_metric(values, pool.waiting())
            slots.add_metric(values, pool.capacity)
        yield from (running, waiting, slots)

    def _tiers_now(self, engines: EngineSet | None) -> Metric:
        family = GaugeMetricFamily(
            "tandem_streams_running",
            "Streams running on each tier now (the local pool's slots split into edge and speculative).",
            labels=["model_name", "tier"],
        )
        for entry in engines.models.values() if engines is not None else ():
            for tier in entry.engines:
                family.add_metric([entry.name, tier.value], entry.in_flight(tier))
        return family

    def _breakers_now(self, engines: EngineSet | None) -> Metric:
        family = GaugeMetricFamily(
            "tandem_circuit_breaker_state",
            "1 for the state each breaker is in now, 0 for the others (closed, open, half_open).",
            labels=["model_name", "tier", "breaker", "state"],
        )
        if engines is None:
            return family
        states: list[tuple[str, str, dict]] = [
            (entry.name, tier.value, breaker.snapshot())
            for entry in engines.models.values()
            for tier, breaker in entry.breakers.items()
        ]
        if engines.upstreams is not None:  # the cloud tier keeps a breaker per upstream (inference.cloud)
            states += [(u["model"], Tier.CLOUD.value, u["breaker"]) for u in engines.upstreams.snapshot()]
        for model, tier, snapshot in states:
            for state in BreakerState:
                family.add_metric([model, tier, snapshot["name"], state.value], float(state.value == snapshot["state"]))
        return family


def _loaded_engines() -> EngineSet | None:
    # The engine set if this process has loaded it; a scrape must never be the thing that loads weights.
    return engine_registry._engines


_metrics: Metrics | None = None
_metrics_lock = threading.Lock()


def get_metrics() -> Metrics:
    """This process's metrics, made on first use (not at import: tests swap in their own with ``set_metrics``)."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


def set_metrics(metrics: Metrics | None) -> Metrics | None:
    """Swap this process's metrics (tests); return the previous ones."""
    global _metrics
    with _metrics_lock:
        previous, _metrics = _metrics, metrics
    return previous


def observe_settled(slo: Mapping[str, Any], summary: UsageSummary) -> None:
    """``Metrics.observe_settled`` on this process's metrics; never raises into the settlement."""
    try:
        get_metrics().observe_settled(slo, summary)
    except Exception:  # noqa: BLE001 - a metric must never fail the request it counts; said loudly instead
        log.exception("request %s: recording its metrics failed", slo.get("request_id"))


def count_error(error: GatewayError) -> None:
    """``Metrics.count_error`` on this process's metrics; never raises into the adapter answering the error."""
    try:
        get_metrics().count_error(error)
    except Exception:  # noqa: BLE001 - the client still gets its error answer
        log.exception("counting an error answer (%s) failed", getattr(error, "code", None))


# the endpoint --------------------------------------------------------------------------------
def scrape_allowed(request: HttpRequest) -> bool:
    """A staff (operator) session, or the scrape token (compared in constant time; empty: no token access)."""
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return True
    token = settings.TANDEM_METRICS_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not token or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


@never_cache
@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: this process's metrics in Prometheus's text format, for operators and the scraper."""
    if not scrape_allowed(request):
        return HttpResponse("metrics are for operators\n", status=403, content_type="text/plain; charset=utf-8")
    return HttpResponse(get_metrics().exposition(), content_type=CONTENT_TYPE_LATEST)
