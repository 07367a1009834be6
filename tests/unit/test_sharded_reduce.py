"""The sharded reduce: K reducers average one slice each of every update, the last one commits the round.

Driven through the handler like the delivery tests: a sharded run ends with the weights a single combine gives,
and every way an at-least-once delivery can disturb the new phase (duplicate, late and crashed reducers, a
resume between the phases, damaged slices) leaves it correct.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from trainer import quotas, sharding
from trainer.errors import InvalidEventError, LayoutError
from trainer_harness import Crash, Harness, deliver_until, failure_record, run_files, start_event

SHARDED = {"workers": 3, "reducers": 2, "epochs": 1, "rounds_per_epoch": 2, "outer_momentum": 0.9}


def is_reducer(event: dict[str, Any]) -> bool:
    return event.get("reduce") is True


def until_reducers(harness: Harness) -> list[dict[str, Any]]:
    """Deliver the round's workers; pop and return the reduce events the last one sent."""
    first = deliver_until(harness, is_reducer)
    others = [event for event in harness.invoker.queue if is_reducer(event)]
    for event in others:
        harness.invoker.queue.remove(event)
    return [first, *others]


def assert_same_weights(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def reference(harness: Harness) -> list[np.ndarray]:
    """The final weights of the same run with one combine per round."""
    harness.invoke(start_event("single", **{**SHARDED, "reducers": 1}))
    harness.drain()
    assert not any(is_reducer(event) for event in harness.invoker.sent)
    return harness.final_weights("single")


# --- the plan -----------------------------------------------------------------------------------------------


def test_slices_cover_every_weight_element_once_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 2, 4), (4,), (4,), (4,), (7, 5)]
    trainable = [True, True, False, False, True]
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    for slices in (1, 2, 5, 17):
        plan = sharding.SlicePlan.of(shapes, trainable, slices)
        rebuilt = [np.full(shape, np.nan, dtype=np.float32) for shape in shapes]
        for k in range(slices):
            member = sharding.pack(plan.cut(arrays, k, True), plan.cut(arrays, k, False))
            parts = sharding.unpack(member, plan.lengths(k), np.dtype(np.float32))
            plan.paste(rebuilt, parts[0], k, True)
            plan.paste(rebuilt, parts[1], k, False)
        assert_same_weights(rebuilt, arrays)


def test_the_reducer_count_follows_the_model_size_and_the_worker_count() -> None:
    full_width = 20_040_522  # vgg19_bn at width 1: 80 MB updates
    assert sharding.reducer_count(0, 4, full_width, 4) == 1  # 320 MB fit one combine
    assert sharding.reducer_count(0, 64, full_width, 4) == 10  # 5.1 GB: 10 reducers of <= 512 MiB
    assert sharding.reducer_count(0, 64, full_width, 2) == 5  # float16 updates: half the bytes
    assert sharding.reducer_count(0, 256, full_width, 4) == 39
    assert sharding.reducer_count(3, 4, full_width, 4) == 3  # asked for
    assert sharding.reducer_count(0, 64, 0, 4) == 1  # a run item from before the count: one combine


# --- same result ----------------------------------------------------------------------------------------------


def test_a_sharded_run_ends_with_the_weights_of_a_single_combine(
    harness: Harness, reference: list[np.ndarray]
) -> None:
    harness.invoke(start_event("sharded", **SHARDED))
    harness.drain()
    run = harness.run("sharded")
    assert run.state == "SUCCEEDED" and run.reducers == 2
    reduces = [event for event in harness.invoker.sent if is_reducer(event)]
    assert len(reduces) == 2 * run.total_rounds
    assert not any(event.get("combine") for event in harness.invoker.sent if event.get("run") == "sharded")
    assert_same_weights(harness.final_weights("sharded"), reference)
    assert run_files(harness, "sharded") == ["config.json", "final.keras"]
    metrics = harness.status.list_rounds("sharded")[0].metrics
    assert metrics is not None
    assert set(metrics.phase_bytes_read) == {"worker", "worker_max", "reduce", "reduce_max", "commit"}
    assert metrics.phase_bytes_read["reduce_max"] < metrics.phase_bytes_read["reduce"]
    assert metrics.bytes_read == metrics.phase_bytes_read["reduce"] + metrics.phase_bytes_read["commit"]


