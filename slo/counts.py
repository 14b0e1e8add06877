"""What a set of SLO samples counts for: request, failure and fallback counts and fixed-edge latency histograms.

One ``Counts`` holds what the SLO pages and alert rules need of any number of samples, and
adds up: a rollup row stores one, raw samples fold into one, and a window is the sum of its
rows. Latency histograms are cumulative over fixed bucket edges (``count[i]`` = samples
``<= EDGES[metric][i]`` ms), so "good" for a threshold on an edge is exact; thresholds can
only be edges (the objective form offers exactly these), and percentiles read from a
histogram are the smallest edge at or above them (an upper bound, never interpolated).

What each histogram counts: ``ttft`` the samples that got a first token, ``itl`` those with
an inter-token latency (two tokens or more), ``e2e`` the completed ones, ``queued`` all.
A failure is a sample with outcome ``error`` (a server-side failure: its tier(s) failed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# The edges are part of every stored rollup: changing them needs a rebuild (``manage.py slo_rollup --rebuild``).
TTFT_EDGES_MS = (100, 200, 300, 500, 800, 1000, 1500, 2000, 3000, 5000, 10000)
ITL_EDGES_MS = (10, 20, 30, 50, 75, 100, 150, 200, 300, 500)
E2E_EDGES_MS = (500, 1000, 2000, 3000, 5000, 10000, 20000, 30000, 60000, 120000)
QUEUED_EDGES_MS = (0, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
EDGES: dict[str, tuple[int, ...]] = {
    "ttft": TTFT_EDGES_MS,
    "itl": ITL_EDGES_MS,
    "e2e": E2E_EDGES_MS,
    "queued": QUEUED_EDGES_MS,
}
FAILURE_OUTCOME = "error"
COMPLETED_OUTCOME = "completed"
CACHE_SOURCES = ("exact_cache", "semantic_cache")

# The sample fields ``add_sample`` reads, in order (``values_list`` of the raw samples).
SAMPLE_FIELDS = ("outcome", "fallback", "source", "ttft_ms", "inter_token_ms", "e2e_ms", "queued_ms")


def _zeros() -> dict[str, list[int]]:
    return {metric: [0] * len(edges) for metric, edges in EDGES.items()}


@dataclass
class Counts:
    requests: int = 0
    failures: int = 0
    fallbacks: int = 0
    fallback_successes: int = 0
    exact_cache: int = 0
    semantic_cache: int = 0
    queued_ms: int = 0  # time spent waiting for a slot, summed (ms): over a window's length, its mean queue depth
    # how many samples each histogram counts (its total; the histogram's own counts are <= edge)
    n: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EDGES, 0))
    hist: dict[str, list[int]] = field(default_factory=_zeros)

    def add_sample(
        self,
        outcome: str,
        fallback: bool,
        source: str,
        ttft_ms: float | None,
        inter_token_ms: float | None,
        e2e_ms: float,
        queued_ms: float,
    ) -> None:
        self.requests += 1
        self.failures += outcome == FAILURE_OUTCOME
        if fallback:
            self.fallbacks += 1
            self.fallback_successes += outcome == COMPLETED_OUTCOME
        self.exact_cache += source == "exact_cache"
        self.semantic_cache += source == "semantic_cache"
        self.queued_ms += round(queued_ms or 0.0)
        self._observe("ttft", ttft_ms)
        self._observe("itl", inter_token_ms)
        self._observe("e2e", e2e_ms if outcome == COMPLETED_OUTCOME else None)
        self._observe("queued", queued_ms or 0.0)

    def _observe(self, metric: str, value: float | None) -> None:
        if value is None:
            return
        self.n[metric] += 1
        counts = self.hist[metric]
        for i, edge in enumerate(EDGES[metric]):
            if value <= edge:
                counts[i] += 1

    def merge(self, other: Counts) -> Counts:
        self.requests += other.requests
        self.failures += other.failures
        self.fallbacks += other.fallbacks
        self.fallback_successes += other.fallback_successes
        self.exact_cache += other.exact_cache
        self.semantic_cache += other.semantic_cache
        self.queued_ms += other.queued_ms
        for metric in EDGES:
            self.n[metric] += other.n[metric]
            mine, theirs = self.hist[metric], other.hist[metric]
            for i, value in enumerate(theirs):
                mine[i] += value
        return self

    def mean_waiting(self, window_ms: float) -> float:
        """How many requests waited for a slot at once, on average over a window (Little's law: total wait / length).

        Counted by when requests ended, so a wait that straddles the window's start counts whole in it.
        """
        return self.queued_ms / window_ms

    @property
    def waited(self) -> int:
        """Requests that waited in the fair queue at all (queued_ms > 0)."""
        return self.n["queued"] - self.hist["queued"][0]

    def good(self, metric: str, threshold_ms: int) -> tuple[int, int]:
        """(samples <= threshold, samples counted) of a latency metric; the threshold must be one of its edges."""
        index = EDGES[metric].index(threshold_ms)  # ValueError: not an edge (objectives only offer edges)
        return self.hist[metric][index], self.n[metric]

    def percentile(self, metric: str, q: float) -> float | None:
        """The smallest edge with at least ``q`` of the samples at or under it; None without samples.

        Past the last edge: ``inf`` (the histogram cannot say how far past).
        """
        total = self.n[metric]
        if not total:
            return None
        for edge, count in zip(EDGES[metric], self.hist[metric], strict=True):
            if count >= q * total:
                return float(edge)
        return float("inf")

    # storage: one integer column each ------------------------------------------------------
    def as_columns(self) -> dict[str, int]:
        """The rollup row's columns (``COLUMNS``)."""
        return dict(zip(COLUMNS, _vector(self), strict=True))

    @classmethod
    def from_columns(cls, values: Iterable[int | None]) -> Counts:
        """From the values of ``COLUMNS`` in order (a row, or SUMs of rows: None for a sum of none)."""
        return _from_vector([int(v or 0) for v in values])


SCALARS = ("requests", "failures", "fallbacks", "fallback_successes", "exact_cache", "semantic_cache", "queued_ms")
# A rollup row's columns: the scalars, each histogram's n, then each histogram's count <= each edge.
# Columns (not JSON) so that the database adds rollups up: a 28-day window is one SUM query.
COLUMNS: tuple[str, ...] = (
    *SCALARS,
    *(f"{metric}_n" for metric in EDGES),
    *(f"{metric}_le_{edge}" for metric, edges in EDGES.items() for edge in edges),
)


def _vector(c: Counts) -> list[int]:
    return [getattr(c, name) for name in SCALARS] + [c.n[m] for m in EDGES] + [v for m in EDGES for v in c.hist[m]]


def _from_vector(vector: list[int]) -> Counts:
    out = Counts()
    for name, value in zip(SCALARS, vector, strict=False):
        setattr(out, name, value)
    at = len(SCALARS)
    out.n = dict(zip(EDGES, vector[at : at + len(EDGES)], strict=True))
    at += len(EDGES)
    for metric, edges in EDGES.items():
        out.hist[metric] = list(vector[at : at + len(edges)])
        at += len(edges)
    return out


def total(counts: Iterable[Counts]) -> Counts:
    """The sum of ``counts`` (column sums over flat vectors)."""
    vectors = [_vector(c) for c in counts]
    if not vectors:
        return Counts()
    return _from_vector([sum(column) for column in zip(*vectors, strict=True)])
