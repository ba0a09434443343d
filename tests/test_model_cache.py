"""The worker's model cache in-process: LRU eviction frees the evicted model, and the
heap of the loaded ones is frozen out of the cyclic collector's full passes."""

from __future__ import annotations

import gc
import threading
import weakref

from worker.backends.hf_models import ModelCache


def test_eviction_frees_the_model_and_loaded_models_stay_frozen(tiny_models: dict) -> None:
    gpt2, llama = str(tiny_models["gpt2"]), str(tiny_models["llama"])
    cache = ModelCache(max_models=1)
    try:
        first = weakref.ref(cache.get(gpt2, None, None, "cpu").model)
        assert first() is not None
        assert gc.get_freeze_count() > 0  # the loaded heap is out of the collector's way
        assert cache.get(gpt2, None, None, "cpu").model is first()  # served from cache

        second = weakref.ref(cache.get(llama, None, None, "cpu").model)  # evicts GPT-2
        assert len(cache) == 1
        assert first() is None  # freed although it had been frozen
        assert gc.get_freeze_count() > 0

        cache.clear()
        assert second() is None
        assert gc.get_freeze_count() == 0
    finally:
        cache.clear()
        gc.unfreeze()


def test_threads_asking_for_one_model_share_one_load(tiny_models: dict) -> None:
    """Under ``--pool threads`` two jobs may ask for a model at once: one load, one object
    (unguarded, the second ``from_pretrained`` fails on a meta tensor or loads twice)."""
    gpt2 = str(tiny_models["gpt2"])
    cache = ModelCache(max_models=1)
    start = threading.Barrier(4)
    results: list[object] = []

    def load() -> None:
        start.wait()
        try:
            results.append(cache.get(gpt2, None, None, "cpu").model)
        except Exception as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(results) == 4
        assert not [r for r in results if isinstance(r, Exception)], results
        assert all(r is results[0] for r in results)
        assert len(cache) == 1
    finally:
        cache.clear()
