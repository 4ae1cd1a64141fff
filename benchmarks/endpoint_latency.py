"""The local multi-model endpoint: cold and warm invocations, router overhead, memory per model.

In one run, on one machine:

* packages a short-trained LoRA as `--models` user models, starts Triton + router;
* **cold**: the first invocation of each model (download, unpack, load, generate);
* **warm**: `--repeats` invocations of one loaded model through the router, and the same
  request body sent straight to Triton's own SageMaker invoke route with the same HTTP client,
  interleaved; the router's overhead is the difference of the medians and their ratio;
* **memory**: resident set size of each loaded model's stub process;
* **load test**: 4 locust clients, Zipf over the models, all of them loaded (the budget fits
  them all), so the figure is the endpoint's warm throughput on this machine.

    python benchmarks/endpoint_latency.py --out outputs/benchmarks/endpoint_latency.json
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

from common import train_lora

PROMPT = "a photo of sks toy"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--steps", type=int, default=1, help="Denoising steps per request.")
    parser.add_argument("--load-seconds", type=int, default=20, help="Zipf load test length.")
    args = parser.parse_args()

    import httpx

    from helpers.domain.generation import build_request, invoke_model, parse_response
    from helpers.infra.local.endpoint import LocalEndpoint
    from helpers.infra.local.mme_router import infer_headers
    from helpers.infra.local.store import LocalArtifactStore
    from helpers.services.packaging import build_archive
    from helpers.settings import DEFAULT_BASE_MODEL
    from helpers.workshop.loadtest import run_load_test

    work = Path(tempfile.mkdtemp(prefix="endpoint-bench-"))
    lora = train_lora(DEFAULT_BASE_MODEL, work)
    store = LocalArtifactStore(work / "store")
    store.create_bucket("workshop-bench")
    prefix = "s3://workshop-bench/endpoints/bench/models/"
    names = [f"bench-user-{i}--m1" for i in range(args.models)]
    for name in names:
        archive = build_archive(
            name,
            lora,
            str(DEFAULT_BASE_MODEL),
            work / f"{name}.tar.gz",
        )
        store.put_file(f"{prefix}{name}.tar.gz", archive)

    body, content_type = build_request(PROMPT, num_inference_steps=args.steps)
    headers = {"Content-Type": content_type}
    with LocalEndpoint(store, prefix, work / "endpoint", max_loaded_models=args.models) as endpoint:
        runtime = endpoint.runtime_client()
        cold = []
        for name in names:
            started = time.perf_counter()
            invoke_model(
                runtime, endpoint.name, f"{name}.tar.gz", PROMPT, num_inference_steps=args.steps
            )
            cold.append(time.perf_counter() - started)

        target = names[0]
        router_headers = {**headers, "X-Amzn-SageMaker-Target-Model": f"{target}.tar.gz"}
        via_router, direct, via_boto3 = [], [], []
        router_url = f"{endpoint.url}/endpoints/{endpoint.name}/invocations"
        # Triton's own inference API, with the key only the router is given.
        triton_url = f"{endpoint.triton.url}/v2/models/{target}/infer"
        triton_headers = {**infer_headers(content_type), **endpoint.triton.restricted_headers}
        with httpx.Client(timeout=120, trust_env=False) as http:
            for _ in range(3):  # warm both paths and the connections
                http.post(router_url, content=body, headers=router_headers)
                http.post(triton_url, content=body, headers=triton_headers)
            for repeat in range(args.repeats):
                # alternate which path goes first, so neither gains from its place in a pair
                paths = [
                    ("router", router_url, router_headers),
                    ("direct", triton_url, triton_headers),
                ]
                for path, url, path_headers in paths[:: 1 if repeat % 2 else -1]:
                    started = time.perf_counter()
                    answer = http.post(url, content=body, headers=path_headers)
                    seconds = time.perf_counter() - started
                    assert answer.status_code == 200, answer.text
                    (via_router if path == "router" else direct).append(seconds)
                    if path == "router":
                        assert parse_response(answer.content, answer.headers["Content-Type"])
                started = time.perf_counter()
                invoke_model(
                    runtime,
                    endpoint.name,
                    f"{target}.tar.gz",
                    PROMPT,
                    num_inference_steps=args.steps,
                )
                via_boto3.append(time.perf_counter() - started)
        load_test = run_load_test(
            endpoint.url,
            endpoint.name,
            [f"{name}.tar.gz" for name in names],
            work / "loadtest",
            users=4,
            duration_s=args.load_seconds,
            steps=args.steps,
        ).as_dict()
        memory = {
            name: round(sum(rss_mb(pid) for pid in endpoint.triton.model_stub_pids(name)), 1)
            for name in names
        }

    router_ms = statistics.median(via_router) * 1000
    direct_ms = statistics.median(direct) * 1000
    # each router call is paired with a direct call next to it: the median difference of the
    # pairs is steadier than the difference of the medians on a noisy machine
    paired_ms = statistics.median(r - d for r, d in zip(via_router, direct, strict=True)) * 1000
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "denoising_steps": args.steps,
        "models": args.models,
        "cold_invoke_seconds": [round(seconds, 3) for seconds in cold],
        "warm_invoke_ms_median": {
            "router": round(router_ms, 2),
            "triton_direct": round(direct_ms, 2),
            "boto3_through_router": round(statistics.median(via_boto3) * 1000, 2),
        },
        "router_overhead_ms": round(router_ms - direct_ms, 2),
        "router_overhead_ms_paired_median": round(paired_ms, 2),
        "router_over_direct": round(router_ms / direct_ms, 4),
        "stub_rss_mb_per_model": memory,
        "load_test_all_models_loaded": load_test,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
