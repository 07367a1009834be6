"""bench/convergence.py: the accuracy harness drives the real handler and records what the combine measured."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer_harness import TINY, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness sets its process's AWS variables; keep them out of the other tests."""
    monkeypatch.setattr(os, "environ", os.environ.copy())


def load_harness() -> Any:
    spec = importlib.util.spec_from_file_location("convergence", REPO / "bench" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["convergence"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.java
def test_harness_runs_n_workers_through_the_handler_and_records_a_curve(tmp_path: Path) -> None:
    convergence = load_harness()
    efs = tmp_path / "efs"
    write_synthetic_dataset(efs / "datasets" / "cifar10")
    results = tmp_path / "results.jsonl"
    settings = [f"{key}={json.dumps(value)}" for key, value in TINY.items()]
    argv = [
        "--results",
        str(results),
        "run",
        "--efs-root",
        str(efs),
        "--label",
        "tiny",
        "--workers",
        "1",
        "3",
    ]
    assert convergence.main([*argv, "--set", *settings, "epochs=2", "rounds_per_epoch=2"]) == 0

    recorded = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["label"], r["workers"]) for r in recorded] == [("tiny", 1), ("tiny", 3)]
    for result in recorded:
        assert [point["epochs"] for point in result["curve"]] == [1.0, 2.0]  # one evaluation per epoch
        assert result["rounds"] == 4 and result["final_accuracy"] == result["curve"][-1]["test_accuracy"]
        assert 0.0 <= result["final_accuracy"] <= 1.0
        assert result["config"]["workers"] == result["workers"] and result["bytes_read"] > 0

    png = tmp_path / "accuracy.png"
    assert convergence.main(["--results", str(results), "report", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_parse_json_values_and_reject_pairs_without_a_key() -> None:
    convergence = load_harness()
    assert convergence.parse_settings(["lr=0.05", 'preset="paper"', "augment=false", "dataset=cifar10"]) == {
        "lr": 0.05,
        "preset": "paper",
        "augment": False,
        "dataset": "cifar10",
    }
    with pytest.raises(SystemExit, match="key=value"):
        convergence.parse_settings(["lr"])


def test_summary_gives_mean_and_spread_over_seeds() -> None:
    convergence = load_harness()
    config = {"epochs": 3, "workers": 4, "local_optimizer": "keep"}
    common = {"label": "x", "workers": 4, "config": config, "rounds": 6, "bytes_read": 1e9}
    results = [
        {**common, "seed": 0, "final_accuracy": 0.60, "bytes_written": 0, "wall_s": 10},
        {**common, "seed": 1, "final_accuracy": 0.64, "bytes_written": 0, "wall_s": 20},
    ]
    (row,) = convergence.summarize(results)
    assert row["mean"] == pytest.approx(0.62) and row["spread"] == pytest.approx(0.04)
    assert row["seeds"] == [0, 1] and (row["low"], row["high"]) == (0.60, 0.64) and row["wall_s"] == 15
    # per round at width 1 (M bytes): 4 workers x (weights + update + kept state in and out) + 4 updates and
    # the weights read + the next weights written
    assert row["efs_gb_full_width"] == pytest.approx(
        6 * (4 * 4 + 4 + 2) * convergence.FULL_WIDTH_MODEL_BYTES / 1e9
    )


def test_float16_updates_and_outer_momentum_change_the_bytes_a_round_moves() -> None:
    convergence = load_harness()
    model = convergence.FULL_WIDTH_MODEL_BYTES
    paper = {"workers": 2, "local_optimizer": "reset", "update_dtype": "float32", "outer_momentum": 0.0}
    assert convergence.efs_bytes_per_round(paper) == (2 * 2 + 2 + 2) * model
    half = {**paper, "update_dtype": "float16"}
    assert convergence.efs_bytes_per_round(half) == (2 * 1.5 + 1 + 2) * model
    outer = {**paper, "outer_momentum": 0.9}
    assert convergence.efs_bytes_per_round(outer) == (2 * 2 + 2 + 4) * model
