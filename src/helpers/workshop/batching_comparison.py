"""Per-user models, the shared base one request at a time, and the shared base batching
requests: throughput and latency under one Zipf load, measured in one run on one machine.

For each mode of `BATCHING_MODES`, `compare_batching` registers the same users (the first
with a real LoRA, the others with `serving_comparison.synthetic_adapter` copies) under a prefix
of the mode's own, starts an endpoint of its own (a real Triton + router,
`helpers.infra.local.endpoint`), makes the most popular user ready, then runs
`helpers.workshop.loadtest`'s Zipf load test over every registered user, once for each step
count and each number of concurrent clients, one after another on that endpoint (as on a busy
endpoint, a test finds the models and adapters that earlier ones left). Each test gives
requests/s, p50/p95/p99 latency, failures and the cache-hit ratio.

The modes:

* **per-user**: one Triton model (a process with one torch thread) per user model, at most
  `max_loaded_models` loaded at once; a user whose model is not loaded waits for it to load.
* **shared base**: one model process serves every user, one request at a time, swapping each
  request's LoRA into its one slot.
* **shared base, batched**: the same model packaged with `max_batch` > 1: Triton's dynamic
  batcher hands it up to `max_batch` queued requests at once, which it denoises in one batch,
  each sample with its own user's LoRA.

Both shared modes run with the same torch threads (`threads`, every core by default, as
packaged), so that threads do not explain the difference between them.

`check_targets` reads the batching target off a report: with the most clients, at least twice
the one-at-a-time shared base's throughput at an equal or lower p95. `plot_batching` draws
throughput against p95 latency, `markdown_table` tabulates every test.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from helpers.ports.store import ArtifactStore
from helpers.services.serving import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_MS
from helpers.settings import PROJECT_ROOT
from helpers.workshop.serving_comparison import PROMPT, register_users, user_names

PER_USER, ONE_AT_A_TIME, BATCHED = "per-user", "shared base, one at a time", "shared base, batched"
#: The committed run of `benchmarks/batched_serving.py` that notebook 03 shows.
BENCHMARK_JSON = PROJECT_ROOT / "documentation" / "benchmarks" / "batched_serving.json"
#: The target: batched throughput over one at a time, with the most clients.
TARGET_RATIO = 2.0


def batching_modes(
    max_batch: int = DEFAULT_MAX_BATCH,
    threads: int | None = None,
    queue_delay_ms: float = DEFAULT_QUEUE_DELAY_MS,
) -> dict[str, tuple[str, dict]]:
    """The modes compared, in order: label -> (serving mode, shared model's config).

    Args:
        max_batch (`int`, defaults to 8, the packaged default): the batched shared base's
            largest batch.
        threads (`int`, *optional*): both shared modes' torch threads (default:
            `os.cpu_count()`, as packaged).
        queue_delay_ms (`float`, defaults to 0, the packaged default): the batched mode's
            longest wait in Triton's queue for a batch to fill.
    """
    threads = threads or os.cpu_count() or 1
    return {
        PER_USER: ("per-user", {}),
        ONE_AT_A_TIME: ("shared-base", {"max_batch": 1, "cpu_threads": threads}),
        BATCHED: (
            "shared-base",
            {"max_batch": max_batch, "cpu_threads": threads, "queue_delay_ms": queue_delay_ms},
        ),
    }


BATCHING_MODES = batching_modes()


def slug(label: str) -> str:
    """A mode label as a path segment: `"shared base, batched"` -> `"shared-base-batched"`."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def torch_threads(serving_mode: str, config: dict, max_loaded_models: int) -> dict[str, int]:
    """A mode's torch threads: per model process, and how many such processes at most."""
    if serving_mode == "per-user":
        return {"per_model_process": 1, "model_processes_at_most": max_loaded_models}
    # packaged without cpu_threads, the shared model takes every core
    threads = config.get("cpu_threads") or os.cpu_count() or 1
    return {"per_model_process": threads, "model_processes_at_most": 1}


def _image_side(base_model: str) -> int | None:
    """The base pipeline's picture side in pixels (64 for the committed tiny base), if it is a
    local directory."""
    folder = Path(base_model)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def _machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "note": "CPU only; timings are noisy where other work shares the machine",
    }


