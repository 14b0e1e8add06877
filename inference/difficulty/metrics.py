"""What the router cares about, computed from class probabilities: misrouted hard prompts, frontier recall, cost.

The relative tier prices and the traffic mix are the issue's evaluation assumptions, not the price
book (tenants owns prices); they only rank candidates and pick default thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np

from inference.difficulty.classifier import Thresholds
from inference.difficulty.labels import HARD_FRONTIER, HARD_OPEN, LABELS, ROUTINE

# tier each label is routed to, and the relative price of each tier
TIER_OF: Final = {ROUTINE: "edge", HARD_OPEN: "speculative", HARD_FRONTIER: "cloud"}
TIER_PRICE: Final = {"edge": 0.02, "speculative": 0.25, "cloud": 1.00}
# assumed production mix: most traffic is routine (the saving target is unreachable otherwise)
TRAFFIC_MIX: Final = {ROUTINE: 0.70, HARD_OPEN: 0.20, HARD_FRONTIER: 0.10}
# the router's acceptance limits
MAX_HARD_TO_EDGE: Final = 0.05
MIN_FRONTIER_TO_CLOUD: Final = 0.90
MIN_COST_SAVING: Final = 0.70


def apply_thresholds(probs: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Label index per row, probs shape (n, len(LABELS)); same rule as ``Difficulty.label_with``."""
    assert probs.ndim == 2 and probs.shape[1] == len(LABELS), probs.shape
    p_hard = probs[:, 1] + probs[:, 2]
    return np.where(probs[:, 2] >= thresholds.cloud, 2, np.where(p_hard >= thresholds.hard, 1, 0))


def routing_report(y: np.ndarray, probs: np.ndarray, thresholds: Thresholds) -> dict[str, float]:
    """Argmax quality and the router's metrics under ``thresholds``; y holds label indices, shape (n,)."""
    argmax = probs.argmax(axis=1)
    routed = apply_thresholds(probs, thresholds)
    hard, frontier = y > 0, y == 2
    # fraction of each true class sent to each tier: rate[c][t]
    rate = np.array([[np.mean(routed[y == c] == t) if np.any(y == c) else 0.0 for t in range(3)] for c in range(3)])
    prices = np.array([TIER_PRICE[TIER_OF[label]] for label in LABELS])
    mix = np.array([TRAFFIC_MIX[label] for label in LABELS])
    cost = float(mix @ rate @ prices)  # expected price per request under the assumed mix
    return {
        "n": int(len(y)),
        "accuracy": round(float(np.mean(argmax == y)), 4),
        "macro_f1": round(_macro_f1(y, argmax), 4),
        "routed_accuracy": round(float(np.mean(routed == y)), 4),
        "hard_to_edge": round(float(np.mean(routed[hard] == 0)) if hard.any() else 0.0, 4),
        "frontier_to_cloud": round(float(np.mean(routed[frontier] == 2)) if frontier.any() else 0.0, 4),
        "routine_to_edge": round(float(rate[0, 0]), 4),
        "cost_saving_vs_cloud": round(1.0 - cost / TIER_PRICE["cloud"], 4),
    }


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    scores = []
    for c in range(len(LABELS)):
        tp = np.sum((pred == c) & (y == c))
        denom = np.sum(pred == c) + np.sum(y == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def meets_targets(report: Mapping[str, float]) -> bool:
    return (
        report["hard_to_edge"] <= MAX_HARD_TO_EDGE
        and report["frontier_to_cloud"] >= MIN_FRONTIER_TO_CLOUD
        and report["cost_saving_vs_cloud"] >= MIN_COST_SAVING
    )


def choose_thresholds(
    y: np.ndarray,
    probs: np.ndarray,
    max_hard_to_edge: float,
    min_frontier_to_cloud: float,
    grid: Sequence[float] = tuple(np.round(np.arange(0.02, 0.91, 0.01), 2)),
) -> Thresholds:
    """The cheapest thresholds (under the assumed mix) that keep both recall limits on (y, probs).

    Picked on held-out predictions with stricter limits than the router's, so that the margin absorbs
    the drop from held-out to truly new prompts. If no pair meets the limits, the pair with the fewest
    hard prompts on the edge (then the most frontier prompts on cloud) is returned. Every (cloud, hard)
    pair of the grid is scored at once: the same figures as :func:`routing_report`, vectorised.
    """
    values = np.asarray(grid, dtype=np.float64)
    to_cloud = probs[:, 2][None, :] >= values[:, None]  # (cloud grid, n)
    to_hard = (probs[:, 1] + probs[:, 2])[None, :] >= values[:, None]  # (hard grid, n)

    def tier_rates(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fractions of ``rows`` sent to edge, speculative, cloud; each (cloud grid, hard grid)."""
        n = max(int(rows.sum()), 1)
        cloud = np.repeat(to_cloud[:, rows].sum(axis=1, keepdims=True) / n, len(values), axis=1)
        speculative = (~to_cloud[:, rows]).astype(np.float64) @ to_hard[:, rows].T.astype(np.float64) / n
        return 1.0 - cloud - speculative, speculative, cloud

    prices = [TIER_PRICE[TIER_OF[label]] for label in LABELS]
    cost = np.zeros((len(values), len(values)))
    for c, label in enumerate(LABELS):
        edge, speculative, cloud = tier_rates(y == c)
        cost += TRAFFIC_MIX[label] * (edge * prices[0] + speculative * prices[1] + cloud * prices[2])
    hard_to_edge = np.round(tier_rates(y > 0)[0], 4)
    frontier_to_cloud = np.round(tier_rates(y == 2)[2], 4)
    saving = np.round(1.0 - cost / TIER_PRICE["cloud"], 4)
    ok = (hard_to_edge <= max_hard_to_edge) & (frontier_to_cloud >= min_frontier_to_cloud)
    if ok.any():
        # the cheapest; among equally cheap pairs the lowest thresholds, for the most recall margin
        best = max(zip(*np.nonzero(ok), strict=True), key=lambda ij: (saving[ij], -ij[0], -ij[1]))
    else:
        best = max(np.ndindex(ok.shape), key=lambda ij: (-hard_to_edge[ij], frontier_to_cloud[ij], ij[0], ij[1]))
    return Thresholds(cloud=float(values[best[0]]), hard=float(values[best[1]]))
