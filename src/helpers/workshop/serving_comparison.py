"""Per-user models vs one shared base with an adapter cache, measured in one run on one machine.

For each serving mode, `compare_serving_modes` registers the same users on an endpoint of its
own (a real Triton + router, `helpers.infra.local.endpoint`), then measures:

* **latency**: the endpoint's first request (it loads a pipeline in both modes); a user's
  **cold** request (per-user: load that user's pipeline; shared base: fetch and swap in an
  adapter), the same request again (**warm**), and requests alternating between two users
  whose models are both ready (**switch**: per-user, two processes; shared base, a hot-swap);
* **memory**: resident set size (RSS) of the endpoint's Triton model processes after one
  request each for the first N registered users, for each N of `user_counts`. A per-user
  endpoint holds at most `max_loaded_models` users (more only evicts), so it is asked for that
  many; the shared base caches every user asked for;
* **load**: `helpers.workshop.loadtest`'s Zipf load test over all registered users, started with
  only
  the most popular user's model ready (per-user: that user's pipeline; shared base: the
  pipeline and that user's adapter).

Users past the first get synthetic LoRAs: the real one's names, shapes, dtypes and metadata
with random values of the same spread (`synthetic_adapter`).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from helpers.domain.paths import adapter_prefix
from helpers.domain.serving import SERVING_MODES, Serving
from helpers.ports.store import ArtifactStore
from helpers.services.serving import packaging_for

PROMPT = "a photo of sks toy"


def synthetic_adapter(template: bytes, seed: int) -> bytes:
    """A LoRA file like `template` (names, shapes, dtypes, metadata) with random values.

    Each tensor is drawn from a normal distribution with the template tensor's standard
    deviation (0.01 where that is 0, as for an untrained up weight), so the adapter changes the
    picture about as much as a trained one.
    """
    import numpy as np
    from safetensors.numpy import load, save

    tensors = load(template)
    rng = np.random.default_rng(seed)
    fresh = {}
    for name, value in sorted(tensors.items()):
        spread = float(value.std()) or 0.01
        fresh[name] = rng.normal(0.0, spread, value.shape).astype(value.dtype)
    return save(fresh, metadata=_metadata(template))


def _metadata(data: bytes) -> dict[str, str] | None:
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__")


def user_names(count: int) -> list[str]:
    """`bench-u0000--m1`, ...: the registered users' model names, most popular first."""
    return [f"bench-u{i:04d}--m1" for i in range(count)]


def register_users(
    store: ArtifactStore,
    prefix: str,
    mode: str,
    lora: bytes,
    count: int,
    base_model: str,
    work_dir: Path,
    **config,
) -> Serving:
    """Register `count` users on the endpoint prefix for `mode` (skipping any there already):
    the first with `lora`, the others with synthetic copies. Returns the endpoint's `Serving`;
    `config` is the shared model's (`helpers.services.serving.render_shared_config`: e.g.
    `max_batch`, `cpu_threads`), which per-user models ignore."""
    packaging = packaging_for(mode)
    existing = set(store.list(prefix)) | set(store.list(adapter_prefix(prefix)))
    for i, name in enumerate(user_names(count)):
        if packaging.location(prefix, name) in existing:
            continue  # registered by an earlier run (names are never reused)
        user, model = name.split("--")
        path = work_dir / f"{name}.safetensors"
        path.write_bytes(lora if i == 0 else synthetic_adapter(lora, seed=i))
        packaging.publish(store, prefix, path, user, model, base_model)
        path.unlink()
    # The shared base caches every registered user's adapter (and a margin).
    config = {"cache_max_count": count + 24, **config}
    return packaging.serving(store, prefix, base_model, **config)


