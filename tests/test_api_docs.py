"""The committed OpenAPI spec and Postman collection match the app, and their examples are
requests the app accepts."""

from __future__ import annotations

import json

from helpers.api import schemas
from helpers.api.postman import COLLECTION_FILE, OPENAPI_FILE, openapi_spec, write_documentation
from helpers.settings import PROJECT_ROOT

DOCS = PROJECT_ROOT / "documentation"


def test_the_committed_spec_and_collection_are_up_to_date(tmp_path):
    for fresh in write_documentation(tmp_path):
        committed = DOCS / fresh.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing"
        stale = f"{committed} is out of date: run `python -m helpers.api.postman documentation`"
        if fresh.suffix == ".json":
            assert json.loads(committed.read_text()) == json.loads(fresh.read_text()), stale
        else:
            assert committed.read_bytes() == fresh.read_bytes(), stale


def test_the_collection_has_every_operation_with_the_right_auth():
    spec = json.loads((DOCS / OPENAPI_FILE).read_text())
    collection = json.loads((DOCS / COLLECTION_FILE).read_text())
    requests = {
        (item["request"]["method"], item["request"]["url"]["raw"]): item
        for item in collection["item"]
    }
    operations = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    assert len(requests) == len(operations)
    health = requests[("GET", "{{baseUrl}}/health")]
    assert health["request"]["auth"] == {"type": "noauth"}
    create = requests[("POST", "{{baseUrl}}/v1/users")]
    assert create["request"]["auth"]["bearer"][0]["value"] == "{{adminKey}}"
    tests = next(e for e in create["event"] if e["listen"] == "test")
    assert "apiKey" in "".join(tests["script"]["exec"])
    assert collection["auth"]["bearer"][0]["value"] == "{{apiKey}}"
    assert ("GET", "{{baseUrl}}/v1/models/:model_id") in requests


def test_every_example_body_is_valid_for_its_route():
    collection = json.loads((DOCS / COLLECTION_FILE).read_text())
    bodies = {
        item["request"]["url"]["raw"].removeprefix("{{baseUrl}}"): item["request"]["body"]
        for item in collection["item"]
        if item["request"].get("body", {}).get("mode") == "raw"
    }
    models = {
        "/v1/users": schemas.CreateUser,
        "/v1/photos/upload-urls": schemas.UploadUrlsRequest,
        "/v1/models": schemas.FineTuneRequest,
        "/v1/generations": schemas.GenerateRequest,
    }
    assert set(bodies) == set(models)
    for path, body in bodies.items():
        raw = body["raw"].replace("{{userId}}", "postman-1")  # the run sets it
        models[path].model_validate(json.loads(raw))  # raises if the example is invalid
    assert openapi_spec()["info"]["version"] == "1.0.0"
