"""The three difficulty classes and the tier each one asks for: the one definition the package imports."""

from __future__ import annotations

from typing import Final, Literal

Label = Literal["routine", "hard_open", "hard_frontier"]

ROUTINE: Final = "routine"
HARD_OPEN: Final = "hard_open"
HARD_FRONTIER: Final = "hard_frontier"

# Order matters: it is the column order of every probability matrix and of the committed head.
LABELS: Final[tuple[Label, ...]] = (ROUTINE, HARD_OPEN, HARD_FRONTIER)