def rss_mb(pids: Sequence[int]) -> float:
    """Resident set size of processes `pids` together, in MiB (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return round(total / 1024, 1)


def _median_ms(seconds: Sequence[float]) -> float:
    return round(statistics.median(seconds) * 1000, 1)


def measure_mode(
    store: ArtifactStore,
    prefix: str,
    serving: Serving,
    work_dir: Path,
    user_counts: Sequence[int],
    steps: Sequence[int] = (20,),
    cold_users: int = 2,
    warm_repeats: int = 5,
    max_loaded_models: int = 4,
    load_users: int = 4,
    load_seconds: int = 20,
    load_steps: int = 1,
    zipf_s: float = 1.2,
    log: Callable[[str], None] = print,
) -> dict:
    """Latency, memory and load figures of one serving mode (see the module docstring)."""
    from helpers.infra.local.endpoint import LocalEndpoint
    from helpers.workshop.loadtest import run_load_test

    names = user_names(max(user_counts))
    needed = 1 + cold_users * len(steps)
    if len(names) < max(needed, 2):
        raise ValueError(f"user_counts must reach {max(needed, 2)} users for the latency phase")
    result: dict = {"mode": serving.mode}
    with LocalEndpoint(
        store, prefix, work_dir / "endpoint", max_loaded_models=max_loaded_models
    ) as endpoint:
        runtime = endpoint.runtime_client()

        def invoke(name: str, n_steps: int) -> float:
            started = time.perf_counter()
            serving.invoke(runtime, endpoint.name, name, PROMPT, num_inference_steps=n_steps)
            return time.perf_counter() - started

        result["endpoint_cold_s"] = round(invoke(names[0], steps[0]), 3)
        log(f"{serving.mode}: first request on the endpoint {result['endpoint_cold_s']} s")
        latency = {}
        next_user = 1
        for n_steps in steps:
            invoke(names[0], n_steps)
            warm = [invoke(names[0], n_steps) for _ in range(warm_repeats)]
            cold = []
            for name in names[next_user : next_user + cold_users]:
                cold.append(invoke(name, n_steps))
            next_user += cold_users
            pair = names[next_user - 2 : next_user]  # two ready users: alternate between them
            switch = [invoke(pair[i % 2], n_steps) for i in range(2 * warm_repeats)]
            latency[f"steps_{n_steps}"] = {
                "user_cold_ms": [round(s * 1000, 1) for s in cold],
                "user_cold_ms_median": _median_ms(cold),
                "warm_ms_median": _median_ms(warm),
                "switch_ms_median": _median_ms(switch),
                "cold_over_warm": round(statistics.median(cold) / statistics.median(warm), 2),
            }
            log(f"{serving.mode}: {n_steps} steps {latency[f'steps_{n_steps}']}")
        result["latency"] = latency

        endpoint.run(endpoint.cache.unload_all())
        memory, touched = [], 0
        for count in sorted(user_counts):
            wanted = min(count, max_loaded_models) if serving.loads_per_user else count
            while touched < wanted:
                invoke(names[touched], 1)
                touched += 1
            pids = endpoint.triton.stub_pids()
            memory.append(
                {
                    "registered_users": count,
                    "resident_users": touched,
                    "model_processes": len(pids),
                    "rss_mb": rss_mb(pids),
                }
            )
            log(f"{serving.mode}: memory {memory[-1]}")
        result["memory"] = memory

        # the load test starts with the endpoint up and only the most popular user ready
        endpoint.run(endpoint.cache.unload_all())
        invoke(names[0], load_steps)
        targets, shared_model = serving.load_test_targets(names)
        load = run_load_test(
            endpoint.url,
            endpoint.name,
            targets,
            work_dir / "loadtest",
            users=load_users,
            duration_s=load_seconds,
            zipf_s=zipf_s,
            steps=load_steps,
            shared_model=shared_model,
        )
        result["load_test"] = load.as_dict()
        log(f"{serving.mode}: load test {result['load_test']}")
    return result


def compare_serving_modes(
    store: ArtifactStore,
    bucket: str,
    work_dir: str | Path,
    lora_weights: str | Path,
    base_model: str,
    user_counts: Sequence[int] = (1, 10, 100, 1000),
    modes: Sequence[str] = SERVING_MODES,
    log: Callable[[str], None] = print,
    **options,
) -> dict:
    """Measure every serving mode in `modes` on this machine; the report as a JSON-able dict.

    Args:
        store (`ArtifactStore`): the local artifact store (the shared base reads adapters from
            its folders); users are registered under `s3://<bucket>/serving-modes/<mode>/`.
        bucket (`str`): the store's bucket.
        work_dir (`str` or `Path`): endpoints' logs, unpacked models, load-test CSV files.
        lora_weights (`str` or `Path`): a real `pytorch_lora_weights.safetensors` (user 0's,
            and the template of the synthetic ones).
        base_model (`str`): the base pipeline's directory.
        user_counts (`Sequence[int]`): registered-user counts of the memory figure; the largest
            is how many users are registered, and the load test spreads over them all.
        modes (`Sequence[str]`): which serving modes to measure, in order.
        log (`Callable[[str], None]`): progress lines.
        options: `measure_mode`'s other arguments (`steps`, `cold_users`, `warm_repeats`,
            `max_loaded_models`, `load_users`, `load_seconds`, `load_steps`, `zipf_s`).
    """
    for mode in modes:
        if mode not in SERVING_MODES:
            raise ValueError(f"modes must be among {SERVING_MODES}, got {mode!r}")
    if not user_counts or min(user_counts) < 1:
        raise ValueError(f"user_counts must be positive counts, got {list(user_counts)}")
    work_dir = Path(work_dir)
    lora = Path(lora_weights).read_bytes()
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "note": "CPU only; timings are noisy where other work shares the machine",
        },
        "parameters": {"user_counts": sorted(user_counts), **options},
        "adapter_bytes": len(lora),
        "modes": {},
    }
    for mode in modes:
        mode_dir = work_dir / mode
        mode_dir.mkdir(parents=True, exist_ok=True)
        prefix = f"s3://{bucket}/serving-modes/{mode}/models/"
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="register-") as tmp:
            serving = register_users(
                store, prefix, mode, lora, max(user_counts), base_model, Path(tmp)
            )
        log(f"{mode}: {max(user_counts)} users registered in {time.perf_counter() - started:.1f} s")
        report["modes"][mode] = measure_mode(
            store, prefix, serving, mode_dir, user_counts, log=log, **options
        )
    report["targets"] = check_targets(report)
    return report


def check_targets(report: dict) -> dict:
    """Issue 6's targets, from a report: cold <= 1.5x warm, memory growth per cached user
    <= 2x the adapter's size, no errors in the load test over every registered user."""
    shared = report["modes"].get("shared-base")
    if not shared:
        return {}
    ratios = {key: value["cold_over_warm"] for key, value in shared["latency"].items()}
    memory = shared["memory"]
    targets = {"shared_cold_over_warm": ratios}
    targets["shared_cold_within_1_5x_warm"] = all(r <= 1.5 for r in ratios.values())
    if len(memory) > 1 and memory[-1]["resident_users"] > memory[0]["resident_users"]:
        extra_users = memory[-1]["resident_users"] - memory[0]["resident_users"]
        growth = (memory[-1]["rss_mb"] - memory[0]["rss_mb"]) * 1024 * 1024 / extra_users
        targets["rss_growth_per_cached_user_bytes"] = round(growth)
        targets["growth_over_adapter_size"] = round(growth / report["adapter_bytes"], 2)
        targets["growth_within_2x_adapter"] = growth <= 2 * report["adapter_bytes"]
    load = shared["load_test"]
    targets["registered_users"] = memory[-1]["registered_users"]
    targets["load_test_failures"] = load["failures"]
    targets["load_test_without_errors"] = load["failures"] == 0 and load["requests"] > 0
    return targets


