"""The batching comparison: its targets, table and plot on a report built here, and one tiny
real run of every mode (slow)."""

from __future__ import annotations

import os

import matplotlib
import pytest

from helpers.workshop.batching_comparison import (
    BATCHED,
    BATCHING_MODES,
    ONE_AT_A_TIME,
    PER_USER,
    batching_modes,
    check_targets,
    compare_batching,
    markdown_table,
    plot_batching,
)

matplotlib.use("Agg")


def run(steps: int, clients: int, rps: float, p95_ms: float, failures: int = 0) -> dict:
    return {
        "steps": steps,
        "clients": clients,
        "requests_per_second": rps,
        "p50_ms": p95_ms / 2,
        "p95_ms": p95_ms,
        "p99_ms": p95_ms * 1.2,
        "requests": 100,
        "failures": failures,
        "cache_hit_ratio": 0.9,
    }


def mode(threads: int, processes: int, runs: dict[tuple[int, int], tuple[float, float]]) -> dict:
    """A mode's result: (steps, clients) -> (requests/s, p95 ms)."""
    return {
        "torch_threads": {"per_model_process": threads, "model_processes_at_most": processes},
        "runs": [run(s, c, rps, p95) for (s, c), (rps, p95) in runs.items()],
    }


def report(batched_16_clients_p95_ms: float = 3000.0) -> dict:
    """Two step counts, three client counts. With 16 clients, the one-at-a-time shared base serves
    22 req/s at 1 step and 2 req/s at 20 (p95 4 s), the batched one 66 and 5 (2 failures)."""
    per_user = {(s, c): (1.0 / s * c**0.2, 800.0 * s * c) for s in (1, 20) for c in (1, 4, 16)}
    one_at_a_time = {
        (1, 1): (20.0, 60.0),
        (1, 4): (21.0, 200.0),
        (1, 16): (22.0, 800.0),
        (20, 1): (1.7, 650.0),
        (20, 4): (1.9, 2200.0),
        (20, 16): (2.0, 4000.0),
    }
    batched = {
        (1, 1): (19.0, 70.0),
        (1, 4): (40.0, 150.0),
        (1, 16): (66.0, 300.0),
        (20, 1): (1.6, 700.0),
        (20, 4): (3.5, 1300.0),
        (20, 16): (5.0, batched_16_clients_p95_ms),
    }
    data = {
        "parameters": {"users": 1000, "clients": [1, 4, 16], "steps": [1, 20], "image_px": 64},
        "modes": {
            PER_USER: mode(1, 4, per_user),
            ONE_AT_A_TIME: mode(1, 1, one_at_a_time),
            BATCHED: mode(2, 1, batched),
        },
    }
    data["modes"][BATCHED]["runs"][-1]["failures"] = 2
    return data


def test_the_three_modes_in_order_and_both_shared_modes_get_every_core():
    assert list(BATCHING_MODES) == [
        "per-user",
        "shared base, one at a time",
        "shared base, batched",
    ]
    cores = os.cpu_count()
    assert BATCHING_MODES[ONE_AT_A_TIME] == ("shared-base", {"max_batch": 1, "cpu_threads": cores})
    serving, config = BATCHING_MODES[BATCHED]
    assert serving == "shared-base"
    assert config["max_batch"] == 8
    assert config["cpu_threads"] == cores
    # threads given: the same for both shared modes, so they do not explain the difference
    modes = batching_modes(max_batch=8, threads=3)
    assert modes[ONE_AT_A_TIME][1]["cpu_threads"] == modes[BATCHED][1]["cpu_threads"] == 3


def test_targets_compare_batched_with_one_at_a_time_at_the_most_clients():
    data = report()
    # no failures at 20 steps: the batched mode must serve every request to meet the target
    data["modes"][BATCHED]["runs"][-1]["failures"] = 0
    targets = check_targets(data)
    assert targets["clients"] == 16
    assert targets["steps_1"]["throughput_ratio"] == round(66.0 / 22.0, 2)
    assert targets["steps_1"]["p95_not_higher"] and targets["steps_1"]["met"]
    assert targets["steps_20"]["throughput_ratio"] == 2.5
    assert targets["steps_20"]["met"]
    assert targets["met"]

    boundary = report()  # exactly twice the one-at-a-time throughput at exactly its p95
    boundary["modes"][BATCHED]["runs"][2].update(requests_per_second=44.0, p95_ms=800.0)
    assert check_targets(boundary)["steps_1"]["throughput_ratio"] == 2.0
    assert check_targets(boundary)["steps_1"]["met"]


