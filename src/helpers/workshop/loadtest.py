"""Load-test the multi-model endpoint with locust (headless, bounded in time).

`load_test(endpoint, ...)` runs `helpers/workshop/locust_mme.py` in a locust subprocess (gevent
stays out of the notebook's kernel) against any `helpers.ports.endpoint.Endpoint`, while this
process samples `endpoint.metrics()` every `endpoint.metrics_period_s` seconds:

* an endpoint with a loopback `url` (the local router): locust's `FastHttpUser` posts to the
  runtime route there, and metrics come once a second, the router's own;
* any other (SageMaker): each simulated client calls `invoke_endpoint` through boto3, signed with
  this process's credentials, and reports the timed call to locust; metrics come from
  CloudWatch once a minute, minutes late, so a short test may record none (and SageMaker
  answers no cache header: a per-user model's request is neither a hit nor a miss there).
  Every request is a billed invocation of your endpoint.

`run_load_test(router_url, endpoint_name, ...)` is the same test of a router by its URL
(loopback only), sampling its `/metrics` once a second. Results land as CSV files in `out_dir`:

* `requests.csv`: every request (time, target, latency, status, cache hit, miss, or unknown);
* `locust_stats_history.csv`: locust's per-second latency percentiles and request rate;
* `metrics.csv`: loaded-model count and cumulative cache hits over time.

`plot_load_test` draws them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helpers.ports.endpoint import Endpoint

LOCUSTFILE = Path(__file__).with_name("locust_mme.py")
LOOPBACK = ("http://127.0.0.1", "http://localhost")
#: The locust user classes of `locust_mme.py`: plain HTTP to a router, or boto3.
HTTP_USER, BOTO3_USER = "EndpointClient", "Boto3EndpointClient"


@dataclass(frozen=True)
class LoadTestResult:
    """Where a run's CSV files are and its headline numbers."""

    out_dir: Path
    requests: int
    failures: int
    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cold_median_ms: float | None
    warm_median_ms: float | None
    #: Hits over requests told apart (None where no request was: SageMaker per-user models).
    cache_hit_ratio: float | None
    #: The most models loaded at a sample (None without samples: CloudWatch had none yet).
    max_loaded_models: int | None

    def as_dict(self) -> dict:
        values = dict(self.__dict__)
        values["out_dir"] = str(self.out_dir)
        return values


