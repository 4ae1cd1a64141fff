"""The SaaS API's cost on top of the endpoint: a generation through the API vs the same
generation straight through the endpoint (boto3 sagemaker-runtime), in one run.

* starts the whole local service (`LocalApi`: API, onboarding worker, jobs, Triton + router)
  on the committed tiny base model, and onboards one user through HTTP (`--train-steps`);
* **onboarding**: seconds from `POST /v1/models` to AVAILABLE, per status;
* **generation**: `--repeats` pairs, interleaved: `POST /v1/generations` (auth, rate limit,
  model lookup, validation, PNG answer) and `invoke_model` on the user's endpoint model with
  the same parameters; the API's overhead is the difference of the medians and their ratio.

    python benchmarks/api_overhead.py --out outputs/benchmarks/api_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of sks toy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1, help="Denoising steps per generation.")
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args()

    from helpers.api.local import LocalApi
    from helpers.domain.generation import invoke_model
    from helpers.infra.local.triton_server import free_ports
    from helpers.settings import load_settings
    from helpers.workshop.demo_subjects import get_demo_subject, subject_images
    from helpers.workshop.personalization import png_bytes

    api_port, router, http, grpc, metrics = free_ports(5)
    settings = load_settings(
        work_dir=tempfile.mkdtemp(prefix="api-bench-"),
        api_port=api_port,
        router_port=router,
        triton_http_port=http,
        triton_grpc_port=grpc,
        triton_metrics_port=metrics,
    )
    images = subject_images(get_demo_subject("demo-ada"), count=4)
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    with LocalApi(
        settings, rate_limit="100000/minute", generation_rate_limit="100000/minute"
    ) as api:
        admin = api.client(api.admin_key)
        user = api.client(admin.post("/v1/users", json={"user_id": "bench"}).json()["api_key"])
        user.post("/v1/photos", files=files).raise_for_status()
        started = time.perf_counter()
        model_id = user.post("/v1/models", json={"max_train_steps": args.train_steps}).json()[
            "model_id"
        ]
        timeline = []
        while True:
            status = user.get(f"/v1/models/{model_id}").json()["status"]
            if not timeline or timeline[-1][0] != status:
                timeline.append((status, round(time.perf_counter() - started, 2)))
            if status in ("AVAILABLE", "FAILED"):
                break
            time.sleep(0.2)
        assert status == "AVAILABLE", timeline

        body = {"prompt": PROMPT, "num_inference_steps": args.steps}
        runtime = api.endpoint.runtime_client()
        target = f"bench--{model_id}.tar.gz"
        cold_started = time.perf_counter()
        user.post("/v1/generations", json=body).raise_for_status()
        cold = time.perf_counter() - cold_started
        through_api, direct = [], []
        for _ in range(args.repeats):
            for kind in ("api", "direct"):
                tick = time.perf_counter()
                if kind == "api":
                    user.post("/v1/generations", json=body).raise_for_status()
                    through_api.append(time.perf_counter() - tick)
                else:
                    invoke_model(
                        runtime, api.endpoint.name, target, PROMPT, num_inference_steps=args.steps
                    )
                    direct.append(time.perf_counter() - tick)

    api_median, direct_median = statistics.median(through_api), statistics.median(direct)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "train_steps": args.train_steps,
        "onboarding_timeline_s": timeline,
        "first_generation_s": round(cold, 3),
        "denoising_steps": args.steps,
        "repeats": args.repeats,
        "api_median_ms": round(api_median * 1000, 1),
        "direct_median_ms": round(direct_median * 1000, 1),
        "api_overhead_ms": round((api_median - direct_median) * 1000, 1),
        "api_over_direct": round(api_median / direct_median, 3),
        "paired_median_difference_ms": round(
            statistics.median(a - d for a, d in zip(through_api, direct, strict=True)) * 1000, 1
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
