"""benchmarks.timing: interleaving order, warm-up dropped, paired ratios, quartiles (no clocks involved)."""

import math

import pytest
from benchmarks.timing import interleaved, ratios, spread


def test_interleaved_runs_round_robin_and_drops_warmup() -> None:
    calls: list[str] = []
    counter = iter(range(100))

    def run(label: str):
        def f() -> float:
            calls.append(label)
            return float(next(counter))

        return f

    times = interleaved({"a": run("a"), "b": run("b"), "c": run("c")}, repeats=2, warmup=1)
    assert calls == ["a", "b", "c"] * 3
    assert times == {"a": [3.0, 6.0], "b": [4.0, 7.0], "c": [5.0, 8.0]}


def test_ratios_pair_by_round() -> None:
    r = ratios({"base": [1.0, 2.0], "x": [1.5, 2.0]}, "base")
    assert r == {"base": [1.0, 1.0], "x": [1.5, 1.0]}


def test_spread_quartiles_and_empty() -> None:
    s = spread([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["q25"] == 2.0 and s["q75"] == 4.0 and s["iqr"] == 2.0 and s["n"] == 5
    assert math.isnan(spread([])["median"])


def test_interleaved_rejects_no_repeats() -> None:
    with pytest.raises(ValueError):
        interleaved({"a": lambda: 0.0}, repeats=0)