def test_duplicate_and_late_reducers_change_nothing(harness: Harness, reference: list[np.ndarray]) -> None:
    harness.invoke(start_event("dup", **SHARDED))
    first, second = until_reducers(harness)
    assert harness.invoke(first) == {"status": "reduced", "done": 1}
    assert harness.invoke(first) == {"status": "reduced", "done": 1}  # a duplicate only registers again
    assert harness.invoke(second)["status"] == "committed"
    assert harness.invoke(second)["status"] in ("fanned_out", "ignored")  # the copy after the commit
    assert harness.invoke(first)["status"] in ("fanned_out", "ignored")
    harness.drain(duplicate=True)
    assert harness.invoke(first)["status"] == "ignored"  # a late one after the run ended
    assert harness.run("dup").state == "SUCCEEDED"
    assert_same_weights(harness.final_weights("dup"), reference)
    assert run_files(harness, "dup") == ["config.json", "final.keras"]


def test_a_reducer_killed_after_writing_its_slice_is_retried_and_the_run_is_unchanged(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, reference: list[np.ndarray]
) -> None:
    from trainer import reduce

    harness.invoke(start_event("kill", **SHARDED))
    first, second = until_reducers(harness)
    saved = reduce.save_arrays

    def killed_after(*args: Any, **kwargs: Any) -> int:
        saved(*args, **kwargs)
        raise Crash("killed after writing its slice")

    monkeypatch.setattr(reduce, "save_arrays", killed_after)
    with pytest.raises(Crash):
        harness.invoke(first)
    monkeypatch.setattr(reduce, "save_arrays", saved)
    assert harness.layout.slice_path("kill", 0, first["reducer"]).exists()
    assert harness.invoke(second) == {"status": "reduced", "done": 1}  # the killed one has not registered
    assert harness.invoke(failure_record(first, "Crash"))["status"] == "redispatched"
    retry = harness.invoker.queue.pop()
    assert retry == {**first, "attempt": 2}
    assert harness.invoke(retry)["status"] == "committed"  # registers, completes the set, commits
    harness.drain()
    assert_same_weights(harness.final_weights("kill"), reference)


def test_a_reducer_killed_between_its_claim_and_the_commit_is_retried_by_its_failure_record(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, reference: list[np.ndarray]
) -> None:
    harness.invoke(start_event("claim", **SHARDED))
    first, second = until_reducers(harness)
    assert harness.invoke(first)["status"] == "reduced"
    claim = harness.status.claim_commit

    def killed_after_claim(*args: Any) -> bool:
        claim(*args)
        raise Crash("killed after the claim")

    monkeypatch.setattr(harness.status, "claim_commit", killed_after_claim)
    with pytest.raises(Crash):
        harness.invoke(second)
    monkeypatch.undo()
    assert harness.invoke(first)["status"] == "reduced"  # another copy may not commit: the claim is taken
    assert harness.invoke(failure_record(first, "Crash"))["status"] == "ignored"  # not the claimant
    assert harness.invoke(failure_record(second, "Crash"))["status"] == "redispatched"
    assert harness.invoke(harness.invoker.queue.pop())["status"] == "committed"  # attempt 2 re-claims
    harness.drain()
    assert_same_weights(harness.final_weights("claim"), reference)


def test_a_resume_between_the_reduce_and_the_commit_reuses_the_slices(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, reference: list[np.ndarray]
) -> None:
    from trainer import reduce

    harness.invoke(start_event("resumed", **SHARDED))
    first, second = until_reducers(harness)
    assert harness.invoke(first)["status"] == "reduced"
    harness.status.halt_run("resumed", "stop --now")  # the second reducer's event is lost with the stop
    assert harness.invoke(second)["status"] == "ignored"
    written: list[str] = []
    saved = reduce.save_arrays
    monkeypatch.setattr(
        reduce, "save_arrays", lambda path, *a, **k: written.append(path.name) or saved(path, *a, **k)
    )
    assert harness.invoke({"start": True, "run": "resumed", "resume": True})["status"] == "resumed"
    harness.drain()
    run = harness.run("resumed")
    assert run.state == "SUCCEEDED" and run.generation == 2
    # Round 0's first slice was kept across the stop and reused; only the missing one was reduced.
    assert (
        written[0] == f"slice-{second['reducer']:04d}.npz"
        and f"slice-{first['reducer']:04d}.npz" not in written[:1]
    )
    assert_same_weights(harness.final_weights("resumed"), reference)
    assert run_files(harness, "resumed") == ["config.json", "final.keras"]