def check_inputs(
    users: int,
    clients: Sequence[int],
    steps: Sequence[int],
    seconds: int,
    max_batch: int,
    threads: int | None,
) -> None:
    """`ValueError` naming the first argument of `compare_batching` that cannot be measured."""
    if not isinstance(users, int) or users < 1:
        raise ValueError(f"users must be a count >= 1, got {users!r}")
    for name, values in (("clients", clients), ("steps", steps)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be positive integers, got {list(values)}")
    if not 1 <= seconds <= 600:
        raise ValueError(f"seconds must be 1-600, got {seconds}")
    if not isinstance(max_batch, int) or max_batch < 2:
        raise ValueError(
            f"max_batch must be an integer >= 2 (1 serves one at a time), got {max_batch!r}"
        )
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")


def _check_modes(modes: Sequence[str], known: Sequence[str]) -> None:
    if not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must name distinct modes, got {list(modes)}")
    for label in modes:
        if label not in known:
            raise ValueError(f"modes must be among {list(known)}, got {label!r}")


def compare_batching(
    store: ArtifactStore,
    bucket: str,
    work_dir: str | Path,
    lora_weights: str | Path,
    base_model: str,
    users: int = 1000,
    clients: Sequence[int] = (1, 4, 16),
    steps: Sequence[int] = (1, 20),
    seconds: int = 30,
    zipf_s: float = 1.2,
    max_batch: int = DEFAULT_MAX_BATCH,
    threads: int | None = None,
    modes: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    queue_delay_ms: float = DEFAULT_QUEUE_DELAY_MS,
    max_loaded_models: int = 4,
) -> dict:
    """Load-test each mode in `modes` on this machine; the report as a JSON-able dict.

    Args:
        store (`ArtifactStore`): the local artifact store (the shared base reads adapters from
            its folders); a mode's users are registered under
            `s3://<bucket>/batching/<slug>/models/` (kept: a second run with the same store
            skips registering them).
        bucket (`str`): the store's bucket.
        work_dir (`str` or `Path`): endpoints' logs, unpacked models, load-test CSV files.
        lora_weights (`str` or `Path`): a real `pytorch_lora_weights.safetensors` (the most
            popular user's, and the template of the synthetic ones).
        base_model (`str`): the base pipeline's directory.
        users (`int`, defaults to 1000): registered users; the load spreads over them all.
        clients (`Sequence[int]`, defaults to (1, 4, 16)): concurrent clients of each test.
        steps (`Sequence[int]`, defaults to (1, 20)): denoising steps per request of each test.
        seconds (`int`, defaults to 30): length of each test (1-600).
        zipf_s (`float`, defaults to 1.2): the Zipf exponent of user popularity.
        max_batch (`int`, defaults to 8): the batched shared base's largest batch (>= 2).
        threads (`int`, *optional*): both shared modes' torch threads (default:
            `os.cpu_count()`).
        modes (`Sequence[str]`, *optional*): labels of the modes to measure, in order (default:
            per-user, shared base one at a time, shared base batched).
        log (`Callable[[str], None]`): progress lines.
        queue_delay_ms (`float`, defaults to 0): the batched shared base's longest wait in
            Triton's queue for a batch to fill.
        max_loaded_models (`int`, defaults to 4): the per-user endpoint's loaded-model budget.
    """
    check_inputs(users, clients, steps, seconds, max_batch, threads)
    clients, steps = sorted(set(clients)), sorted(set(steps))
    available = batching_modes(max_batch, threads, queue_delay_ms)
    modes = list(available if modes is None else modes)
    _check_modes(modes, list(available))
    work_dir = Path(work_dir)
    lora = Path(lora_weights).read_bytes()
    names = user_names(users)
    report: dict = {
        "machine": _machine(),
        "parameters": {
            "users": users,
            "clients": clients,
            "steps": steps,
            "seconds": seconds,
            "zipf_s": zipf_s,
            "max_batch": max_batch,
            "queue_delay_ms": queue_delay_ms,
            "max_loaded_models": max_loaded_models,
            "image_px": _image_side(base_model),
        },
        "modes": {},
    }
    for label in modes:
        serving_mode, config = available[label]
        report["modes"][label] = _measure_mode(
            store,
            f"s3://{bucket}/batching/{slug(label)}/models/",
            label,
            serving_mode,
            config,
            lora,
            names,
            base_model,
            work_dir / slug(label),
            clients,
            steps,
            seconds,
            zipf_s,
            max_loaded_models,
            log,
        )
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = check_targets(report)
    return report


def _measure_mode(
    store: ArtifactStore,
    prefix: str,
    label: str,
    serving_mode: str,
    config: dict,
    lora: bytes,
    names: list[str],
    base_model: str,
    mode_dir: Path,
    clients: list[int],
    steps: list[int],
    seconds: int,
    zipf_s: float,
    max_loaded_models: int,
    log: Callable[[str], None],
) -> dict:
    """One mode's registration, endpoint and load tests (see the module docstring)."""
    from helpers.infra.local.endpoint import LocalEndpoint
    from helpers.workshop.loadtest import run_load_test

    mode_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="register-") as tmp:
        serving = register_users(
            store, prefix, serving_mode, lora, len(names), base_model, Path(tmp), **config
        )
    result: dict = {
        "serving_mode": serving_mode,
        "config": config,
        "torch_threads": torch_threads(serving_mode, config, max_loaded_models),
        "endpoint_record": serving.record(),
        "registration_s": round(time.perf_counter() - started, 1),
        "runs": [],
    }
    log(f"{label}: {len(names)} users registered in {result['registration_s']} s")
    with LocalEndpoint(
        store, prefix, mode_dir / "endpoint", max_loaded_models=max_loaded_models
    ) as endpoint:
        runtime = endpoint.runtime_client()
        started = time.perf_counter()
        serving.invoke(runtime, endpoint.name, names[0], PROMPT, num_inference_steps=steps[0])
        result["first_request_s"] = round(time.perf_counter() - started, 2)
        for n_steps in steps[1:]:  # the most popular user ready at every step count
            serving.invoke(runtime, endpoint.name, names[0], PROMPT, num_inference_steps=n_steps)
        targets, shared_model = serving.load_test_targets(names)
        for n_steps in steps:
            for n_clients in clients:
                load = run_load_test(
                    endpoint.url,
                    endpoint.name,
                    targets,
                    mode_dir / f"steps-{n_steps}-clients-{n_clients}",
                    users=n_clients,
                    duration_s=seconds,
                    zipf_s=zipf_s,
                    steps=n_steps,
                    shared_model=shared_model,
                )
                run = {
                    "steps": n_steps,
                    "clients": n_clients,
                    "requests_per_second": load.requests_per_second,
                    "p50_ms": load.p50_ms,
                    "p95_ms": load.p95_ms,
                    "p99_ms": load.p99_ms,
                    "requests": load.requests,
                    "failures": load.failures,
                    "cache_hit_ratio": load.cache_hit_ratio,
                }
                result["runs"].append(run)
                log(f"{label}: {run}")
    return result


