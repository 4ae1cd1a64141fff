"""A cross-tenant sweep built from the app's own OpenAPI spec, so that no route escapes it.

Tenant A holds photos, a pending upload and models (one AVAILABLE, one FAILED with a private
reason). Every operation of `app.openapi()` is then called with every caller that is not A:
no key, malformed keys, A's user id with a wrong secret, the key of a deleted user, an old key
after rotation (when the route exists), the admin key, and tenant B's valid key. Path
parameters, and body fields that name a resource, carry A's ids.

- An operation that names a resource of A (a path parameter or a `model_id` in the body) must
  answer 401, 403 or 404.
- Every other operation acts on the caller's own account (`/v1/users/me`, `/v1/photos`, ...):
  a caller without a valid key must get 401 or 403; tenant B and the admin may get their own
  answer (B lists B's photos, deletes B's account), which must not be a 5xx.
- Every answer is JSON (or empty), and holds nothing of A's that was not in the request: no
  user id, display name, photo name, key, failure reason or endpoint model name.
- After every call, A's key, photos, uploads and models are as they were.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient
from test_api import ADMIN_KEY, UNLIMITED, api_services, photo_files

from helpers.api import ApiServices, create_app
from helpers.api.auth import hash_key, new_key
from helpers.api.postman import openapi_spec
from helpers.domain.paths import uploads_prefix
from helpers.domain.records import ModelRecord, ModelStatus, UserRecord
from helpers.services import photos

A = "tenant-a-5c1e"
A_DISPLAY_NAME = "Ada Lovelace-Private"
A_FAILURE = "a-private-failure-reason-7d2f"
A_UPLOAD = "a-pending-upload-91b0"

SPEC = openapi_spec()
OPERATIONS = [
    (method.upper(), path, operation)
    for path, operations in SPEC["paths"].items()
    for method, operation in operations.items()
]
#: Who calls: a name for the test id, and whether it holds a valid key of its own.
CALLERS = {
    "no-key": False,
    "basic-scheme": False,
    "no-secret": False,
    "wrong-secret": False,
    "deleted-user": False,
    "rotated-old-key": False,
    "admin-key": False,
    "tenant-b": True,
}
#: Body fields that name a resource; a request carrying A's value there is resource-scoped.
RESOURCE_FIELDS = ("model_id",)
#: Operations only the admin key may call (everyone else must get 401 or 403).
ADMIN_OPERATIONS = {("POST", "/v1/users")}


@dataclass
class World:
    """Tenant A's data and the keys of the callers."""

    services: ApiServices
    client: TestClient
    a_key: str
    a_photos: list[str]
    a_models: dict[str, ModelRecord]
    keys: dict[str, str | None] = field(default_factory=dict)

    def a_values(self) -> dict[str, str]:
        """A's resources, by the name of the path parameter (or body field) that names one."""
        return {
            "model_id": "m2",  # A's AVAILABLE model; m1 is FAILED
            "name": self.a_photos[0],  # DELETE /v1/photos/{name}
            "upload_id": A_UPLOAD,  # DELETE /v1/photos/uploads/{upload_id}
        }

    def secrets_of_a(self) -> set[str]:
        """Strings that belong to A and must not appear in anyone else's answer."""
        secret = self.a_key.partition(".")[2]
        models = self.a_models.values()
        return {
            A,
            A_DISPLAY_NAME,
            A_FAILURE,
            A_UPLOAD,
            self.a_key,
            secret,
            *self.a_photos,
            *(m.endpoint_model_name for m in models if m.endpoint_model_name),
        }

    def a_state(self) -> tuple:
        services, settings = self.services, self.services.settings
        user = services.metadata.get_user(A)
        return (
            user and user.api_key_hash == hash_key(self.a_key),
            sorted(p.name for p in photos.list_photos(services.store, settings, A)),
            sorted(services.store.list(uploads_prefix(settings.bucket, A))),
            sorted((m.model_id, m.status, m.version) for m in services.metadata.list_models(A)),
        )


def _user(services: ApiServices, user_id: str, display_name: str | None = None) -> str:
    key = new_key(user_id)
    services.metadata.put_user(
        UserRecord(user_id, api_key_hash=hash_key(key), display_name=display_name)
    )
    return key


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # Isolation is what this tests; test_quotas tests the limits.
    services = api_services(tmp_path_factory.mktemp("sweep"), limits=UNLIMITED)
    settings, store, metadata = services.settings, services.store, services.metadata
    a_key = _user(services, A, A_DISPLAY_NAME)
    files = [(name, data) for _, (name, data, _) in photo_files(count=3)]
    a_photos = [p.name for p in photos.add_photos(store, settings, A, files)]
    store.put_bytes(uploads_prefix(settings.bucket, A) + A_UPLOAD, b"pending")
    failed = ModelRecord(A, "m1", status=ModelStatus.FAILED, failure_reason=A_FAILURE)
    available = ModelRecord(A, "m2", status=ModelStatus.AVAILABLE, endpoint_model_name=f"{A}--m2")
    for model in (failed, available):
        metadata.create_model(model)
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        world = World(services, client, a_key, a_photos, {"m1": failed, "m2": available})
        deleted = _user(services, "deleted-user")
        assert client.delete("/v1/users/me", headers=_bearer(deleted)).status_code == 204
        world.keys = {
            "no-key": None,
            "basic-scheme": "Basic " + a_key,
            "no-secret": f"Bearer {A}",
            "wrong-secret": f"Bearer {A}.{secrets.token_urlsafe(32)}",
            "deleted-user": _bearer(deleted)["Authorization"],
            "admin-key": _bearer(ADMIN_KEY)["Authorization"],
        }
        yield world


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _rotated_old_key(world: World, path_of_rotation: str) -> str:
    """A key that was rotated away (through the API's own rotation route)."""
    old = _user(world.services, f"rotated-{secrets.token_hex(4)}")
    answer = world.client.post(path_of_rotation, headers=_bearer(old))
    assert answer.status_code in (200, 201), answer.text
    return old


