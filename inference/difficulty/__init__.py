"""Prompt difficulty classifier for the router: ``classify(prompt) -> Difficulty`` (routine, hard_open, hard_frontier).

Django-free and free of other ``inference`` modules. The model is loaded on the first call to
:func:`default_classifier` (or :func:`classify`), never on import. See docs/difficulty.md.
"""

from inference.difficulty.classifier import Difficulty, DifficultyClassifier, Thresholds, classify, default_classifier
from inference.difficulty.labels import HARD_FRONTIER, HARD_OPEN, LABELS, ROUTINE, Label

__all__ = [
    "HARD_FRONTIER",
    "HARD_OPEN",
    "LABELS",
    "ROUTINE",
    "Difficulty",
    "DifficultyClassifier",
    "Label",
    "Thresholds",
    "classify",
    "default_classifier",
]