def _metrics(url: str) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/metrics", timeout=5) as answer:
        values = {}
        for line in answer.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def _sample_metrics(
    read: Callable[[], Mapping[str, float]], path: Path, stop: threading.Event, period: float = 1.0
) -> None:
    """Write `read()` to `path` every `period` seconds until `stop`, and once at the end if
    nothing was written before (a test shorter than CloudWatch's minute)."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["time", "loaded_models", "cache_hits", "invocations"])
        written, failed = False, None
        while True:
            stopped = stop.wait(period)
            if stopped and written:
                break
            try:
                values = read()
            except Exception as error:  # a failed sample is a gap in the plot, not a failure
                failed = failed or error
                values = None
            if values:
                writer.writerow(
                    [
                        round(time.time(), 3),
                        values.get("LoadedModelCount", 0),
                        values.get("ModelCacheHit_sum", 0),
                        values.get("ModelCacheHit_count", 0),
                    ]
                )
                file.flush()
                written = True
            if stopped:
                break
        if failed is not None and not written:
            warnings.warn(f"no metrics sampled: {failed}", stacklevel=1)


def _check(duration_s: int, targets: list[str]) -> None:
    if not 1 <= duration_s <= 600:
        raise ValueError(f"duration_s must be 1-600 seconds, got {duration_s}")
    if not targets:
        raise ValueError("targets must name at least one model")


def run_load_test(
    router_url: str,
    endpoint_name: str,
    targets: list[str],
    out_dir: str | Path,
    users: int = 4,
    duration_s: int = 30,
    zipf_s: float = 1.2,
    steps: int = 1,
    shared_model: str | None = None,
) -> LoadTestResult:
    """Run locust against a router by its URL for `duration_s` seconds; return the headline
    numbers (`load_test` takes any `Endpoint`).

    Args:
        router_url: the endpoint's router, `http://127.0.0.1:<port>` (loopback only).
        endpoint_name: the name in the invocation route.
        targets: the `TargetModel`s, most popular first (Zipf rank order).
        out_dir: where the CSV files go (created).
        users: concurrent simulated clients.
        duration_s: how long the test runs (1-600 seconds).
        zipf_s: the Zipf exponent; larger is more skewed.
        steps: denoising steps per request.
        shared_model: for shared-base serving, the shared model's name; `targets` are then
            the users' adapters (`<user>--<model_id>`), and a request is a miss when the model
            had to fetch its adapter.
    """
    if not router_url.startswith(LOOPBACK):
        raise ValueError(f"the load test only runs against loopback, got {router_url!r}")
    _check(duration_s, targets)
    return _run_locust(
        HTTP_USER,
        router_url,
        {},
        lambda: _metrics(router_url),
        1.0,
        endpoint_name=endpoint_name,
        targets=targets,
        out_dir=Path(out_dir),
        users=users,
        duration_s=duration_s,
        zipf_s=zipf_s,
        steps=steps,
        shared_model=shared_model,
    )


def load_test(
    endpoint: Endpoint,
    targets: list[str],
    out_dir: str | Path,
    users: int = 4,
    duration_s: int = 30,
    zipf_s: float = 1.2,
    steps: int = 1,
    shared_model: str | None = None,
) -> LoadTestResult:
    """Run locust against `endpoint` for `duration_s` seconds; return the headline numbers.

    Plain HTTP where the endpoint has a loopback `url` (the local router: the same test as
    `run_load_test`), else boto3's `invoke_endpoint` with `endpoint.runtime_client_options()`
    (SageMaker); metrics from `endpoint.metrics()` (see the module docstring).

    Args:
        endpoint (`Endpoint`): a deployed endpoint (`wait()` returned).
        targets, out_dir, users, duration_s, zipf_s, steps, shared_model: as `run_load_test`'s.
    """
    _check(duration_s, targets)
    url = endpoint.url
    if url and url.startswith(LOOPBACK):
        user, options = HTTP_USER, {}
    else:  # signed requests, as any client of a SageMaker endpoint sends them
        user, url, options = BOTO3_USER, None, endpoint.runtime_client_options()
    return _run_locust(
        user,
        url,
        options,
        endpoint.metrics,
        endpoint.metrics_period_s,
        endpoint_name=endpoint.name,
        targets=targets,
        out_dir=Path(out_dir),
        users=users,
        duration_s=duration_s,
        zipf_s=zipf_s,
        steps=steps,
        shared_model=shared_model,
    )


def _run_locust(
    user: str,
    host: str | None,
    runtime_options: dict,
    read_metrics: Callable[[], Mapping[str, float]],
    metrics_period_s: float,
    *,
    endpoint_name: str,
    targets: list[str],
    out_dir: Path,
    users: int,
    duration_s: int,
    zipf_s: float,
    steps: int,
    shared_model: str | None,
) -> LoadTestResult:
    """Run locust's `user` class (against `host`, or with boto3 `runtime_options`) while
    sampling `read_metrics` every `metrics_period_s` seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        LOADTEST_TARGETS=",".join(targets),
        LOADTEST_ENDPOINT=endpoint_name,
        LOADTEST_ZIPF_S=str(zipf_s),
        LOADTEST_STEPS=str(steps),
        LOADTEST_SHARED_MODEL=shared_model or "",
        LOADTEST_REQUESTS_CSV=str(out_dir / "requests.csv"),
        LOADTEST_RUNTIME_OPTIONS=json.dumps(runtime_options),
        NO_PROXY="127.0.0.1,localhost",
    )
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        *(["--host", host] if host else []),
        "-u", str(users), "-r", str(users), "-t", f"{duration_s}s",
        "--csv", str(out_dir / "locust"), "--csv-full-history", "--only-summary",
        "--stop-timeout", "60", "--loglevel", "WARNING", user,
    ]  # fmt: skip
    stop = threading.Event()
    sampler = threading.Thread(
        target=_sample_metrics,
        args=(read_metrics, out_dir / "metrics.csv", stop, metrics_period_s),
        daemon=True,
    )
    sampler.start()
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=duration_s + 120
        )
    finally:
        stop.set()
        sampler.join()
    # exit 1 also means "some requests failed", which the result reports, but only if it ran
    if done.returncode not in (0, 1) or not (out_dir / "requests.csv").exists():
        raise RuntimeError(f"locust exited {done.returncode}:\n{done.stderr[-2000:]}")
    return summarize(out_dir)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def summarize(out_dir: Path) -> LoadTestResult:
    import numpy as np

    rows = _read(out_dir / "requests.csv")
    ok = [row for row in rows if row["status"] == "200"]
    latencies = np.array([float(row["latency_ms"]) for row in ok]) if ok else np.zeros(1)
    cold = [float(row["latency_ms"]) for row in ok if row["cache"] == "miss"]
    warm = [float(row["latency_ms"]) for row in ok if row["cache"] == "hit"]
    # from the first request's start to the last answer's arrival (start times alone make a
    # short test of slow requests look absurdly fast)
    starts = [float(row["time"]) for row in rows]
    ends = [float(row["time"]) + float(row["latency_ms"]) / 1000 for row in rows]
    span = max(ends) - min(starts) if rows else 1.0
    metrics = _read(out_dir / "metrics.csv") if (out_dir / "metrics.csv").exists() else []
    return LoadTestResult(
        out_dir=out_dir,
        requests=len(rows),
        failures=len(rows) - len(ok),
        requests_per_second=round(len(ok) / max(span, 1e-9), 2),
        p50_ms=round(float(np.percentile(latencies, 50)), 1),
        p95_ms=round(float(np.percentile(latencies, 95)), 1),
        p99_ms=round(float(np.percentile(latencies, 99)), 1),
        cold_median_ms=round(float(np.median(cold)), 1) if cold else None,
        warm_median_ms=round(float(np.median(warm)), 1) if warm else None,
        # requests whose cache status is unknown (no header) count in neither
        cache_hit_ratio=round(len(warm) / (len(cold) + len(warm)), 3) if cold or warm else None,
        max_loaded_models=(
            int(max(float(m["loaded_models"]) for m in metrics)) if metrics else None
        ),
    )