def test_targets_are_missed_by_a_higher_p95_or_failures_or_too_little_throughput():
    slower = report(batched_16_clients_p95_ms=4000.1)
    slower["modes"][BATCHED]["runs"][-1]["failures"] = 0
    targets = check_targets(slower)
    assert targets["steps_20"]["throughput_ratio"] == 2.5  # more than twice, yet
    assert not targets["steps_20"]["p95_not_higher"]
    assert not targets["steps_20"]["met"] and not targets["met"]
    assert targets["steps_1"]["met"]

    failing = check_targets(report())  # 2 of 100 requests failed at 20 steps
    assert failing["steps_20"]["p95_not_higher"] and not failing["steps_20"]["met"]

    short = report()
    short["modes"][BATCHED]["runs"][2]["requests_per_second"] = 43.0  # 1.95x
    assert not check_targets(short)["steps_1"]["met"]
    assert check_targets({"parameters": {}, "modes": {ONE_AT_A_TIME: {}}}) == {}


def test_the_table_has_a_row_per_test_and_a_column_per_mode():
    lines = markdown_table(report()).splitlines()
    assert lines[0] == (
        "| steps | clients | per-user (1 thread x up to 4 models) "
        "| shared base, one at a time (1 thread) | shared base, batched (2 threads) |"
    )
    assert len(lines) == 2 + 6
    row = next(line for line in lines if line.startswith("| 20 | 16 |"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[3] == "2 req/s, 2 / 4 / 4.8 s"
    assert cells[4] == "5 req/s, 1.5 / 3 / 3.6 s, 2 of 100 failed"


def test_the_plot_draws_throughput_against_p95_with_a_line_per_mode():
    data = report()
    data["modes"][PER_USER]["runs"][0]["requests_per_second"] = 0.0  # served nothing: no point
    figure = plot_batching(data)
    axes = figure.axes
    assert [axis.get_title() for axis in axes] == [
        "1 denoising step, 64x64 px",
        "20 denoising steps, 64x64 px",
    ]
    for axis, n_steps in zip(axes, (1, 20), strict=True):
        assert axis.get_xlabel().startswith("p95 latency (s)")
        assert axis.get_ylabel() == "requests/s"
        assert [line.get_label() for line in axis.get_lines()] == [PER_USER, ONE_AT_A_TIME, BATCHED]
        runs = [r for r in data["modes"][BATCHED]["runs"] if r["steps"] == n_steps]
        batched = axis.get_lines()[2]
        assert list(batched.get_xdata()) == [r["p95_ms"] / 1000 for r in runs]
        assert list(batched.get_ydata()) == [r["requests_per_second"] for r in runs]
        labels = [text.get_text() for text in axis.texts]
        expected = 8 if n_steps == 1 else 9
        assert len(labels) == expected
        assert sorted(set(labels)) == ["1", "16", "4"]
    assert len(axes[0].get_lines()[0].get_xdata()) == 2  # the empty test left out
    assert axes[1].get_xscale() == "log"  # 0.65 s to 256 s


def test_compare_batching_rejects_what_it_cannot_measure(tmp_path):
    with pytest.raises(ValueError, match="max_batch"):
        compare_batching(None, "b", tmp_path, tmp_path / "none", "base", max_batch=1)
    with pytest.raises(ValueError, match="modes must be among"):
        compare_batching(None, "b", tmp_path, tmp_path / "none", "base", modes=["batched"])
    with pytest.raises(ValueError, match="clients"):
        compare_batching(None, "b", tmp_path, tmp_path / "none", "base", clients=(0,))


@pytest.mark.slow
def test_every_mode_serves_a_tiny_zipf_load_without_failures(tmp_path, lora_weights):
    from helpers.infra.local.store import LocalArtifactStore
    from helpers.settings import DEFAULT_BASE_MODEL

    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket("bench")
    result = compare_batching(
        store,
        "bench",
        tmp_path / "runs",
        lora_weights,
        str(DEFAULT_BASE_MODEL),
        users=6,
        clients=(1, 3),
        steps=(1,),
        seconds=4,
        max_batch=4,
        threads=2,
        log=lambda line: None,
    )
    assert list(result["modes"]) == [PER_USER, ONE_AT_A_TIME, BATCHED]
    assert result["parameters"]["image_px"] == 64
    for label in (ONE_AT_A_TIME, BATCHED):
        assert result["modes"][label]["torch_threads"]["per_model_process"] == 2
    assert result["modes"][BATCHED]["config"]["max_batch"] == 4
    for label, measured in result["modes"].items():
        assert [(r["steps"], r["clients"]) for r in measured["runs"]] == [(1, 1), (1, 3)], label
        for r in measured["runs"]:
            assert r["requests"] > 0 and r["failures"] == 0, (label, r)
            assert r["requests_per_second"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert set(result["targets"]) == {"clients", "ratio_wanted", "steps_1", "met"}
    assert result["targets"]["clients"] == 3
    assert len(result["machine"]["load_average_end"]) == 3
    assert "shared base, batched" in markdown_table(result)