def test_a_resume_after_every_slice_registered_but_the_committer_died_commits_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, reference: list[np.ndarray]
) -> None:
    harness.invoke(start_event("orphan", **SHARDED))
    first, second = until_reducers(harness)
    harness.invoke(first)
    commit_round = harness.status.commit_round
    monkeypatch.setattr(
        harness.status, "commit_round", lambda *args, **kwargs: (_ for _ in ()).throw(Crash("killed"))
    )
    with pytest.raises(Crash):
        harness.invoke(second)  # registered, claimed the commit, died before it; its failure record is lost
    monkeypatch.setattr(harness.status, "commit_round", commit_round)
    assert harness.status.get_round("orphan", 0).reduced == {0, 1}
    assert harness.invoke({"start": True, "run": "orphan", "resume": True})["status"] == "resumed"
    harness.drain(duplicate=True)
    run = harness.run("orphan")
    assert run.state == "SUCCEEDED" and run.generation == 2
    assert_same_weights(harness.final_weights("orphan"), reference)
    assert run_files(harness, "orphan") == ["config.json", "final.keras"]  # the dead commit's files went too


def test_lost_reduce_events_are_resent_by_the_watchdog_under_a_new_generation(
    harness: Harness, reference: list[np.ndarray]
) -> None:
    import datetime as dt

    from trainer import watchdog

    harness.invoke(start_event("lost", **SHARDED))
    first, _second = until_reducers(harness)
    assert harness.invoke(first)["status"] == "reduced"  # the other reducer's event is lost
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    assert watchdog.check_runs(harness.services, now=later)["actions"] == {"lost": "resent"}
    harness.drain()  # the workers find their updates, the claim goes to generation 2, both reducers are sent
    run = harness.run("lost")
    assert run.state == "SUCCEEDED" and run.generation == 2
    assert_same_weights(harness.final_weights("lost"), reference)


def test_a_late_reducer_of_a_committed_round_leaves_no_slice_behind(harness: Harness) -> None:
    harness.invoke(start_event("late", **SHARDED))
    first, second = until_reducers(harness)
    harness.invoke(first)
    harness.invoke(second)
    harness.drain()
    assert harness.run("late").state == "SUCCEEDED"
    old = {**first, "generation": 1}
    assert harness.invoke(old)["status"] == "ignored"
    assert run_files(harness, "late") == ["config.json", "final.keras"]


def test_a_stale_reducer_copy_whose_round_was_cleaned_up_fails_without_failing_the_run(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer import reduce

    harness.invoke(start_event("race", **SHARDED))
    first, second = until_reducers(harness)
    harness.invoke(first)
    harness.invoke(second)  # round 0 committed: its slices are cleaned up
    assert not harness.layout.reduce_dir("race", 0).exists()
    stale_run = harness.run("race")
    # A copy of the first reducer that read the run before the commit and writes after it:
    monkeypatch.setattr(reduce, "require_run", lambda run_id, services: _at_round(stale_run, 0))
    monkeypatch.setattr(reduce.combine, "check_all_registered", lambda run, services: None)
    with pytest.raises(LayoutError):  # its updates are gone: a stale copy fails without failing the run
        harness.invoke(first)
    assert harness.run("race").state == "RUNNING"
    assert not harness.layout.reduce_dir("race", 0).exists()


def test_a_reducer_that_finds_its_round_committed_while_it_wrote_takes_its_slice_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, reference: list[np.ndarray]
) -> None:
    from trainer import reduce

    harness.invoke(start_event("race", **SHARDED))
    first, second = until_reducers(harness)
    saved, nested = reduce.save_arrays, []

    def commit_meanwhile(path: Any, *args: Any, **kwargs: Any) -> int:
        if not nested:  # copy B of the first reducer is writing: copy A and the second reducer commit first
            nested.append(path)
            assert harness.invoke(first)["status"] == "reduced"
            assert harness.invoke(second)["status"] == "committed"
        return saved(path, *args, **kwargs)

    monkeypatch.setattr(reduce, "save_arrays", commit_meanwhile)
    result = harness.invoke(first)  # copy B
    assert result["status"] == "ignored" and "round 1" in result["reason"]
    assert not harness.layout.reduce_dir("race", 0).exists()  # nothing of round 0 is left
    monkeypatch.undo()
    harness.drain()
    assert_same_weights(harness.final_weights("race"), reference)
    assert run_files(harness, "race") == ["config.json", "final.keras"]