def _key_rotation_path() -> str | None:
    return next(
        (
            path
            for method, path, _ in OPERATIONS
            if method == "POST" and path.startswith("/v1/users/me/") and "key" in path
        ),
        None,
    )


def _body(operation: dict, values: dict[str, str]) -> dict:
    """Request keyword arguments for the operation's body: the schema's example (JSON) or one
    real photo per file field (multipart), with A's ids in fields that name a resource."""
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        example = _example(content["application/json"]["schema"])
        properties = _properties(content["application/json"]["schema"])
        for name in RESOURCE_FIELDS:
            if name in properties:
                example[name] = values[name]
        return {"json": example}
    if "multipart/form-data" in content:
        schema = content["multipart/form-data"]["schema"]
        fields = _properties(schema) or {"files": {}}
        files = [
            (name, file)
            for name in fields
            for _, file in photo_files("demo-bo", count=1)  # B's own subject, not A's
        ]
        return {"files": files}
    return {}


def _resolve(schema: dict) -> dict:
    for option in schema.get("anyOf", [schema]):
        if "$ref" in option:
            return SPEC["components"]["schemas"][option["$ref"].rsplit("/", 1)[-1]]
        if option.get("type") == "object":
            return option
    return {}


def _example(schema: dict) -> dict:
    examples = _resolve(schema).get("examples") or [{}]
    return dict(examples[0])


def _properties(schema: dict) -> dict:
    return _resolve(schema).get("properties", {})


def _path(path: str, operation: dict, values: dict[str, str]) -> str:
    for parameter in operation.get("parameters", []):
        if parameter["in"] != "path":
            continue
        name = parameter["name"]
        assert name in values, (
            f"the sweep does not know which of A's resources {{{name}}} names: "
            "add it to World.a_values"
        )
        path = path.replace(f"{{{name}}}", values[name])
    return path


def _scoped(operation: dict, body: dict) -> bool:
    """Whether the request names one of A's resources (in its path or its JSON body)."""
    in_path = any(p["in"] == "path" for p in operation.get("parameters", []))
    in_body = any(name in body.get("json", {}) for name in RESOURCE_FIELDS)
    return in_path or in_body


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize(
    ("method", "path", "operation"),
    OPERATIONS,
    ids=[f"{method} {path}" for method, path, _ in OPERATIONS],
)
def test_no_caller_but_a_reaches_a_s_data(world, method, path, operation, caller):
    values = world.a_values()
    if caller == "tenant-b":
        b = f"tenant-b-{secrets.token_hex(4)}"  # a fresh B: B may delete or rotate its own
        authorization = _bearer(_user(world.services, b))["Authorization"]
    elif caller == "rotated-old-key":
        rotation = _key_rotation_path()
        if rotation is None:
            pytest.skip("no key rotation route in the spec")
        authorization = _bearer(_rotated_old_key(world, rotation))["Authorization"]
    else:
        authorization = world.keys[caller]
    headers = {"Authorization": authorization} if authorization else {}
    body = _body(operation, values)
    url = _path(path, operation, values)
    before = world.a_state()

    answer = world.client.request(method, url, headers=headers, **body)

    sent = url + json.dumps(body.get("json", {})) + (authorization or "")
    leaked = sorted(s for s in world.secrets_of_a() if s in answer.text and s not in sent)
    assert not leaked, f"{caller} got A's {leaked} from {method} {path}: {answer.text[:300]}"
    assert world.a_state() == before, f"{caller} changed A's data with {method} {path}"
    assert answer.status_code < 500, answer.text
    if answer.status_code != 204:
        assert answer.headers["content-type"].startswith("application/json"), answer.headers
        answer.json()
    if not operation.get("security"):
        return  # /health: no key needed, and nothing of anyone's in it (checked above)
    refused = (caller, answer.status_code, answer.text)
    if (method, path) in ADMIN_OPERATIONS:
        if caller != "admin-key":
            assert answer.status_code in (401, 403), refused
    elif _scoped(operation, body):
        assert answer.status_code in (401, 403, 404), refused
    elif not CALLERS[caller]:
        assert answer.status_code in (401, 403), refused
    if answer.status_code in (401, 403, 404):
        assert set(answer.json()) == {"error"}, answer.text


def test_the_sweep_covers_every_operation_and_its_own_tenant_can_reach_a_s_data(world):
    """The sweep's callers are refused, not the sweep itself broken: A's own key reaches A's
    model, photos and upload by the ids the sweep uses (so a 404 for B is isolation, not a bad
    id)."""
    assert len(OPERATIONS) >= 10
    values = world.a_values()
    a = _bearer(world.a_key)
    model = world.client.get(f"/v1/models/{values['model_id']}", headers=a)
    assert model.status_code == 200 and model.json()["status"] == "AVAILABLE"
    listed = world.client.get("/v1/photos", headers=a).json()
    assert {p["name"] for p in listed["photos"]} == set(world.a_photos)
    uploads = world.client.get("/v1/photos/uploads", headers=a).json()
    assert [u["id"] for u in uploads["uploads"]] == [A_UPLOAD]
    generated = world.client.post(
        "/v1/generations", json={"prompt": "x", "model_id": values["model_id"]}, headers=a
    )
    assert generated.status_code == 200, generated.text
