"""Distinct users' adapters one request at a time (hot-swap slot) vs in one denoising batch.

In this process, on the committed tiny base at 64 px: for each step count and batch size, a
batch of requests from that many distinct users (drawn in turn from `--users` registered
users, more than the batch pool holds, so batches bring in adapters as a busy endpoint's do) is
served (a) as the shared-base model serves today, one request after another, each swapping
its user's LoRA into the one slot (`TritonPythonModel.generate_for`), and (b) as one batch
(`BatchedGenerator`), its LoRAs applied by PEFT's mixed-batch forward (`adapter_names` per
sample) or (c) by two batched matmuls per layer (`GroupedAdapters`). All run with the
model's one torch thread. Writes JSON and prints a markdown table with the ratios:

    python benchmarks/batched_adapters.py --out outputs/benchmarks/batched_adapters.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import train_lora


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def parse_args(input_args=None) -> argparse.Namespace:
    from helpers.settings import DEFAULT_BASE_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="The JSON report.")
    parser.add_argument("--lora", help="A LoRA whose shapes the users' adapters take.")
    parser.add_argument("--base-model", default=str(DEFAULT_BASE_MODEL))
    parser.add_argument("--steps", type=_ints, default=(1, 20), help="e.g. 1,20")
    parser.add_argument("--batches", type=_ints, default=(1, 4, 16), help="e.g. 1,4,16")
    parser.add_argument("--users", type=int, default=48, help="Registered users (adapters).")
    parser.add_argument("--pool", type=int, default=16, help="Adapters resident for batching.")
    parser.add_argument("--guidance", type=float, default=2.0, help="> 1 doubles the batch.")
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--seconds", type=float, default=4.0, help="Least time per measurement.")
    args = parser.parse_args(input_args)
    if max(args.batches) > min(args.pool, args.users):
        parser.error(f"--batches up to {max(args.batches)} need --pool and --users at least that")
    return args


def register_users(template: bytes, count: int, folder: Path) -> list[str]:
    """`count` users' distinct adapters (`template`'s shapes, random values) in `folder`."""
    from helpers.workshop.serving_comparison import synthetic_adapter, user_names

    folder.mkdir(parents=True, exist_ok=True)
    names = user_names(count)
    for seed, name in enumerate(names):
        (folder / f"{name}.safetensors").write_bytes(synthetic_adapter(template, seed))
    return names


def load_models(base_model: str, folder: Path, pool: int):
    """(the model's module, today's shared model, batched generators by LoRA path), each with
    its own pipeline."""
    from helpers.services.packaging import load_model_code
    from helpers.services.serving import SHARED_MODEL_CODE

    module = load_model_code(SHARED_MODEL_CODE / "1" / "model.py", "shared_model_bench")
    parameters = {"base_model": base_model, "adapter_source": str(folder)}
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    today = module.TritonPythonModel()
    today.initialize({"model_config": json.dumps(config), "model_name": "shared-bench"})
    generators = {}
    for lora in module.LORA_PATHS:
        bare = module.sd.TritonPythonModel()
        bare.name = f"batched-bench-{lora}"
        bare.use(bare.load_base({"base_model": base_model}), {})
        cache = module.AdapterCache(module.DirectorySource(str(folder)), 1024, 1 << 30)
        generators[lora] = module.BatchedGenerator(bare.pipe, cache, pool, today.slot.rank, lora)
    return module, today, generators


def measure(serve, batch: int, users: list[str], warm: int, least_seconds: float) -> dict:
    """Serve batches of `batch` distinct users, taken in turn, for at least `least_seconds`
    (and two batches), after the first `warm` users; images per second and seconds per batch.
    """
    for start in range(0, warm, batch):  # warm-up: the pool's first loads, the allocator
        serve(users[start : min(start + batch, warm)])
    turn, batches, images, durations = warm, 0, 0, []
    started = time.perf_counter()
    while batches < 2 or time.perf_counter() - started < least_seconds:
        names = [users[(turn + i) % len(users)] for i in range(batch)]
        turn += batch
        begun = time.perf_counter()
        images += serve(names)
        durations.append(time.perf_counter() - begun)
        batches += 1
    seconds = time.perf_counter() - started
    durations.sort()
    return {
        "batches": batches,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 3),
        "batch_seconds_p50": round(durations[len(durations) // 2], 4),
        "batch_seconds_max": round(durations[-1], 4),
    }


def main(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    work = Path(tempfile.mkdtemp(prefix="batched-adapters-"))
    lora = Path(args.lora) if args.lora else train_lora(args.base_model, work, steps=2)
    users = register_users(lora.read_bytes(), args.users, work / "adapters")
    module, today, generators = load_models(args.base_model, work / "adapters", args.pool)
    results, ratios = [], {}
    for steps in args.steps:
        raw = {"prompt": [b"a photo of sks toy"], "num_inference_steps": [steps]}
        raw.update(width=[args.size], height=[args.size], guidance_scale=[args.guidance])
        arrays = {name: np.array(value) for name, value in raw.items()}
        values = module.parse_inputs(arrays, today.defaults)

        def one_at_a_time(names, values=values):
            return sum(len(today.generate_for(name, values)[0]) for name in names)

        def as_one_batch(names, values=values, lora="peft"):
            outcome = generators[lora].generate([(name, values) for name in names])
            failed = [result for result in outcome if isinstance(result, Exception)]
            if failed:
                raise failed[0]
            return sum(len(images) for images in outcome)

        modes = {"one at a time": one_at_a_time}
        for lora in generators:
            modes[f"batched {lora}"] = lambda names, lora=lora: as_one_batch(names, lora=lora)
        for batch in args.batches:
            row = {}
            for mode, serve in modes.items():
                row[mode] = measure(serve, batch, users, args.pool, args.seconds)
                results.append({"steps": steps, "batch": batch, "mode": mode, **row[mode]})
                print(json.dumps(results[-1]), flush=True)
            today_rate = row["one at a time"]["images_per_s"]
            for mode in list(modes)[1:]:
                key = f"{mode} / one at a time"
                ratio = round(row[mode]["images_per_s"] / today_rate, 2)
                ratios.setdefault(key, {})[f"steps={steps},batch={batch}"] = ratio
    report = {
        "benchmark": "batched_adapters",
        "base_model": args.base_model,
        "size": args.size,
        "guidance_scale": args.guidance,
        "registered_users": args.users,
        "pool_size": args.pool,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "results": results,
        "modes": {
            "one at a time": "today's shared base: each request swaps its LoRA into the one slot",
            "batched peft": "one batch, PEFT's mixed-batch LoRA forward (adapter_names)",
            "batched grouped": "one batch, each layer's LoRAs as two batched matmuls (bmm)",
        },
        "throughput_ratios": ratios,
        "hot_swap_slot": today.stats(),
        "batched_pools": {
            lora: {**generator.pool.stats(), "batches": generator.batches}
            for lora, generator in generators.items()
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown_table(report))
    print(f"wrote {out}")
    return report


def markdown_table(report: dict) -> str:
    """Images/s per mode, each batched mode's ratio to one at a time, and its batch's p50."""
    rows: dict[tuple, dict] = {}
    for result in report["results"]:
        rows.setdefault((result["steps"], result["batch"]), {})[result["mode"]] = result
    modes = list(next(iter(rows.values())))
    head = "| steps | batch | " + " | ".join(f"{mode} (img/s)" for mode in modes)
    head += " | " + " | ".join(f"{mode} ratio | {mode} batch p50 (s)" for mode in modes[1:])
    lines = [head + " |", "|---" * (2 + len(modes) + 2 * len(modes[1:])) + "|"]
    for (steps, batch), results in rows.items():
        today = results[modes[0]]["images_per_s"]
        cells = [str(steps), str(batch)] + [str(results[m]["images_per_s"]) for m in modes]
        for mode in modes[1:]:
            ratio = round(results[mode]["images_per_s"] / today, 2)
            cells += [str(ratio), str(results[mode]["batch_seconds_p50"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(parse_args())
