"""Locust file for the multi-model endpoint (run by `helpers.workshop.loadtest`, not imported).

Each simulated client loops: pick a target model from a Zipf distribution over the targets
(rank 1 the most popular), invoke it through the SageMaker runtime API, repeat. Settings come
from environment variables set by `helpers.workshop.loadtest`. Every request is also
written to `LOADTEST_REQUESTS_CSV` with the router's cache header, so cold (miss) and warm
(hit) latencies can be told apart.

Two clients, of which the command line names one: `EndpointClient` posts to a router's route
with locust's `FastHttpUser`; `Boto3EndpointClient` calls `invoke_endpoint` through boto3 with
the client options in `LOADTEST_RUNTIME_OPTIONS` (signed, as for SageMaker, which sends no
cache header: its requests' cache is empty unless the shared model reports it).

With `LOADTEST_SHARED_MODEL` set (shared-base serving), the targets are users' adapters: every
request goes to that one model with the adapter in its `adapter` input, and a request is a miss
when the router loaded the model or the model fetched the adapter (its `adapter_cache` output).
"""

from __future__ import annotations

import csv
import json
import os
import random
import threading
import time

# locust first: it patches the standard library for gevent, which boto3 must find patched.
from locust import FastHttpUser, User, constant, events, task

from helpers.domain.generation import build_request, parse_response
from helpers.infra.local.mme_router import CACHE_HEADER, TARGET_HEADER

TARGETS = os.environ["LOADTEST_TARGETS"].split(",")
ENDPOINT = os.environ["LOADTEST_ENDPOINT"]
ZIPF_S = float(os.environ.get("LOADTEST_ZIPF_S", "1.2"))
STEPS = int(os.environ.get("LOADTEST_STEPS", "1"))
SHARED_MODEL = os.environ.get("LOADTEST_SHARED_MODEL", "")
RUNTIME_OPTIONS = json.loads(os.environ.get("LOADTEST_RUNTIME_OPTIONS") or "{}")
WEIGHTS = [1 / rank**ZIPF_S for rank in range(1, len(TARGETS) + 1)]
PROMPT = "a photo of sks toy"
if SHARED_MODEL:
    # target -> (TargetModel, body, content type): one body per adapter
    REQUESTS = {}
    for adapter in TARGETS:
        body, content_type = build_request(
            PROMPT, outputs=("images", "adapter_cache"), adapter=adapter, num_inference_steps=STEPS
        )
        REQUESTS[adapter] = (f"{SHARED_MODEL}.tar.gz", body, content_type)
else:
    BODY, CONTENT_TYPE = build_request(PROMPT, num_inference_steps=STEPS)
    REQUESTS = {target: (target, BODY, CONTENT_TYPE) for target in TARGETS}

_log = open(os.environ["LOADTEST_REQUESTS_CSV"], "w", newline="")  # noqa: SIM115
_writer = csv.writer(_log)
_writer.writerow(["time", "target", "latency_ms", "status", "cache"])
_lock = threading.Lock()


@events.quitting.add_listener
def _close(environment, **kwargs):
    _log.close()


class EndpointClient(FastHttpUser):
    wait_time = constant(0)

    @task
    def invoke(self) -> None:
        target = random.choices(TARGETS, WEIGHTS)[0]
        target_model, body, content_type = REQUESTS[target]
        started = time.time()
        with self.client.post(
            f"/endpoints/{ENDPOINT}/invocations",
            data=body,
            headers={"Content-Type": content_type, TARGET_HEADER: target_model},
            name="invoke",
            catch_response=True,
        ) as response:
            cache = response.headers.get(CACHE_HEADER, "") if response.headers else ""
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif SHARED_MODEL and cache == "hit":
                answer_type = response.headers.get("Content-Type")
                cache = parse_response(response.content, answer_type, "adapter_cache")[0].decode()
            _log_request(started, target, response.status_code, cache)


def _log_request(started: float, target: str, status: int, cache: str) -> None:
    with _lock:
        _writer.writerow(
            [round(started, 3), target, round((time.time() - started) * 1000, 1), status, cache]
        )


class Boto3EndpointClient(User):
    """A client of `invoke_endpoint` through boto3: each call is timed and reported to locust
    as a request, failed ones with their error."""

    wait_time = constant(0)

    def on_start(self) -> None:
        import boto3
        from botocore.config import Config

        # no retries: a retried request would hide its failure and count twice the latency
        config = Config(retries={"max_attempts": 1}, read_timeout=600, connect_timeout=10)
        self.runtime = boto3.client("sagemaker-runtime", config=config, **RUNTIME_OPTIONS)

    @task
    def invoke(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        target = random.choices(TARGETS, WEIGHTS)[0]
        target_model, body, content_type = REQUESTS[target]
        started, clock = time.time(), time.perf_counter()
        status, cache, size, error = 200, "", 0, None
        try:
            answer = self.runtime.invoke_endpoint(
                EndpointName=ENDPOINT,
                TargetModel=target_model,
                ContentType=content_type,
                Body=body,
            )
            content = answer["Body"].read()
            size = len(content)
            headers = answer["ResponseMetadata"].get("HTTPHeaders", {})
            cache = headers.get(CACHE_HEADER.lower(), "")
            if SHARED_MODEL and cache != "miss":  # the model was loaded: did it fetch the adapter?
                answer_type = answer.get("ContentType")
                cache = parse_response(content, answer_type, "adapter_cache")[0].decode()
        except ClientError as failure:
            status = failure.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            error = failure
        except (BotoCoreError, OSError, ValueError, KeyError) as failure:
            status, error = 0, failure
        events.request.fire(
            request_type="POST",
            name="invoke",
            response_time=(time.perf_counter() - clock) * 1000,
            response_length=size,
            exception=error,
            context={},
        )
        _log_request(started, target, status, cache)