def plot_load_test(results: dict[str, LoadTestResult]):
    """Four panels per run (e.g. {"cold": ..., "warm": ...}): latency percentiles over time,
    cold vs warm latency, cache-hit ratio over time, loaded models over time."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    (latency, split), (ratio, loaded) = axes
    offset = 0.0
    box_data, box_labels = [], []
    for phase, result in results.items():
        requests = _read(result.out_dir / "requests.csv")
        metrics = _read(result.out_dir / "metrics.csv")
        start = min(float(row["time"]) for row in requests) if requests else 0.0
        ok = [row for row in requests if row["status"] == "200"]
        # latency percentiles per second, from our own request log
        seconds: dict[int, list[float]] = {}
        for row in ok:
            seconds.setdefault(int(float(row["time"]) - start), []).append(float(row["latency_ms"]))
        xs = sorted(seconds)
        for q, style in ((50, "-"), (95, "--")):
            latency.plot(
                [offset + x for x in xs],
                [_percentile(seconds[x], q) for x in xs],
                style,
                label=f"{phase} p{q}",
            )
        for kind in ("miss", "hit"):
            values = [float(row["latency_ms"]) for row in ok if row["cache"] == kind]
            if values:
                box_data.append(values)
                box_labels.append(f"{phase}\n{'cold (miss)' if kind == 'miss' else 'warm (hit)'}")
        times = [float(m["time"]) - start + offset for m in metrics]
        hits = [float(m["cache_hits"]) for m in metrics]
        calls = [float(m["invocations"]) for m in metrics]
        base_hits, base_calls = (hits[0], calls[0]) if hits else (0.0, 0.0)
        ratio.plot(
            times,
            [
                (h - base_hits) / (c - base_calls) if c > base_calls else 0
                for h, c in zip(hits, calls, strict=True)
            ],
            label=phase,
        )
        loaded.step(times, [float(m["loaded_models"]) for m in metrics], where="post", label=phase)
        offset = max(times, default=offset) + 1
    latency.set(title="Latency over time", xlabel="seconds", ylabel="ms", yscale="log")
    latency.legend(fontsize=8)
    if box_data:
        split.boxplot(box_data, tick_labels=box_labels)
    split.set(title="Cold vs warm invocations", ylabel="ms", yscale="log")
    ratio.set(title="Cache-hit ratio (cumulative)", xlabel="seconds", ylim=(0, 1.05))
    ratio.legend(fontsize=8)
    loaded.set(title="Loaded models", xlabel="seconds")
    loaded.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))
