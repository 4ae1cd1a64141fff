"""The capacity model (`helpers.workshop.capacity`) against a real load test on this machine.

Per-user serving on a real Triton + router (`helpers.infra.local.endpoint`), `--targets` users
(synthetic LoRAs beside one trained one, as `benchmarks/serving_modes.py` registers them):

1. **calibrate**: a warm request's time (one model, again and again), a model load's time
   (first requests for fresh models, less the warm time; and one that must evict first, as
   every miss under load does), how many requests the machine runs in parallel (two fresh
   models' loads at once against one, and 1 where a warm request sent as a load starts waits
   for that load), the clients' think time (the gaps between one client's requests in the
   first load test), and the seconds per training step of the LoRA trained here;
2. **measure**: for each model budget (`--budgets`, the router's `max_loaded_models`), start the
   endpoint, load the `budget` most popular models (the LRU's steady state, roughly), then run
   the Zipf load test (`helpers.workshop.loadtest`) for each client count (`--clients`);
3. **compare**: Che's hit ratio for `budget` models over the Zipf users, and the closed-loop
   throughput (`capacity.predict_local`), against the measured ones; also an exact LRU replay
   of the recorded request sequence (how far the router is from an LRU, apart from sampling)
   and the throughput predicted from the measured hit ratio (the queueing part alone).

Writes JSON and a PNG beside it, and prints a markdown table (about 7 minutes on 2 cores):

    python benchmarks/capacity_model.py --out outputs/benchmarks/capacity_model.json

`--reanalyse REPORT` computes a report's predictions again from its calibration, measuring
nothing (after a change to the model).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from common import train_lora

PROMPT = "a photo of sks toy"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def _relative(predicted: float, measured: float) -> float | None:
    return round((predicted - measured) / measured, 3) if measured else None


def _requests(out_dir: Path) -> list[dict]:
    with (out_dir / "requests.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    return sorted(rows, key=lambda row: float(row["time"]))


def think_time(rows: list[dict]) -> float:
    """One client's median gap between an answer and its next request (seconds)."""
    gaps = []
    for before, after in itertools.pairwise(rows):
        end = float(before["time"]) + float(before["latency_ms"]) / 1000
        gaps.append(max(float(after["time"]) - end, 0.0))
    return statistics.median(gaps) if gaps else 0.0


def unet_size(base_model: str, resolution: int = 64) -> tuple[int, int]:
    """The UNet's parameter count and its latent positions at `resolution` pixels."""
    import numpy as np
    from safetensors import safe_open

    base = Path(base_model)
    with safe_open(str(base / "unet" / "diffusion_pytorch_model.safetensors"), "np") as weights:
        names = weights.keys()  # a safe_open is not iterable itself
        params = sum(int(np.prod(weights.get_slice(k).get_shape())) for k in names)
    vae = json.loads((base / "vae" / "config.json").read_text())
    side = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    return params, side * side


