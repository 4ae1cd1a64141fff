"""Per-user Triton models vs one shared base with an adapter cache, on this machine, in one run.

Trains a short LoRA on the committed tiny base (or takes `--lora`), registers `max(--users)`
users in each mode (the others with synthetic LoRAs of the same shapes), and measures per mode,
on a real Triton + router (`helpers.workshop.serving_comparison`): a user's cold and warm
request and a
switch between two ready users; the resident memory of the model processes with each of
`--users` users served; and the Zipf load test over all registered users. Writes JSON and a PNG
plot (same name, `.png`) and prints a markdown table:

    python benchmarks/serving_modes.py --out outputs/benchmarks/serving_modes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import BUCKET, local_store, train_lora, write_report


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def main() -> None:
    from helpers.domain.serving import SERVING_MODES
    from helpers.settings import DEFAULT_BASE_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="The JSON report; the plot goes beside it.")
    parser.add_argument("--lora", help="A pytorch_lora_weights.safetensors (default: train one).")
    parser.add_argument("--base-model", default=str(DEFAULT_BASE_MODEL))
    parser.add_argument("--users", type=_ints, default=(1, 10, 100, 1000), help="e.g. 1,10,100")
    parser.add_argument("--steps", type=_ints, default=(1, 20), help="Latency phase steps.")
    parser.add_argument("--modes", default=",".join(SERVING_MODES))
    parser.add_argument("--cold-users", type=int, default=3)
    parser.add_argument("--warm-repeats", type=int, default=10)
    parser.add_argument("--max-loaded-models", type=int, default=4, help="Per-user budget.")
    parser.add_argument("--load-users", type=int, default=4, help="Concurrent load-test clients.")
    parser.add_argument("--load-seconds", type=int, default=60)
    parser.add_argument("--load-steps", type=int, default=1)
    parser.add_argument("--zipf-s", type=float, default=1.2)
    args = parser.parse_args()

    from helpers.workshop.serving_comparison import (
        compare_serving_modes,
        markdown_table,
        plot_serving_comparison,
    )

    work, store = local_store("serving-modes-")
    lora = Path(args.lora) if args.lora else train_lora(args.base_model, work)
    started = time.perf_counter()
    report = compare_serving_modes(
        store,
        BUCKET,
        work / "runs",
        lora,
        args.base_model,
        user_counts=args.users,
        modes=args.modes.split(","),
        steps=args.steps,
        cold_users=args.cold_users,
        warm_repeats=args.warm_repeats,
        max_loaded_models=args.max_loaded_models,
        load_users=args.load_users,
        load_seconds=args.load_seconds,
        load_steps=args.load_steps,
        zipf_s=args.zipf_s,
        log=lambda line: print(line, flush=True),
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = write_report(report, args.out, plot_serving_comparison(report))
    print(json.dumps(report["targets"], indent=2))
    print(markdown_table(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
