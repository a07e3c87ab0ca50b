"""The demo report's pure pieces: retrieval accuracy from the confusion matrix, the seeds table."""

from __future__ import annotations

import numpy as np

from semla_demo.report import format_seeds, retrieval_accuracy

DOMAINS = ["muses-clear-day", "muses-fog-night"]


def _result(zeroshot: float, uniform: float, semla: float, oracle: float, accuracy: float) -> dict:
    row = {"zeroshot": zeroshot, "uniform": uniform, "semla": semla, "oracle": oracle}
    night = {k: v - 20 for k, v in row.items()}
    table = {"muses-clear-day": row, "muses-fog-night": night}
    return {"tables": {"leave-one-out": table}, "accuracy": {d: accuracy for d in DOMAINS}}


def test_retrieval_accuracy_is_the_diagonal_share() -> None:
    confusion = np.array([[3, 1], [0, 0]])
    accuracy = retrieval_accuracy(confusion, DOMAINS)
    assert accuracy["muses-clear-day"] == 0.75
    assert np.isnan(accuracy["muses-fog-night"])  # no image of that condition


def test_seeds_table_means_std_and_ordering() -> None:
    results = {0: _result(40, 42, 46, 50, 0.9), 1: _result(42, 41, 48, 52, 0.8)}
    text, numbers = format_seeds(results)
    means = numbers["settings"]["leave-one-out"]
    assert means[0] == {"zeroshot": 30.0, "uniform": 32.0, "semla": 36.0, "oracle": 40.0}
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert lines["0"].endswith("holds") and lines["1"].endswith("broken")  # seed 1: uniform < zero-shot
    # mean +- population std over the seeds: zero-shot 31 +- 1, SemLA 37 +- 1
    assert "31.00 +- 1.00" in lines["mean"] and "37.00 +- 1.00" in lines["mean"]
    assert "seed 0 40.00, seed 1 42.00" in text  # the base model on its own condition (clear day)
    assert "seed 0 0.90, seed 1 0.80" in text