def find_run(result: dict, steps: int, clients: int) -> dict | None:
    """A mode's load test at `steps` and `clients` (None if it did not run)."""
    for run in result["runs"]:
        if run["steps"] == steps and run["clients"] == clients:
            return run
    return None


def check_targets(report: dict) -> dict:
    """The batching target, per step count, from a report: with the most clients, the batched
    shared base serves at least `TARGET_RATIO` times the one-at-a-time shared base's requests/s
    at an equal or lower p95, without failures. Empty where either mode is missing.

    Returns:
        `{"clients": N, "steps_<s>": {"throughput_ratio", "p95_not_higher", "met", ...}, ...,
        "met": every step count's}`.
    """
    one_at_a_time, batched = report["modes"].get(ONE_AT_A_TIME), report["modes"].get(BATCHED)
    if not one_at_a_time or not batched:
        return {}
    clients = max(report["parameters"]["clients"])
    targets: dict = {"clients": clients, "ratio_wanted": TARGET_RATIO}
    verdicts = []
    for n_steps in report["parameters"]["steps"]:
        before = find_run(one_at_a_time, n_steps, clients)
        after = find_run(batched, n_steps, clients)
        if before is None or after is None:
            continue
        ratio = (
            after["requests_per_second"] / before["requests_per_second"]
            if before["requests_per_second"] > 0
            else None
        )
        p95_not_higher = after["p95_ms"] <= before["p95_ms"]
        served = after["requests"] > 0 and after["failures"] == 0
        met = ratio is not None and ratio >= TARGET_RATIO and p95_not_higher and served
        targets[f"steps_{n_steps}"] = {
            "one_at_a_time_requests_per_second": before["requests_per_second"],
            "batched_requests_per_second": after["requests_per_second"],
            "throughput_ratio": round(ratio, 2) if ratio is not None else None,
            "one_at_a_time_p95_ms": before["p95_ms"],
            "batched_p95_ms": after["p95_ms"],
            "p95_not_higher": p95_not_higher,
            "batched_failures": after["failures"],
            "met": met,
        }
        verdicts.append(met)
    targets["met"] = bool(verdicts) and all(verdicts)
    return targets


