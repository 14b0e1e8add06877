"""The engines' warm-up: loaded before the first request, then out of the cyclic collector's reach."""

from __future__ import annotations

import gc
import threading

from inference import engines


def test_what_the_warm_up_loaded_is_frozen_out_of_the_collectors_reach(monkeypatch):
    made: list[list[list[int]]] = []

    def load() -> None:  # the engines' load: long-lived containers (a tokenizer's, a model's)
        made.append([[i] for i in range(1000)])

    done = threading.Event()
    real = engines.freeze_what_loaded

    def freeze() -> None:
        real()
        done.set()

    monkeypatch.setattr(engines, "get_engines", load)
    monkeypatch.setattr("inference.signals.warm_up", lambda: None)
    monkeypatch.setattr(engines, "freeze_what_loaded", freeze)
    before = gc.get_freeze_count()
    engines.warm_engines_in_background()
    assert done.wait(timeout=30)
    assert gc.get_freeze_count() >= before + 1000
    loaded = {id(x) for x in made[0]}
    assert not loaded & {id(o) for o in gc.get_objects()}  # no collection, full or not, scans them
    assert made[0][999] == [999]  # frozen, not freed (the test's lists stay frozen, as a server's would)
