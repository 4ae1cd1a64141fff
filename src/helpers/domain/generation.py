"""Invoke a user's model on a multi-model endpoint, locally or on SageMaker, the same way.

A request is a KServe v2 inference request in Triton's binary+JSON form (a JSON header, then
raw tensor bytes), with the content type SageMaker's Triton container expects:
`application/vnd.sagemaker-triton.binary+json;json-header-size=<n>`. The answer comes back in
the same form; its `images` output holds PNG files.

What a request may hold (each input's default and bounds) is defined once, by the per-user
Triton model's `INPUTS` table (`model_code/triton_sd/1/model.py`); `generation_inputs()` reads
it for the API's request schema. So is how much work one request may ask for (the model's
`work_units` and `WORK_BUDGETS`): `work_error()` applies that rule in the API, before anything
is sent, and the model applies it again.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from helpers.domain.model_code import MODEL_CODE_DIR, load_model_code_file

BINARY_JSON = "application/vnd.sagemaker-triton.binary+json"
HEADER_SIZE_RE = re.compile(r"json-header-size=(\d+)")
#: Request input -> Triton datatype, as `model_code/triton_sd/config.pbtxt` declares them;
#: `adapter` (the user's model name) only for the shared-base model (`triton_sd_shared`), where
#: `helpers.domain.serving.Serving.route` sets it from the user, never from a client.
INPUT_TYPES = {
    "prompt": "BYTES",
    "negative_prompt": "BYTES",
    "num_inference_steps": "INT32",
    "guidance_scale": "FP32",
    "seed": "INT64",
    "width": "INT32",
    "height": "INT32",
    "num_images": "INT32",
    "adapter": "BYTES",
}
_NUMPY = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "INT64": np.int64}
#: The per-user Triton model, whose `INPUTS` and `MULTIPLE_OF` define every input's rule.
TRITON_MODEL_FILE = MODEL_CODE_DIR / "triton_sd" / "1" / "model.py"


@dataclass(frozen=True)
class InputRule:
    """One generation input, as the Triton model checks it.

    Args:
        kind (`str`): "text", "int" or "float".
        default: its value when a request leaves it out; None when the model decides at load
            time (or, for `prompt`, when it is required).
        low, high: inclusive bounds of the value, or of a text's length in characters.
        multiple_of (`int`, defaults to 1): an integer's step.
    """

    kind: str
    default: object
    low: float
    high: float
    multiple_of: int = 1


@functools.cache
def _triton_model(path: Path):
    # The file imports numpy at its top and torch only when a model loads.
    return load_model_code_file(Path(path), "helpers._triton_sd_inputs")


@functools.cache
def generation_inputs(path: Path = TRITON_MODEL_FILE) -> Mapping[str, InputRule]:
    """The Triton model's input rules (name -> `InputRule`), read from its `model.py`.

    The file imports numpy at its top and torch only when a model loads, so this imports
    neither torch nor diffusers.
    """
    model = _triton_model(Path(path))
    steps = model.MULTIPLE_OF
    return MappingProxyType(
        {
            name: InputRule(kind, default, low, high, steps.get(name, 1))
            for name, (kind, default, low, high) in model.INPUTS.items()
        }
    )


#: How the Triton model's refusal of an over-budget request starts (`work_error`).
WORK_TOO_LARGE = "work_too_large"


def work_budget(gpu: bool) -> int:
    """The most work one request may ask for on an endpoint with (or without) a GPU, in the
    Triton model's work units (its `WORK_BUDGETS`, which the model enforces too)."""
    return _triton_model(TRITON_MODEL_FILE).WORK_BUDGETS["cuda" if gpu else "cpu"]


def work_error(values: Mapping[str, object], budget: int) -> str | None:
    """None when a request's `values` (width, height, num_inference_steps, num_images,
    guidance_scale, all set) fit in `budget`; else the model's own message: the request's work,
    the budget and what fits, starting with "work_too_large"."""
    return _triton_model(TRITON_MODEL_FILE).work_error(dict(values), budget)


def work_allowed(values: Mapping[str, object], budget: int) -> tuple[str, str]:
    """The field to lower for `values` to fit in `budget`, and what it allows: steps at that
    size and count, or, when one step is already too much, the image side."""
    model = _triton_model(TRITON_MODEL_FILE)
    width, height, images = values["width"], values["height"], values["num_images"]
    per_step = model.work_units(width, height, 1, images, values["guidance_scale"])
    if budget >= per_step:
        steps = budget // per_step
        return "num_inference_steps", f"at most {steps} at {width}x{height} with {images} image(s)"
    side = model.max_side(budget, values["guidance_scale"])
    return "width", f"width x height at most {side}x{side} (one image, one step)"


def make_inputs(prompt: str, **parameters) -> list:
    """The request's input tensors (tritonclient `InferInput`s), parameters as in `INPUT_TYPES`.

    A request for the shared-base model (one with an `adapter`) is one sample of a batch: that
    model batches requests (Triton's `max_batch_size` >= 1), so its inputs have shape [1, 1].
    The per-user model's have shape [1].
    """
    from tritonclient.http import InferInput

    unknown = sorted(set(parameters) - set(INPUT_TYPES))
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; allowed: {sorted(INPUT_TYPES)}")
    shape = [1, 1] if parameters.get("adapter") is not None else [1]
    inputs = []
    for name, value in {"prompt": prompt, **parameters}.items():
        if value is None:
            continue
        datatype = INPUT_TYPES[name]
        tensor = InferInput(name, shape, datatype)
        data = value.encode() if isinstance(value, str) else value
        array = np.array([data], dtype=_NUMPY[datatype]).reshape(shape)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    return inputs


def build_request(
    prompt: str, *, outputs: tuple[str, ...] = ("images",), **parameters
) -> tuple[bytes, str]:
    """The body and content type of a generation request (parameters as in `INPUT_TYPES`).

    `outputs` are the outputs to ask for; the shared-base model also has `adapter_cache`.
    """
    from tritonclient.http import InferenceServerClient, InferRequestedOutput

    inputs = make_inputs(prompt, **parameters)
    outputs = [InferRequestedOutput(name, binary_data=True) for name in outputs]
    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    if json_size is None:
        return body, "application/json"
    return body, f"{BINARY_JSON};json-header-size={json_size}"


def parse_response(body: bytes, content_type: str | None, output: str = "images") -> list[bytes]:
    """The PNG files of a generation answer (or the values of another BYTES `output`)."""
    from tritonclient.http import InferenceServerClient

    match = HEADER_SIZE_RE.search(content_type or "")
    result = InferenceServerClient.parse_response_body(
        body, header_length=int(match.group(1)) if match else None
    )
    values = result.as_numpy(output)
    if values is None:
        raise ValueError(f"the answer has no {output!r} output: {result.get_response()}")
    return [bytes(value) for value in values.reshape(-1)]


def invoke_model(
    runtime, endpoint_name: str, target_model: str, prompt: str, **parameters
) -> list[Image.Image]:
    """Generate with `target_model` through a boto3 `sagemaker-runtime` client."""
    body, content_type = build_request(prompt, **parameters)
    answer = runtime.invoke_endpoint(
        EndpointName=endpoint_name,
        TargetModel=target_model,
        ContentType=content_type,
        Accept=BINARY_JSON,
        Body=body,
    )
    pngs = parse_response(answer["Body"].read(), answer.get("ContentType"))
    return [Image.open(io.BytesIO(png)) for png in pngs]