def summary_rows(report: dict) -> list[dict]:
    """One row per mode and figure, for a table (notebook or issue note)."""
    rows = []
    for mode, result in report["modes"].items():
        row = {"mode": mode, "endpoint first request (s)": result["endpoint_cold_s"]}
        for key, latency in result["latency"].items():
            steps = key.removeprefix("steps_")
            row[f"user cold, {steps} steps (ms)"] = latency["user_cold_ms_median"]
            row[f"warm, {steps} steps (ms)"] = latency["warm_ms_median"]
            row[f"switch users, {steps} steps (ms)"] = latency["switch_ms_median"]
        for point in result["memory"]:
            row[f"RSS, {point['registered_users']} users (MB)"] = point["rss_mb"]
        load = result["load_test"]
        row["load: requests/s"] = load["requests_per_second"]
        percentiles = (load["p50_ms"], load["p95_ms"], load["p99_ms"])
        row["load: p50 / p95 / p99 (ms)"] = " / ".join(str(p) for p in percentiles)
        row["load: failures"] = f"{load['failures']} of {load['requests']}"
        rows.append(row)
    return rows


def markdown_table(report: dict) -> str:
    """The summary as a markdown table, figures as rows and modes as columns."""
    rows = summary_rows(report)
    keys = list(dict.fromkeys(key for row in rows for key in row if key != "mode"))
    lines = ["| figure | " + " | ".join(row["mode"] for row in rows) + " |"]
    lines.append("|---|" + "---|" * len(rows))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(str(row.get(key, "")) for row in rows) + " |")
    return "\n".join(lines)