def _threads_label(threads: dict[str, int]) -> str:
    per, processes = threads["per_model_process"], threads["model_processes_at_most"]
    text = f"{per} thread{'s' if per != 1 else ''}"
    return f"{text} x up to {processes} models" if processes > 1 else text


def _seconds(ms: float) -> str:
    return f"{ms / 1000:.3g}"


def markdown_table(report: dict) -> str:
    """Every load test as a markdown table: a row per (steps, clients), a column per mode
    (headed with its torch threads) holding requests/s and p50 / p95 / p99 latency in seconds,
    and the failures where there were any."""
    modes = report["modes"]
    headers = [f"{label} ({_threads_label(r['torch_threads'])})" for label, r in modes.items()]
    lines = ["| steps | clients | " + " | ".join(headers) + " |"]
    lines.append("|---|---|" + "---|" * len(modes))
    for n_steps in report["parameters"]["steps"]:
        for n_clients in report["parameters"]["clients"]:
            cells = []
            for result in modes.values():
                run = find_run(result, n_steps, n_clients)
                if run is None:
                    cells.append("")
                    continue
                percentiles = " / ".join(_seconds(run[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))
                cell = f"{run['requests_per_second']:.3g} req/s, {percentiles} s"
                if run["failures"]:
                    cell += f", {run['failures']} of {run['requests']} failed"
                cells.append(cell)
            lines.append(f"| {n_steps} | {n_clients} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_batching(report: dict):
    """Throughput against p95 latency, one panel per step count: a line per mode through its
    load tests, each point labelled with its number of concurrent clients. Up and to the left
    is better. Tests that served nothing have no p95 and are left out."""
    import matplotlib.pyplot as plt

    parameters = report["parameters"]
    all_steps = parameters["steps"]
    figure, axes = plt.subplots(1, len(all_steps), figsize=(max(6.5, 5.5 * len(all_steps)), 4.8))
    axes = axes if len(all_steps) > 1 else [axes]
    side = parameters.get("image_px")
    for axis, n_steps in zip(axes, all_steps, strict=True):
        latencies = []
        for i, (label, result) in enumerate(report["modes"].items()):
            points = [
                run
                for run in sorted(result["runs"], key=lambda run: run["clients"])
                if run["steps"] == n_steps and run["requests_per_second"] > 0 and run["p95_ms"] > 0
            ]
            xs = [run["p95_ms"] / 1000 for run in points]
            ys = [run["requests_per_second"] for run in points]
            latencies += xs
            axis.plot(xs, ys, "o-", color=f"C{i}", label=label)
            for run, x, y in zip(points, xs, ys, strict=True):
                axis.annotate(
                    str(run["clients"]),
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=8,
                    color=f"C{i}",
                )
        if latencies and max(latencies) > 10 * min(latencies):
            axis.set_xscale("log")
        picture = f", {side}x{side} px" if side else ""
        axis.set(
            title=f"{n_steps} denoising step{'s' if n_steps != 1 else ''}{picture}",
            xlabel="p95 latency (s)" + (" (log)" if axis.get_xscale() == "log" else ""),
            ylabel="requests/s",
        )
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(
        f"Zipf load over {parameters['users']} users: throughput against p95 latency\n"
        "(the number by a point: concurrent clients; up and to the left is better)",
        fontsize=10,
    )
    figure.tight_layout()
    return figure
