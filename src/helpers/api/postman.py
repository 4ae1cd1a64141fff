"""The API's OpenAPI spec and a Postman collection made from it (`documentation/`).

    python -m helpers.api.postman documentation     # rewrite both files

A test regenerates both and compares them with the committed files, so they never drift from
the app. The collection groups requests by tag, authenticates with `{{apiKey}}` (the admin
routes with `{{adminKey}}`), fills bodies from the spec's examples, and its "Create a user"
request stores the returned key in `{{apiKey}}` for the requests after it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OPENAPI_FILE = "openapi.json"
COLLECTION_FILE = "workshop-api.postman_collection.json"
SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
_SAVE_KEY = [
    "if (pm.response.code === 201) {",
    '    pm.collectionVariables.set("apiKey", pm.response.json().api_key);',
    "}",
]


def openapi_spec() -> dict:
    """The API's OpenAPI document (it does not depend on the services behind the app)."""
    from helpers.api.app import ApiServices, create_app

    offline = ApiServices(None, None, None, None, None, admin_key_hash="")
    return create_app(offline).openapi()


def collection_from_openapi(spec: dict) -> dict:
    """A Postman v2.1 collection with one request per operation of `spec`."""
    folders: dict[str, list] = {}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            tag = (operation.get("tags") or ["api"])[0]
            folders.setdefault(tag, []).append(_request(spec, path, method, operation))
    return {
        "info": {
            "name": spec["info"]["title"],
            "description": spec["info"].get("description", ""),
            "schema": SCHEMA,
        },
        "auth": _bearer("{{apiKey}}"),
        "variable": [
            {"key": "baseUrl", "value": "http://127.0.0.1:8000"},
            {"key": "adminKey", "value": ""},
            {"key": "apiKey", "value": ""},
            {"key": "model_id", "value": "m1"},
        ],
        "item": [{"name": tag, "item": items} for tag, items in folders.items()],
    }


def _bearer(token: str) -> dict:
    return {"type": "bearer", "bearer": [{"key": "token", "value": token, "type": "string"}]}


def _request(spec: dict, path: str, method: str, operation: dict) -> dict:
    segments = [re.sub(r"^\{(.+)\}$", r":\1", part) for part in path.strip("/").split("/")]
    request: dict = {
        "method": method.upper(),
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
        request["url"]["variable"] = [{"key": v, "value": f"{{{{{v}}}}}"} for v in variables]
    if not operation.get("security"):
        request["auth"] = {"type": "noauth"}
    elif path == "/v1/users" and method == "post":
        request["auth"] = _bearer("{{adminKey}}")
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        request["header"].append({"key": "Content-Type", "value": "application/json"})
        example = _example(spec, content["application/json"]["schema"])
        request["body"] = {"mode": "raw", "raw": json.dumps(example, indent=2)}
    elif "multipart/form-data" in content:
        request["body"] = {
            "mode": "formdata",
            "formdata": [{"key": "files", "type": "file", "src": []}],
        }
    item = {"name": operation.get("summary") or f"{method.upper()} {path}", "request": request}
    if path == "/v1/users" and method == "post":
        item["event"] = [
            {"listen": "test", "script": {"type": "text/javascript", "exec": _SAVE_KEY}}
        ]
    return item


def _example(spec: dict, schema: dict) -> dict:
    """The first example of a body schema (resolving `$ref` and optional bodies)."""
    for option in schema.get("anyOf", [schema]):
        if "$ref" in option:
            name = option["$ref"].rsplit("/", 1)[-1]
            examples = spec["components"]["schemas"][name].get("examples") or [{}]
            return examples[0]
    return {}


def write_documentation(folder: str | Path) -> list[Path]:
    """Write the spec and the collection into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = openapi_spec()
    files = {OPENAPI_FILE: spec, COLLECTION_FILE: collection_from_openapi(spec)}
    written = []
    for name, document in files.items():
        path = folder / name
        path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_documentation(sys.argv[1] if len(sys.argv) > 1 else "documentation"):
        print(f"wrote {path}")