def plot_serving_comparison(report: dict):
    """Four panels: per-request latency, memory vs registered users, load-test throughput and
    load-test latency percentiles, one colour per mode."""
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(report["modes"])
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (latency_axis, memory_axis), (rate_axis, percentile_axis) = axes
    width = 0.8 / max(len(modes), 1)
    first_steps = next(iter(report["modes"][modes[0]]["latency"]))
    kinds = [("user_cold_ms_median", "user cold"), ("warm_ms_median", "warm")]
    kinds.append(("switch_ms_median", "switch users"))
    x = np.arange(len(kinds))
    for i, mode in enumerate(modes):
        latency = report["modes"][mode]["latency"][first_steps]
        latency_axis.bar(x + i * width, [latency[k] for k, _ in kinds], width, label=mode)
    latency_axis.set(
        xticks=x + width * (len(modes) - 1) / 2,
        xticklabels=[label for _, label in kinds],
        ylabel="ms (log)",
        yscale="log",
        title=f"Request latency, denoising steps: {first_steps.removeprefix('steps_')}",
    )
    latency_axis.legend(fontsize=8)
    for mode in modes:
        memory = report["modes"][mode]["memory"]
        memory_axis.plot(
            [m["registered_users"] for m in memory], [m["rss_mb"] for m in memory], "o-", label=mode
        )
    counts = sorted(
        {m["registered_users"] for mode in modes for m in report["modes"][mode]["memory"]}
    )
    memory_axis.set_xscale("log")
    memory_axis.set_xticks(counts, [str(count) for count in counts])
    memory_axis.set(
        xlabel="registered users",
        ylabel="RSS of model processes (MB)",
        title="Resident memory, after each user's first request",
    )
    memory_axis.legend(fontsize=8)
    loads = [report["modes"][mode]["load_test"] for mode in modes]
    colours = [f"C{i}" for i in range(len(modes))]
    rate_axis.bar(modes, [load["requests_per_second"] for load in loads], color=colours)
    rate_axis.set(ylabel="requests/s", title="Zipf load test: throughput")
    for j, (key, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        positions = np.arange(len(modes)) + j * 0.25
        percentile_axis.bar(positions, [load[key] for load in loads], 0.25, label=label)
    percentile_axis.set(
        xticks=np.arange(len(modes)) + 0.25,
        xticklabels=modes,
        ylabel="ms (log)",
        yscale="log",
        title="Zipf load test: latency percentiles",
    )
    percentile_axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