def calibrate(endpoint, serving, names: list[str], repeats: int, log) -> dict:
    """Warm and load times on `endpoint`, how many loads the machine runs in parallel, a load
    that evicts (the budget must be 3 + `repeats` // 3: full just before that one), and a warm
    request sent as a load starts: the requests the machine runs in parallel (`servers`) are
    the loads' speed-up, or 1 where that request waited for the load."""
    from concurrent.futures import ThreadPoolExecutor

    runtime = endpoint.runtime_client()

    def invoke(name: str) -> float:
        started = time.perf_counter()
        serving.invoke(runtime, endpoint.name, name, PROMPT, num_inference_steps=1)
        return time.perf_counter() - started

    first = invoke(names[0])
    invoke(names[0])
    warm = [invoke(names[0]) for _ in range(repeats)]
    fresh = 1 + max(repeats // 3, 2)
    cold = [invoke(name) for name in names[1:fresh]]
    warm_s = statistics.median(warm)
    load_s = statistics.median(cold) - warm_s
    # two fresh models at once: 2 x one load's time over the pair's is the parallel speed-up
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(invoke, names[fresh : fresh + 2]))
    pair_s = time.perf_counter() - started
    # the endpoint is full now: one more fresh model waits for the LRU one's unload first, as
    # every miss of the load test does
    evicting = invoke(names[fresh + 2])
    # a request to a loaded model sent as another model's load starts: on Triton 2.51 here it
    # waits for that whole load, so loads and requests do not run in parallel under load
    invoke(names[fresh + 2])
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(invoke, names[fresh + 3])
        at_load_start = invoke(names[fresh + 2])
        loading.result()
    result = {
        "endpoint_first_request_s": round(first, 3),
        "warm_s": round(warm_s, 4),
        "cold_s": [round(s, 3) for s in cold],
        "load_s": round(load_s, 3),
        "two_loads_at_once_s": round(pair_s, 3),
        "parallel_speedup": round(min(max(2 * statistics.median(cold) / pair_s, 1.0), 2.0), 2),
        "evicting_cold_s": round(evicting, 3),
        # what a miss costs in the load tests, where the budget is always full
        "miss_s": round(evicting - warm_s, 3),
        "warm_at_a_load_start_s": round(at_load_start, 3),
    }
    # requests in parallel: the loads' speed-up, unless a load holds up the other requests
    blocked = at_load_start > 0.5 * load_s
    result["servers"] = 1.0 if blocked else result["parallel_speedup"]
    log(f"calibration: {result}")
    return result


