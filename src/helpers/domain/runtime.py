"""The serving runtime as the endpoint sees it: its model on the prefix, its folder on an
instance, and the status request any caller may send it (`helpers.services.serving_runtime`
builds and packages it)."""

from __future__ import annotations

import json
from dataclasses import dataclass

#: Where runtimes are installed on an endpoint's instances (the runtime model's config).
RUNTIME_ROOT = "/tmp/workshop-runtime"


@dataclass(frozen=True)
class ServingRuntime:
    """A runtime on the endpoint's prefix.

    Args:
        name (`str`): its model name (`runtime-<hash>`); its `TargetModel` is `<name>.tar.gz`.
        uri (`str`): its archive, `<prefix>/<name>.tar.gz`.
        size_bytes (`int`): the archive's size.
        has_base_model (`bool`): whether it carries the base pipeline.
        root (`str`, defaults to `RUNTIME_ROOT`): where it installs itself on an instance.
    """

    name: str
    uri: str
    size_bytes: int
    has_base_model: bool
    root: str = RUNTIME_ROOT

    @property
    def target_model(self) -> str:
        return f"{self.name}.tar.gz"

    @property
    def path(self) -> str:
        """Its folder on an instance: the users' models' `runtime` parameter."""
        return f"{self.root}/{self.name}"

    @property
    def base_model(self) -> str:
        """The base pipeline's folder on an instance: the users' models' `base_model`."""
        if not self.has_base_model:
            raise ValueError(f"runtime {self.name} carries no base model")
        return f"{self.path}/base_model"


def status_request() -> tuple[bytes, str]:
    """The body and content type of a request to the runtime model (any request installs it
    and answers its status)."""
    inputs = [{"name": "request", "shape": [1], "datatype": "BYTES", "data": ["status"]}]
    return json.dumps({"inputs": inputs}).encode(), "application/json"


def read_status(body: bytes) -> dict:
    """The runtime model's answer: its name, folder on the instance, parts and Python."""
    outputs = json.loads(body)["outputs"]
    return json.loads(next(out for out in outputs if out["name"] == "runtime")["data"][0])