def _at_round(run: Any, round_index: int) -> Any:
    import dataclasses

    return dataclasses.replace(run, round_index=round_index, fanned_out=round_index)


def test_a_corrupt_slice_fails_the_run_with_the_reason(harness: Harness) -> None:
    harness.invoke(start_event("corrupt", **SHARDED))
    first, second = until_reducers(harness)
    harness.invoke(first)
    harness.layout.slice_path("corrupt", 0, first["reducer"]).write_bytes(b"not an npz")
    with pytest.raises(LayoutError, match="unreadable array archive"):
        harness.invoke(second)
    run = harness.run("corrupt")
    assert run.state == "FAILED" and "slice-000" in run.reason


def test_a_corrupt_update_member_fails_the_run_with_the_reason(harness: Harness) -> None:
    harness.invoke(start_event("badupdate", **SHARDED))
    first, _second = until_reducers(harness)
    path = harness.layout.update_path("badupdate", 0, 1)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(LayoutError):
        harness.invoke(first)
    assert harness.run("badupdate").state == "FAILED"


@pytest.mark.parametrize(
    "change",
    [{"reducer": 2}, {"reducers": 3}, {"reducers": 1}, {"reduce": False}, {"extra": 1}, {"reducer": -1}],
    ids=["reducer-out-of-range", "other-count", "one-reducer", "false", "unknown-key", "negative"],
)
def test_a_malformed_reduce_event_is_refused_and_changes_nothing(harness: Harness, change: dict) -> None:
    harness.invoke(start_event("bad", **SHARDED))
    event, _ = until_reducers(harness)
    before = harness.run("bad")
    with pytest.raises(InvalidEventError):
        harness.invoke({**event, **change})
    assert harness.run("bad") == before
    assert not harness.layout.reduce_dir("bad", 0).exists()


def test_a_combine_event_for_a_sharded_round_does_nothing(harness: Harness) -> None:
    harness.invoke(start_event("nocombine", **SHARDED))
    event, _ = until_reducers(harness)
    combine_event = {key: event[key] for key in ("workers", "epochsdone", "run", "round", "generation")}
    result = harness.invoke({"combine": True, **combine_event})
    assert result == {"status": "ignored", "reason": "round 0 is reduced by 2 reducers"}
    assert harness.run("nocombine").round_index == 0


# --- memory ---------------------------------------------------------------------------------------------------


def test_a_start_whose_combine_cannot_fit_the_functions_memory_is_refused_with_the_arithmetic(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    harness.services.environment = dataclasses.replace(harness.services.environment, memory_mb=1024)
    with pytest.raises(
        InvalidEventError, match=r"does not fit the function's 1024 MB: a combine holds 7\.00 copies"
    ):
        harness.invoke(start_event("toobig", workers=2, width=1.0, reducers=1))
    assert harness.status.get_run("toobig") is None and not harness.layout.run_dir("toobig").exists()
    harness.services.environment = dataclasses.replace(harness.services.environment, memory_mb=10240)
    harness.invoke(start_event("fits", workers=2))
    assert harness.run("fits").state == "RUNNING"


def test_the_memory_arithmetic_counts_the_commit_of_a_sharded_round() -> None:
    single, words = quotas.combine_memory_mb(20_000_000, 1, outer_momentum=False)
    sharded, sharded_words = quotas.combine_memory_mb(20_000_000, 10, outer_momentum=False)
    assert sharded < single and "7.00 copies of the 76 MB model" in words
    assert "the commit of 10 reducers holds 2.10 copies" in sharded_words
