"""Per-user models, the shared base one request at a time, and batching requests, in one run.

Trains a short LoRA on the committed tiny base (or takes `--lora`), registers `--users` users
in each mode (the others with synthetic LoRAs of the same shapes), and runs a Zipf load test
over them all on a real Triton + router per mode, for each of `--steps` and `--clients`
(`helpers.workshop.batching_comparison`). Both shared modes run with `--threads` torch threads
(default: every core, as packaged). Writes JSON and a PNG plot of throughput against p95
latency (same name, `.png`), and prints the batching targets and a markdown table. About 12
minutes of every core with the defaults:

    python benchmarks/batched_serving.py --out outputs/benchmarks/batched_serving.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import BUCKET, local_store, train_lora, write_report


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def parse_args(input_args=None) -> argparse.Namespace:
    from helpers.services.serving import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_MS
    from helpers.settings import DEFAULT_BASE_MODEL
    from helpers.workshop.batching_comparison import BATCHING_MODES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="The JSON report; the plot goes beside it.")
    parser.add_argument("--lora", help="A pytorch_lora_weights.safetensors (default: train one).")
    parser.add_argument("--base-model", default=str(DEFAULT_BASE_MODEL))
    parser.add_argument("--users", type=int, default=1000, help="Registered users per mode.")
    parser.add_argument("--clients", type=_ints, default=(1, 4, 16), help="e.g. 1,4,16")
    parser.add_argument("--steps", type=_ints, default=(1, 20), help="e.g. 1,20")
    parser.add_argument("--seconds", type=int, default=30, help="Length of each load test.")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="Largest batch.")
    parser.add_argument(
        "--threads", type=int, help="Both shared modes' torch threads (default: every core)."
    )
    parser.add_argument(
        "--queue-delay-ms", type=float, default=DEFAULT_QUEUE_DELAY_MS, help="Batcher's wait."
    )
    parser.add_argument("--max-loaded-models", type=int, default=4, help="Per-user budget.")
    parser.add_argument("--zipf-s", type=float, default=1.2)
    parser.add_argument(
        "--modes",
        help='Mode labels to measure, separated by ";" (labels hold commas); default: '
        f'"{";".join(BATCHING_MODES)}".',
    )
    args = parser.parse_args(input_args)
    if args.max_batch < 2:
        parser.error(
            f"--max-batch must be at least 2 (1 serves one at a time), got {args.max_batch}"
        )
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not args.clients or not args.steps or min(args.clients + args.steps) < 1:
        parser.error("--clients and --steps must be positive integers")
    return args


def main(args: argparse.Namespace) -> None:
    from helpers.workshop.batching_comparison import (
        compare_batching,
        markdown_table,
        plot_batching,
    )

    work, store = local_store("batched-serving-")
    lora = Path(args.lora) if args.lora else train_lora(args.base_model, work)
    started = time.perf_counter()
    report = compare_batching(
        store,
        BUCKET,
        work / "runs",
        lora,
        args.base_model,
        users=args.users,
        clients=args.clients,
        steps=args.steps,
        seconds=args.seconds,
        zipf_s=args.zipf_s,
        max_batch=args.max_batch,
        threads=args.threads,
        modes=args.modes.split(";") if args.modes else None,
        log=lambda line: print(line, flush=True),
        queue_delay_ms=args.queue_delay_ms,
        max_loaded_models=args.max_loaded_models,
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = write_report(report, args.out, plot_batching(report))
    print(json.dumps(report["targets"], indent=2))
    print(markdown_table(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main(parse_args())
