"""The combine's memory does not grow with the worker count: updates are added to the average as they are read."""

from __future__ import annotations

import tracemalloc

from trainer_harness import Harness, start_event


def combine_peak_bytes(harness: Harness, run_id: str, workers: int) -> tuple[int, int]:
    """Peak traced memory of the round-0 combine of a run with ``workers`` workers, and one update's size."""
    harness.invoke(
        start_event(run_id, workers=workers, epochs=1, rounds_per_epoch=1, width=0.25, train_samples=240)
    )
    for _ in range(workers):
        harness.invoke(harness.invoker.queue.popleft())
    combine = harness.invoker.queue.popleft()
    assert combine.get("combine")
    update_bytes = harness.layout.update_path(run_id, 0, 0).stat().st_size
    tracemalloc.start()
    try:
        assert harness.invoke(combine)["status"] == "combined"
        return tracemalloc.get_traced_memory()[1], update_bytes
    finally:
        tracemalloc.stop()


def test_combine_peak_memory_is_flat_in_the_worker_count(harness: Harness) -> None:
    few, update_bytes = combine_peak_bytes(harness, "few", 2)
    many, _ = combine_peak_bytes(harness, "many", 8)
    # Holding every update would add 6 update copies (about 6 x 5 MB here); streaming adds none.
    assert many < few + update_bytes, (few, many, update_bytes)
