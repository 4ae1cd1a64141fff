"""The Postman collection works as a user works, and newman runs it against the real local API
(uvicorn on loopback, local store and SQLite, real Triton and training jobs) with 0 failures.

The model the collection starts is still training when it generates, so its generation step
checks the 409 "not AVAILABLE yet" answer, not an image (the success path of generation is
`tests/test_api_local.py`'s).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers.api.local import LocalApi
from helpers.api.postman import (
    COLLECTION_FILE,
    PHOTOS_FOLDER,
    collection_from_openapi,
    openapi_spec,
)
from helpers.infra.local.triton_server import free_ports
from helpers.settings import PROJECT_ROOT, load_settings

DOCS = PROJECT_ROOT / "documentation"
NEWMAN = PROJECT_ROOT / "node_modules" / ".bin" / "newman"


def steps(collection: dict) -> list[tuple[str, str]]:
    return [
        (item["request"]["method"], item["request"]["url"]["raw"].removeprefix("{{baseUrl}}"))
        for item in collection["item"]
    ]


def test_the_collection_runs_in_the_order_a_user_works():
    order = steps(collection_from_openapi(openapi_spec()))
    assert order[:9] == [
        ("GET", "/health"),
        ("POST", "/v1/users"),
        ("GET", "/v1/users/me"),
        ("POST", "/v1/photos"),
        ("GET", "/v1/photos"),
        ("POST", "/v1/models"),
        ("GET", "/v1/models/:model_id"),
        ("GET", "/v1/models"),
        ("POST", "/v1/generations"),
    ]
    assert order[-1] == ("DELETE", "/v1/users/me")  # the account goes last, not 4th


def test_every_request_asserts_its_status_and_the_upload_sends_real_photos():
    collection = json.loads((DOCS / COLLECTION_FILE).read_text())
    for item in collection["item"]:
        tests = [e for e in item["event"] if e["listen"] == "test"]
        script = "\n".join(tests[0]["script"]["exec"])
        assert "pm.test(" in script and "pm.response.code" in script, item["name"]
    upload = next(i for i in collection["item"] if i["request"]["url"]["raw"].endswith("/photos"))
    files = upload["request"]["body"]["formdata"]
    assert len(files) >= 3
    for field in files:
        assert field["type"] == "file" and field["src"].startswith(f"{PHOTOS_FOLDER}/")
        assert (DOCS / field["src"]).read_bytes().startswith(b"\x89PNG")
    variables = {v["key"] for v in collection["variable"]}
    assert {"baseUrl", "adminKey", "apiKey"} <= variables


@pytest.mark.slow
def test_newman_runs_the_collection_against_the_local_api_with_no_failures(
    tmp_path, tiny_pipeline_dir
):
    if not NEWMAN.exists():
        pytest.skip("newman is not installed: `make test` installs it (npm ci)")
    api_port, router, http, grpc, metrics = free_ports(5)
    settings = load_settings(
        work_dir=tmp_path / "work",
        base_model=str(tiny_pipeline_dir),
        api_port=api_port,
        router_port=router,
        triton_http_port=http,
        triton_grpc_port=grpc,
        triton_metrics_port=metrics,
    )
    report = tmp_path / "newman.json"
    with LocalApi(settings) as api:
        run = subprocess.run(
            [
                str(NEWMAN),
                "run",
                str(DOCS / COLLECTION_FILE),
                "--working-dir",
                str(DOCS),
                "--env-var",
                f"baseUrl={api.url}",
                "--env-var",
                f"adminKey={api.admin_key}",
                "--timeout-request",
                "60000",
                "--reporters",
                "cli,json",
                "--reporter-json-export",
                str(report),
                "--color",
                "off",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert report.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    stats = json.loads(report.read_text())["run"]["stats"]
    assert run.returncode == 0 and stats["assertions"]["failed"] == 0, run.stdout[-6000:]
    assert stats["requests"]["failed"] == 0
    collection = json.loads((DOCS / COLLECTION_FILE).read_text())
    assert stats["requests"]["total"] == len(collection["item"])
    assert stats["assertions"]["total"] >= 2 * len(collection["item"])
