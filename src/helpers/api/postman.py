"""The API's OpenAPI spec and a Postman collection made from it (`documentation/`).

    python -m helpers.api.postman documentation     # rewrite the spec, collection and photos

A test regenerates them and compares them with the committed files, so they never drift from
the app; another runs the collection with newman against the real local API.

The collection runs as a user works: health, create a user (admin), your account, upload
photos, list them, start a model, its status, your models, generate, rotate your key, and
delete the account last. Operations not in that flow (a route added later) run before the
delete, so every operation is in it. Every request has `pm.test` assertions on its status and
the shape of its body. Collection variables: `baseUrl` and `adminKey` (set them), and what the
run captures: `userId` (a new one per run, so it can run again), `apiKey`, `model_id`,
`photo_name`, `upload_id`.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

OPENAPI_FILE = "openapi.json"
COLLECTION_FILE = "workshop-api.postman_collection.json"
#: The photos the upload request sends, beside the collection (newman: `--working-dir`).
PHOTOS_FOLDER = "postman-photos"
PHOTO_COUNT = 3
SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"

#: The order a user works in; operations not named here run after these, before `LAST`.
FLOW = [
    ("GET", "/health"),
    ("POST", "/v1/users"),
    ("GET", "/v1/users/me"),
    ("POST", "/v1/photos"),
    ("GET", "/v1/photos"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/v1/models"),
    ("POST", "/v1/generations"),
]
LAST = [("DELETE", "/v1/users/me")]
#: Answers a step may give besides its documented success: a model that just started cannot
#: generate yet (409); the local backend has no presigned uploads (409), so none is pending
#: to delete (404).
ALSO_EXPECTED = {
    ("POST", "/v1/generations"): [409],
    ("POST", "/v1/photos/upload-urls"): [409],
    ("DELETE", "/v1/photos/uploads/{upload_id}"): [404],
}
#: Bodies that differ from the spec's examples: a new user id per run.
BODIES = {("POST", "/v1/users"): {"user_id": "{{userId}}", "display_name": "Postman"}}
#: What a step's answer sets for the steps after it: variable -> JavaScript expression on `body`.
CAPTURES = {
    ("POST", "/v1/users"): {"apiKey": "body.api_key"},
    ("POST", "/v1/photos"): {"photo_name": "body.photos[0].name"},
    ("POST", "/v1/models"): {"model_id": "body.model_id"},
    ("GET", "/v1/photos/uploads"): {"upload_id": 'body.uploads.length ? body.uploads[0].id : "-"'},
}
#: Path parameters and the collection variable that fills each.
PATH_VARIABLES = {"model_id": "model_id", "name": "photo_name", "upload_id": "upload_id"}
_NEW_USER_ID = ['pm.collectionVariables.set("userId", "postman-" + Date.now());']
_EVERY_ANSWER = [
    'pm.test("the answer is JSON, a PNG, or empty", function () {',
    "    if (pm.response.code === 204) { return; }",
    '    const type = pm.response.headers.get("Content-Type") || "";',
    "    pm.expect(type).to.match(/^(application\\/json|image\\/png)/);",
    "});",
]


def openapi_spec() -> dict:
    """The API's OpenAPI document (it does not depend on the services behind the app)."""
    from helpers.api.app import ApiServices, create_app

    offline = ApiServices(None, None, None, None, None, admin_key_hash="")
    return create_app(offline).openapi()


def collection_from_openapi(spec: dict, base_url: str = DEFAULT_BASE_URL) -> dict:
    """A Postman v2.1 collection with one request per operation of `spec`, in `FLOW` order,
    for the service at `base_url`."""
    operations = {
        (method.upper(), path): operation
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    }
    rotation = _key_rotation(operations)
    flow = [step for step in FLOW if step in operations]
    flow += [rotation] if rotation else []
    last = [step for step in LAST if step in operations]
    rest = [step for step in operations if step not in flow and step not in last]
    return {
        "info": {
            "name": spec["info"]["title"],
            "description": spec["info"].get("description", ""),
            "schema": SCHEMA,
        },
        "auth": _bearer("{{apiKey}}"),
        "event": [_script("test", _EVERY_ANSWER)],
        "variable": [
            {"key": "baseUrl", "value": base_url},
            {"key": "adminKey", "value": ""},
            {"key": "userId", "value": ""},
            {"key": "apiKey", "value": ""},
            {"key": "model_id", "value": ""},
            {"key": "photo_name", "value": ""},
            {"key": "upload_id", "value": ""},
        ],
        "item": [
            _item(spec, method, path, operations[(method, path)], rotation)
            for method, path in flow + rest + last
        ],
    }


def _key_rotation(operations: dict) -> tuple[str, str] | None:
    """The key rotation operation (`POST /v1/users/me/keys`), if the app has one."""
    return next(
        (
            (method, path)
            for method, path in operations
            if method == "POST" and path.startswith("/v1/users/me/") and "key" in path
        ),
        None,
    )


def _bearer(token: str) -> dict:
    return {"type": "bearer", "bearer": [{"key": "token", "value": token, "type": "string"}]}


def _script(listen: str, lines: list[str]) -> dict:
    return {"listen": listen, "script": {"type": "text/javascript", "exec": lines}}


