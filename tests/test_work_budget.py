"""The work one generation may ask for, and what the API answers when the endpoint cannot
serve: the rule is the Triton model's own, the API applies it before sending anything, and
the endpoint's failures (a refusal, a restarting model, a timeout, a dead server) are clear
answers, never a 500."""

# ruff: noqa: F811  (test_api's fixtures, imported, are redefined as arguments)

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from test_api import client, error_of, make_available, onboard, services  # noqa: F401

from helpers.api.generation import _explain
from helpers.domain.generation import work_allowed, work_budget, work_error
from helpers.ports.endpoint import IN_SERVICE, EndpointDescription
from helpers.services.packaging import load_model_code

model_py = load_model_code()


def values(side: int, steps: int, images: int = 1, guidance: float = 2.0) -> dict:
    return {
        "width": side,
        "height": side,
        "num_inference_steps": steps,
        "num_images": images,
        "guidance_scale": guidance,
    }


def test_the_cpu_budget_admits_what_runs_in_a_minute_and_refuses_the_rest():
    cpu = work_budget(gpu=False)
    assert cpu == model_py.WORK_BUDGETS["cpu"]
    # the tiny model's own size: everything the input bounds allow (22 s at most)
    assert work_error(values(64, 100, images=4), cpu) is None
    assert work_error(values(128, 100, images=3), cpu) is None
    # 512 px: one guided step (36 s measured), not two
    assert work_error(values(512, 1), cpu) is None
    problem = work_error(values(512, 2), cpu)
    assert problem.startswith("work_too_large: 512x512 x 2 steps x 1 image(s)")
    assert work_allowed(values(512, 2), cpu) == (
        "num_inference_steps",
        "at most 1 at 512x512 with 1 image(s)",
    )
    # the request that ran for 20 minutes: refused, with the size that fits
    assert "one image of at most 560x560" in work_error(values(1024, 1), cpu)
    assert work_allowed(values(1024, 1), cpu)[0] == "width"
    # without guidance a step is half the work
    assert work_error(values(512, 2, guidance=1.0), cpu) is None


def test_a_gpu_endpoint_admits_stable_diffusion_at_its_size():
    gpu = work_budget(gpu=True)
    assert work_error(values(512, 100, images=4), gpu) is None
    assert work_error(values(1024, 25), gpu) is None
    assert work_error(values(1024, 100, images=4), gpu).startswith("work_too_large")


def test_the_model_refuses_over_budget_requests_itself(tmp_path):
    import numpy as np

    raw = {
        "prompt": np.array([b"x"], dtype=np.object_),
        "width": np.array([1024], dtype=np.int32),
        "height": np.array([1024], dtype=np.int32),
        "num_inference_steps": np.array([1], dtype=np.int32),
    }
    defaults = {"guidance_scale": 2.0, "width": 64, "height": 64}
    with pytest.raises(model_py.InputError, match=r"^work_too_large: 1024x1024"):
        model_py.parse_inputs(raw, defaults, max_work=work_budget(gpu=False))
    assert model_py.parse_inputs(raw, defaults)["width"] == 1024  # unchecked without a budget


def test_a_cancelled_request_stops_between_denoising_steps():
    class Request:
        cancelled = False

        def is_cancelled(self) -> bool:
            return self.cancelled

    request = Request()
    callback = model_py._stop_if_cancelled(request)
    assert callback(None, 0, 999, {"latents": 1}) == {"latents": 1}
    request.cancelled = True
    with pytest.raises(model_py.Cancelled, match="after 3 denoising steps"):
        callback(None, 2, 500, {})


@pytest.fixture
def ada(client, services):
    headers = onboard(client, "ada")
    make_available(services, "ada")
    return headers


def test_the_api_refuses_too_much_work_before_sending_anything(client, services, ada):
    answer = client.post(
        "/v1/generations",
        json={"prompt": "x", "width": 1024, "height": 1024, "num_inference_steps": 1},
        headers=ada,
    )
    assert answer.status_code == 422
    error = error_of(answer)
    assert error["code"] == "work_too_large" and error["field"] == "width"
    assert "560x560" in error["allowed"] and "12000" in error["message"]
    answer = client.post(
        "/v1/generations",
        json={"prompt": "x", "width": 512, "height": 512, "num_inference_steps": 5},
        headers=ada,
    )
    assert error_of(answer)["field"] == "num_inference_steps"
    assert services.generator.calls == []  # nothing reached the endpoint
    ok = client.post("/v1/generations", json={"prompt": "x", "num_images": 1}, headers=ada)
    assert ok.status_code == 200


def router_error(code: str, status: int, message: str, **extra) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
        **extra,
    }
    return ClientError(response, "InvokeEndpoint")


@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        (
            router_error(
                "ModelError",
                424,
                'Received client error (400) from primary with message "work_too_large: ..."',
                OriginalMessage="work_too_large: 64x64 x 100 steps x 4 image(s) is 800 work "
                "units, over this endpoint's budget of 500",
            ),
            422,
            "work_too_large",
            None,
        ),
        (
            router_error("ModelRestarting", 503, "The process of model..."),
            503,
            "model_restarting",
            "5",
        ),
        (
            router_error("ModelError", 424, "timed out", OriginalMessage="timed out"),
            504,
            "generation_timeout",
            None,
        ),
        (router_error("ServiceUnavailable", 503, "no answer"), 503, "endpoint_unavailable", "5"),
    ],
)
def test_endpoint_failures_are_clear_answers(
    client, services, ada, error, status, code, retry_after
):
    services.generator.error = _explain(error)
    answer = client.post("/v1/generations", json={"prompt": "x"}, headers=ada)
    assert answer.status_code == status
    assert error_of(answer)["code"] == code
    assert answer.headers.get("Retry-After") == retry_after


class FakeEndpoint:
    status = IN_SERVICE

    def describe(self) -> EndpointDescription:
        return EndpointDescription("workshop-mme", self.status, url="http://127.0.0.1:1")


def test_health_tells_the_endpoints_state(client, services):
    services.endpoint = FakeEndpoint()
    answer = client.get("/health")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "backend": "local", "endpoint": "InService"}
    services.endpoint.status = "Restarting"
    answer = client.get("/health")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert answer.json() == {"status": "unavailable", "backend": "local", "endpoint": "Restarting"}