def main() -> None:
    from helpers.settings import DEFAULT_BASE_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="The JSON report; the plot goes beside it.")
    parser.add_argument("--lora", help="A pytorch_lora_weights.safetensors (default: train one).")
    parser.add_argument("--base-model", default=str(DEFAULT_BASE_MODEL))
    parser.add_argument("--targets", type=int, default=12, help="Registered users (Zipf ranks).")
    parser.add_argument("--zipf-s", type=float, default=1.2)
    parser.add_argument("--budgets", type=_ints, default=(2, 6), help="max_loaded_models, e.g. 2,6")
    parser.add_argument("--clients", type=_ints, default=(1, 4), help="Load-test clients, e.g. 1,4")
    parser.add_argument("--seconds", type=int, default=75, help="Each load test's duration.")
    parser.add_argument("--repeats", type=int, default=9, help="Calibration's warm requests.")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument(
        "--reanalyse",
        help="A report this script wrote: compute its predictions again (no measuring).",
    )
    args = parser.parse_args()
    if args.reanalyse:
        write(analyse(json.loads(Path(args.reanalyse).read_text())), Path(args.out))
        return
    if min(args.budgets) < 1 or max(args.budgets) >= args.targets:
        parser.error("--budgets must be between 1 and --targets - 1")
    fresh = 1 + max(args.repeats // 3, 2)
    if max(args.budgets) != fresh + 2 or args.targets < fresh + 4:
        parser.error(
            f"calibration fills the largest budget with {fresh + 2} models, then evicts: "
            f"the largest of --budgets must be {fresh + 2}, --targets at least {fresh + 4}"
        )

    from helpers.infra.local.endpoint import LocalEndpoint
    from helpers.infra.local.store import LocalArtifactStore
    from helpers.workshop.capacity import lru_replay
    from helpers.workshop.capacity_prices import training_cost
    from helpers.workshop.loadtest import run_load_test
    from helpers.workshop.serving_comparison import register_users, user_names

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="capacity-model-"))
    if args.lora:
        lora, summary = Path(args.lora), {}
    else:
        lora = train_lora(args.base_model, work, steps=args.train_steps)
        summary = json.loads((lora.parent / "training_summary.json").read_text())
    store = LocalArtifactStore(work / "store")
    store.create_bucket("workshop-bench")
    prefix = "s3://workshop-bench/capacity/per-user/models/"
    names = user_names(args.targets)
    serving = register_users(
        store, prefix, "per-user", lora.read_bytes(), args.targets, args.base_model, work
    )
    targets, _ = serving.load_test_targets(names)
    cores = os.cpu_count() or 1
    calibration: dict = {"cores": cores}
    runs = []
    # the largest budget first: calibration's fresh loads must not evict
    for budget in sorted(args.budgets, reverse=True):
        with LocalEndpoint(
            store, prefix, work / f"endpoint-{budget}", max_loaded_models=budget
        ) as endpoint:
            if "warm_s" not in calibration:
                calibration.update(calibrate(endpoint, serving, names, args.repeats, log))
            # steady state, roughly: the `budget` most popular loaded, the most popular last
            endpoint.run(endpoint.cache.unload_all())
            runtime = endpoint.runtime_client()
            for name in reversed(names[:budget]):
                serving.invoke(runtime, endpoint.name, name, PROMPT, num_inference_steps=1)
            state = [targets[names.index(name)] for name in reversed(names[:budget])]
            for clients in sorted(args.clients):
                out_dir = work / f"load-b{budget}-c{clients}"
                result = run_load_test(
                    endpoint.url,
                    endpoint.name,
                    targets,
                    out_dir,
                    users=clients,
                    duration_s=args.seconds,
                    zipf_s=args.zipf_s,
                    steps=1,
                )
                load_average = os.getloadavg()[0]
                rows = _requests(out_dir)
                if clients == 1 and "think_s" not in calibration:
                    calibration["think_s"] = round(think_time(rows), 4)
                told = [row for row in rows if row["cache"] in ("hit", "miss")]
                # from the state the test started in (the pre-loaded models, or the run before)
                replay = lru_replay([row["target"] for row in rows], budget, initial=state)
                state = [row["target"] for row in rows]
                runs.append(
                    {
                        "budget": budget,
                        "clients": clients,
                        "requests": result.requests,
                        "failures": result.failures,
                        "measured_hit_ratio": result.cache_hit_ratio,
                        # a binomial standard error: how much sampling alone moves the ratio
                        "measured_hit_ratio_stderr": round(
                            math.sqrt(
                                (result.cache_hit_ratio or 0)
                                * (1 - (result.cache_hit_ratio or 0))
                                / max(len(told), 1)
                            ),
                            3,
                        ),
                        "lru_replay_hit_ratio": round(replay, 3),
                        "measured_requests_per_s": result.requests_per_second,
                        "p50_ms": result.p50_ms,
                        "p95_ms": result.p95_ms,
                        # a hit's median well above the calibrated warm time: requests queued
                        "hit_median_ms": result.warm_median_ms,
                        "miss_median_ms": result.cold_median_ms,
                        # other work on the machine: above the core count, ours were shared
                        "load_average_1min": round(load_average, 2),
                    }
                )
                log(f"budget {budget}, {clients} clients: {runs[-1]}")
    training = {}
    if summary.get("steps"):
        params, positions = unet_size(args.base_model)
        seconds_per_step = summary["train_seconds"] / summary["steps"]
        training = {
            "local_seconds_per_step": round(seconds_per_step, 4),
            "local_unet_params": params,
            "local_latent_positions": positions,
            "estimates": [
                estimate.__dict__
                for estimate in training_cost(
                    local_seconds_per_step=seconds_per_step,
                    local_unet_params=params,
                    local_latent_positions=positions,
                )
            ],
        }
    report = {
        "machine": {
            "cpu_count": cores,
            "platform": platform.platform(),
            "note": "CPU only; timings are noisy where other work shares the machine",
        },
        "parameters": {
            "targets": args.targets,
            "zipf_s": args.zipf_s,
            "budgets": list(args.budgets),
            "clients": list(args.clients),
            "seconds": args.seconds,
            "steps_per_request": 1,
        },
        "calibration": calibration,
        "runs": runs,
        "training": training,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write(analyse(report), Path(args.out))


def analyse(report: dict) -> dict:
    """Add the model's predictions to `report`'s runs (from its calibration), and whether
    they are within 20% of the measured values.

    Three hit ratios per run tell the errors apart: Che's approximation (the model), an exact
    LRU simulation of 200,000 Zipf draws (what an LRU would reach: Che's own error is the gap),
    and the LRU replay of the requests the test sent (the gap to the measured ratio is the
    router's departure from an LRU; the replay's gap to the simulation is the sample's luck).
    """
    import numpy as np

    from helpers.workshop.capacity import lru_replay, predict_local

    calibration, parameters = report["calibration"], report["parameters"]
    targets, zipf_s = parameters["targets"], parameters["zipf_s"]
    weights = np.arange(1, targets + 1, dtype=float) ** -zipf_s
    draws = np.random.default_rng(0).choice(targets, 200_000, p=weights / weights.sum())
    for run in report["runs"]:
        common = dict(
            targets=targets,
            zipf_s=zipf_s,
            budget=run["budget"],
            clients=run["clients"],
            warm_s=calibration["warm_s"],
            load_s=calibration["miss_s"],
            think_s=calibration.get("think_s", 0.0),
            cores=calibration.get("servers", calibration["parallel_speedup"]),
        )
        predicted = predict_local(**common)
        from_measured = predict_local(**common, hit_ratio=run["measured_hit_ratio"] or 0.0)
        run["predicted_hit_ratio"] = predicted.hit_ratio
        run["simulated_lru_hit_ratio"] = round(lru_replay(draws.tolist(), run["budget"]), 4)
        run["hit_ratio_difference"] = _relative(predicted.hit_ratio, run["measured_hit_ratio"])
        run["predicted_requests_per_s"] = predicted.requests_per_second
        run["predicted_servers"] = predicted.servers
        run["throughput_difference"] = _relative(
            predicted.requests_per_second, run["measured_requests_per_s"]
        )
        # the same, were the endpoint to run one request at a time (a load holding up the rest)
        serial = predict_local(**dict(common, cores=1.0))
        run["predicted_requests_per_s_one_server"] = serial.requests_per_second
        run["predicted_requests_per_s_from_measured_hits"] = from_measured.requests_per_second
        run["throughput_difference_from_measured_hits"] = _relative(
            from_measured.requests_per_second, run["measured_requests_per_s"]
        )
    runs = report["runs"]
    report["within_20_percent"] = {
        key: all(abs(run[key] or 0) <= 0.2 for run in runs)
        for key in (
            "hit_ratio_difference",
            "throughput_difference",
            "throughput_difference_from_measured_hits",
        )
    }
    return report


def write(report: dict, out: Path) -> None:
    """The JSON report, its plot beside it (`.png`), and the table printed."""
    from helpers.workshop.capacity import validation_markdown

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report).savefig(out.with_suffix(".png"), dpi=110)
    print(validation_markdown(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(report: dict):
    """Predicted against measured hit ratio and throughput, one point per run."""
    import matplotlib.pyplot as plt

    figure, (hits, rates) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in (
        (hits, "hit_ratio", "cache-hit ratio"),
        (rates, "requests_per_s", "requests/s"),
    ):
        measured = [r[f"measured_{key}"] for r in report["runs"]]
        predicted = [r[f"predicted_{key}"] for r in report["runs"]]
        for r, x, y in zip(report["runs"], measured, predicted, strict=True):
            error = r["measured_hit_ratio_stderr"] if key == "hit_ratio" else None
            colour = "C0" if r["clients"] == 1 else "C1"
            axis.errorbar(x, y, xerr=error, fmt="o", color=colour, capsize=3)
            axis.annotate(f"b{r['budget']} c{r['clients']}", (x, y), fontsize=8)
        top = max(measured + predicted) * 1.15
        axis.plot([0, top], [0, top], "k:", lw=1)
        axis.fill_between([0, top], [0, top * 0.8], [0, top * 1.2], color="grey", alpha=0.15)
        axis.set(xlabel=f"measured {label}", ylabel=f"predicted {label}", title=label)
        axis.set_xlim(0, top)
        axis.set_ylim(0, top)
    figure.suptitle(
        "Capacity model vs this machine (b: budget, c: clients; bars: one standard error; "
        "grey: within 20%)",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