def _item(spec: dict, method: str, path: str, operation: dict, rotation) -> dict:
    segments = [re.sub(r"^\{(.+)\}$", r":\1", part) for part in path.strip("/").split("/")]
    request: dict = {
        "method": method,
        "header": [],
        "url": {
            "raw": "{{baseUrl}}/" + "/".join(segments),
            "host": ["{{baseUrl}}"],
            "path": segments,
        },
        "description": operation.get("description", ""),
    }
    variables = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
    if variables:
        request["url"]["variable"] = [
            {"key": v, "value": f"{{{{{PATH_VARIABLES.get(v, v)}}}}}"} for v in variables
        ]
    if not operation.get("security"):
        request["auth"] = {"type": "noauth"}
    elif (method, path) == ("POST", "/v1/users"):
        request["auth"] = _bearer("{{adminKey}}")
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        request["header"].append({"key": "Content-Type", "value": "application/json"})
        example = BODIES.get((method, path)) or _example(
            spec, content["application/json"]["schema"]
        )
        request["body"] = {"mode": "raw", "raw": json.dumps(example, indent=2)}
    elif "multipart/form-data" in content:
        request["body"] = {
            "mode": "formdata",
            "formdata": [
                {"key": "files", "type": "file", "src": f"{PHOTOS_FOLDER}/{name}"}
                for name in photo_names()
            ],
        }
    captures = dict(CAPTURES.get((method, path), {}))
    if (method, path) == rotation:
        captures["apiKey"] = "body.api_key"
    events = [_script("test", _tests(spec, method, path, operation, captures))]
    if (method, path) == ("POST", "/v1/users"):
        events.insert(0, _script("prerequest", _NEW_USER_ID))
    name = operation.get("summary") or f"{method} {path}"
    return {"name": name, "event": events, "request": request}


def _tests(spec: dict, method: str, path: str, operation: dict, captures: dict) -> list[str]:
    """`pm.test` lines: the status is the step's expected one; a success body has the keys
    its schema requires; an error body is the API's `{"error": {code, message}}`."""
    responses = operation.get("responses", {})
    success = sorted(int(s) for s in responses if s.startswith("2"))
    expected = success + ALSO_EXPECTED.get((method, path), [])
    required = _required_keys(spec, responses.get(str(success[0]), {})) if success else []
    lines = [
        f"const expected = {json.dumps(expected)};",
        f'pm.test("{method} {path} answers one of " + expected, function () {{',
        "    pm.expect(pm.response.code).to.be.oneOf(expected);",
        "});",
        'const isJson = (pm.response.headers.get("Content-Type") || "")'
        '.startsWith("application/json");',
        "const body = isJson ? pm.response.json() : null;",
        "if (pm.response.code >= 400) {",
        '    pm.test("the error names its code and says why", function () {',
        '        pm.expect(body.error).to.include.keys(["code", "message"]);',
        "    });",
        "}",
    ]
    if not (required or captures):
        return lines
    lines.append(f"if (pm.response.code === {success[0]} && isJson) {{")
    if required:
        lines += [
            f'    pm.test("the body has {", ".join(required)}", function () {{',
            f"        pm.expect(body).to.include.keys({json.dumps(required)});",
            "    });",
        ]
    lines += [
        f'    pm.collectionVariables.set("{variable}", {expression});'
        for variable, expression in captures.items()
    ]
    return [*lines, "}"]


def _required_keys(spec: dict, response: dict) -> list[str]:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    if "$ref" not in schema:
        return []
    component = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return list(component.get("required", []))


def _example(spec: dict, schema: dict) -> dict:
    """The first example of a body schema (resolving `$ref` and optional bodies)."""
    for option in schema.get("anyOf", [schema]):
        if "$ref" in option:
            name = option["$ref"].rsplit("/", 1)[-1]
            examples = spec["components"]["schemas"][name].get("examples") or [{}]
            return examples[0]
    return {}


def photo_names() -> list[str]:
    return [f"photo-{i}.png" for i in range(1, PHOTO_COUNT + 1)]


def photos() -> dict[str, bytes]:
    """The upload request's photos: distinct 64x64 PNGs (the smallest the API accepts), a
    different shape and colour each, so none is a duplicate of another."""
    from PIL import Image, ImageDraw

    files = {}
    for i, name in enumerate(photo_names()):
        image = Image.new("RGB", (64, 64), (240 - 60 * i, 200, 60 * i))
        ImageDraw.Draw(image).ellipse((8 + 6 * i, 12, 48, 52 - 4 * i), fill=(30, 30, 120 + 40 * i))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[name] = buffer.getvalue()
    return files


def write_documentation(folder: str | Path, base_url: str = DEFAULT_BASE_URL) -> list[Path]:
    """Write the spec, the collection (for the service at `base_url`) and its photos into
    `folder`; return their paths. The admin key is never written: set `adminKey` in Postman."""
    folder = Path(folder)
    (folder / PHOTOS_FOLDER).mkdir(parents=True, exist_ok=True)
    spec = openapi_spec()
    written = []
    for name, document in {
        OPENAPI_FILE: spec,
        COLLECTION_FILE: collection_from_openapi(spec, base_url),
    }.items():
        path = folder / name
        path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
        written.append(path)
    for name, data in photos().items():
        path = folder / PHOTOS_FOLDER / name
        path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_documentation(sys.argv[1] if len(sys.argv) > 1 else "documentation"):
        print(f"wrote {path}")
