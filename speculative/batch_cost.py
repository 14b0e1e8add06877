"""The verifier's measured batch costs: what a step of so many positions takes (``BatchCostModel``).

The draft-length controller prices a longer draft with its line, and the speculation
governor rules drafting out where measured steps say it cannot pay (``speculative.controller``, ``speculative.governor``).
"""

from __future__ import annotations

import statistics
from collections import deque

COST_WINDOW = 128  # recent batches behind the batch cost line
LONE_POINTS = 32  # one-position batches behind ``BatchCostModel.lone_ms``
MIN_POINTS = 4  # batches a measured step time needs


class BatchCostModel:
    """A least-squares line ``verify_ms = intercept + slope * tokens`` over recent batches.

    ``tokens`` is what a batch feeds the verifier: each round's pending token plus its
    draft. The draft-length controller reads the line to price a longer draft: on a GPU
    the slope is near zero (a forward costs the same for 1 or 80 positions), on a CPU it
    is not, and there speculation must stay modest when many sessions share a forward.

    Refitted after every batch from running sums over the window, not from the window's
    points: at one session that is every token, and the two-pass fit over 128 points (plus
    counting their distinct sizes) was about 50 us of a round whose decode is 0.6 ms. The
    sums are recomputed from the points once per window, so rounding cannot accumulate.
    """

    def __init__(self, window: int = COST_WINDOW):
        self._points: deque[tuple[int, float]] = deque(maxlen=window)
        self._lone: deque[float] = deque(maxlen=LONE_POINTS)  # one-position batches, kept beside the window
        self._line: tuple[float, float] | None = None
        self._sizes: dict[int, int] = {}  # points per distinct token count
        self._sums = [0.0, 0.0, 0.0, 0.0]  # x, y, x*x, x*y
        self._since_exact = 0

    def record(self, tokens: int, verify_ms: float) -> None:
        """Add a batch and refit, once per batch on the scheduler's thread (not per session read)."""
        if len(self._points) == self._points.maxlen:
            self._count(*self._points[0], sign=-1)  # the oldest leaves the window
        self._points.append((tokens, verify_ms))
        self._count(tokens, verify_ms, sign=1)
        if tokens == 1:
            self._lone.append(verify_ms)
        self._since_exact += 1
        if self._since_exact >= len(self._points):
            self._since_exact = 0
            sx, sy = sum(x for x, _ in self._points), sum(y for _, y in self._points)
            self._sums = [sx, sy, sum(x * x for x, _ in self._points), sum(x * y for x, y in self._points)]
        if len(self._sizes) >= 2:
            self._line = self._fit()

    def _count(self, x: int, y: float, sign: int) -> None:
        left = self._sizes.get(x, 0) + sign
        if left:
            self._sizes[x] = left
        else:
            del self._sizes[x]
        sums = self._sums
        sums[0] += sign * x
        sums[1] += sign * y
        sums[2] += sign * x * x
        sums[3] += sign * x * y

    def _fit(self) -> tuple[float, float]:
        """``controller.cost_line`` of the window's points, from the sums."""
        n = len(self._points)
        sx, sy, sxx, sxy = self._sums
        mean_x, mean_y = sx / n, sy / n
        var = sxx - sx * mean_x
        slope = max(0.0, (sxy - sx * mean_y) / var) if var > 0 else 0.0
        return max(0.0, mean_y - slope * mean_x), slope

    def line(self) -> tuple[float, float] | None:
        """(intercept_ms, slope_ms_per_token), or None until batches of two sizes were seen."""
        return self._line

    def lone_ms(self) -> float | None:
        """The fastest of the recent one-position batches (a lone session's plain step), however long ago: noise
        only slows a step, and the first after an idle spell took 1.0-1.3 ms where others took 0.65 (demo pair)."""
        return min(self._lone) if len(self._lone) >= MIN_POINTS else None

    def lone_typical_ms(self) -> float | None:
        """The median of the recent one-position batches: a lone session's plain step as it runs, noise and all."""
        return statistics.median(self._lone) if len(self._lone) >= MIN_POINTS else None

    def step_ms(self, tokens: int) -> float | None:
        """The median of the window's batches within a quarter of ``tokens`` positions, if it holds a few."""
        near = [ms for x, ms in self._points if 0.8 * tokens <= x <= 1.25 * tokens]
        return statistics.median(near) if len(near) >= MIN_POINTS else None
