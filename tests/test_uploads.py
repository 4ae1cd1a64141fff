"""Uploads are bounded: authenticated before the body is read, limited in bytes, files and
decoded pixels, decoded off the event loop, and presigned as POST forms S3 checks; pending
uploads and photos can be listed and deleted.

The API runs over the real local store and SQLite (the fixtures of `test_api.py`); presigned
forms run over S3 in moto.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import struct
import threading
import time
import zlib

import pytest
from aws_fakes import fake_aws
from fastapi.testclient import TestClient
from PIL import Image
from test_api import (
    api_services,
    bearer,
    error_of,
    make_user,
    photo_files,
)

from helpers.api import create_app
from helpers.api.app import MAX_UPLOAD_BYTES
from helpers.domain.paths import photos_prefix, uploads_prefix
from helpers.services import photos

REGION = "eu-west-1"
BOUNDARY = "upload-test-boundary"


@pytest.fixture
def services(tmp_path):
    return api_services(tmp_path)


@pytest.fixture
def client(services):
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        yield client


def multipart(files: list[tuple[str, bytes]]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def call_raw(app, headers: dict, body: bytes, declared: int | None = None):
    """POST /v1/photos straight to the ASGI app; returns (status, JSON body, chunks read)."""
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]
    reads: list[int] = []

    async def receive():
        if len(reads) < len(chunks):
            reads.append(len(chunks[len(reads)]))
            return {
                "type": "http.request",
                "body": chunks[len(reads) - 1],
                "more_body": len(reads) < len(chunks),
            }
        await asyncio.sleep(3600)  # a client that sends nothing more

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    all_headers = {
        "content-type": f"multipart/form-data; boundary={BOUNDARY}",
        "content-length": str(len(body) if declared is None else declared),
        **{name.lower(): value for name, value in headers.items()},
    }
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/photos",
        "raw_path": b"/v1/photos",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload), reads


def stored(api, user_id: str, prefix=photos_prefix) -> list[str]:
    return api.store.list(prefix(api.settings.bucket, user_id))


def pngs(count: int) -> list[tuple[str, bytes]]:
    return [(name, data) for _, (name, data, _) in photo_files(count=count)]


def bomb(width: int, height: int) -> bytes:
    """A small PNG whose header declares `width` x `height` pixels (its data is 64x64)."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64)).save(buffer, format="PNG")
    png = buffer.getvalue()
    start = png.index(b"IHDR")
    chunk = bytearray(png[start : start + 17])
    chunk[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(chunk)))
    return png[:start] + bytes(chunk) + crc + png[start + 21 :]


# ---------------------------------------------------------------------------- before the body


def test_a_missing_malformed_or_wrong_key_is_refused_before_the_body_is_read(services):
    app = create_app(services)
    with TestClient(app) as setup:
        key = make_user(setup, "ada")
    body = multipart(pngs(3))
    for headers in ({}, {"Authorization": "Basic YWRhOng="}, bearer("ada." + "x" * 43)):
        status, answer, reads = call_raw(app, headers, body)
        assert status == 401, answer
        assert answer["error"]["field"] == "Authorization"
        assert reads == []  # not one byte of the body was asked for
    status, answer, reads = call_raw(app, key, body)
    assert status == 201 and answer["count"] == 3
    assert sum(reads) == len(body)


def test_a_declared_oversize_body_is_refused_at_once(services):
    app = create_app(services)
    with TestClient(app) as setup:
        key = make_user(setup, "ada")
    status, answer, reads = call_raw(app, key, b"", declared=MAX_UPLOAD_BYTES + 1)
    assert status == 413 and answer["error"]["code"] == "body_too_large"
    assert reads == []


def test_a_streamed_oversize_body_is_a_413_not_a_400(client, services):
    headers = make_user(client, "ada")
    body = multipart(pngs(3))
    padding = b"\0" * (1024 * 1024)

    def chunked():  # no Content-Length: the body is sent chunked and grows past the limit
        yield body[: len(body) // 2]
        for _ in range(MAX_UPLOAD_BYTES // len(padding) + 1):
            yield padding

    answer = client.post(
        "/v1/photos",
        content=chunked(),
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert answer.status_code == 413, answer.text
    assert error_of(answer)["code"] == "body_too_large"
    assert stored(services, "ada") == []


# ---------------------------------------------------------------------------- the body


def test_a_body_that_is_not_multipart_is_a_415(client):
    headers = make_user(client, "ada")
    answer = client.post("/v1/photos", json={"files": ["x"]}, headers=headers)
    assert answer.status_code == 415
    error = error_of(answer)
    assert (error["field"], error["allowed"]) == ("Content-Type", "multipart/form-data")


@pytest.mark.parametrize(
    ("files", "data", "message"),
    [
        (None, {"photos": "x"}, "at least one photo"),  # no `files` part
        (None, {"files": "not a file"}, "file part"),  # `files` as a text field
        ([("files", (f"{i}.png", b"x", "image/png")) for i in range(11)], None, "at most 10"),
    ],
)
def test_files_missing_as_text_or_too_many_are_a_422_naming_files(
    client, services, files, data, message
):
    headers = make_user(client, "ada")
    if files is None:  # a multipart body without a file part
        files = [("other", ("x.txt", b"x", "text/plain"))]
    answer = client.post("/v1/photos", files=files, data=data, headers=headers)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["field"] == "files" and message in error["message"]
    assert error["allowed"].startswith("1 to 10 PNG, JPEG or WEBP files")
    assert stored(services, "ada") == []


def test_a_malformed_multipart_body_is_a_400_naming_files(client):
    headers = make_user(client, "ada")
    answer = client.post(
        "/v1/photos",
        content=b"--wrong\r\nnot multipart at all",
        headers={**headers, "Content-Type": "multipart/form-data"},  # no boundary
    )
    assert answer.status_code == 400
    error = error_of(answer)
    assert (error["code"], error["field"]) == ("malformed_multipart", "files")


def test_the_pixel_budget_of_one_upload_is_a_422_naming_it(client, services):
    headers = make_user(client, "ada")
    files = [("files", (f"{i}.png", bomb(4096, 4096 - i), "image/png")) for i in range(5)]
    assert sum(len(f[1][1]) for f in files) < 2000  # 84 MP declared in under 2 KB
    answer = client.post("/v1/photos", files=files, headers=headers)
    assert answer.status_code == 422
    error = error_of(answer)
    assert error["field"] == "files[(all files)].total_pixels"
    budget = photos.UPLOAD_RULES.max_total_pixels
    assert error["allowed"].startswith(f"at most {budget:,} pixels")
    assert stored(services, "ada") == []


def test_uploads_decode_in_a_worker_thread_while_other_requests_are_served(client, monkeypatch):
    headers = make_user(client, "ada")
    entered, release, released = threading.Event(), threading.Event(), []

    def slow_add_photos(*args):
        entered.set()
        released.append(release.wait(timeout=10))  # False if nothing else could run
        return []

    monkeypatch.setattr(photos, "add_photos", slow_add_photos)
    answers = []
    upload = threading.Thread(
        target=lambda: answers.append(
            client.post("/v1/photos", files=photo_files(), headers=headers)
        )
    )
    upload.start()
    assert entered.wait(timeout=10)
    started = time.monotonic()
    health = client.get("/health")
    waited = time.monotonic() - started
    release.set()
    upload.join(timeout=20)
    assert health.status_code == 200 and waited < 5
    assert released == [True]
    assert answers[0].status_code == 201


def test_the_openapi_spec_documents_the_multipart_body(client):
    operation = client.app.openapi()["paths"]["/v1/photos"]["post"]
    body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["files"]
    files = body["properties"]["files"]
    assert (files["minItems"], files["maxItems"]) == (1, 10)
    assert files["items"] == {"type": "string", "format": "binary"}
    assert {"401", "409", "413", "415", "422"} <= set(operation["responses"])


# ---------------------------------------------------------------------------- photos


def test_a_photo_is_deleted_by_name_and_other_names_are_404(client, services):
    ada, bo = make_user(client, "ada"), make_user(client, "bo")
    names = [
        p["name"]
        for p in client.post("/v1/photos", files=photo_files(), headers=ada).json()["photos"]
    ]
    assert client.delete(f"/v1/photos/{names[0]}", headers=bo).status_code == 404
    answer = client.delete(f"/v1/photos/{names[0]}", headers=ada)
    assert answer.status_code == 204 and answer.content == b""
    assert [p["name"] for p in client.get("/v1/photos", headers=ada).json()["photos"]] == sorted(
        names[1:]
    )
    for name in (names[0], "x.png", "..", "%2E%2E%2Fuploads%2Fx", f"..%2F{names[1]}"):
        answer = client.delete(f"/v1/photos/{name}", headers=ada)
        assert answer.status_code == 404, name
        assert error_of(answer)["code"] in ("photo_not_found", "not_found")
    assert len(stored(services, "ada")) == 2


# ---------------------------------------------------------------------------- presigned uploads


@pytest.fixture
def s3_services(services, monkeypatch):
    """The API's services with the artifact store on S3 (moto)."""
    from moto import mock_aws

    from helpers.infra.aws.store import S3ArtifactStore

    fake_aws(monkeypatch, REGION)
    with mock_aws():
        store = S3ArtifactStore(REGION)
        store.create_bucket(services.settings.bucket)
        yield dataclasses.replace(services, store=store)


@pytest.fixture
def s3_client(s3_services):
    with TestClient(create_app(s3_services), raise_server_exceptions=False) as s3_client:
        yield s3_client


def post_form(upload: dict, data: bytes, content_type: str = "image/png"):
    import requests  # moto answers S3 for `requests` too

    files = {"file": ("photo", data, content_type)}
    return requests.post(upload["url"], data=upload["fields"], files=files, timeout=10)


def test_upload_forms_are_presigned_posts_bounded_by_size_and_type(s3_client, s3_services):
    headers = make_user(s3_client, "ada")
    answer = s3_client.post(
        "/v1/photos/upload-urls", json={"count": 3, "content_type": "image/png"}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    forms = answer.json()
    assert forms["max_bytes"] == photos.UPLOAD_RULES.max_bytes
    for upload in forms["uploads"]:
        assert upload["method"] == "POST"
        assert upload["fields"]["key"].endswith(f"users/ada/uploads/{upload['id']}")
        policy = json.loads(base64.b64decode(upload["fields"]["policy"]))
        assert ["content-length-range", 1, photos.UPLOAD_RULES.max_bytes] in policy["conditions"]
        assert {"Content-Type": "image/png"} in policy["conditions"]
    for upload, (_, data) in zip(forms["uploads"], pngs(3), strict=True):
        assert post_form(upload, data).status_code == 204
    pending = s3_client.get("/v1/photos/uploads", headers=headers).json()
    assert sorted(u["id"] for u in pending["uploads"]) == sorted(u["id"] for u in forms["uploads"])
    assert all(u["bytes"] > 0 for u in pending["uploads"]) and pending["count"] == 3
    started = s3_client.post("/v1/models", json={}, headers=headers)
    assert started.status_code == 202, started.text
    assert s3_client.get("/v1/photos", headers=headers).json()["count"] == 3
    assert s3_client.get("/v1/photos/uploads", headers=headers).json()["count"] == 0


def test_a_content_type_outside_the_photo_types_is_refused(s3_client):
    headers = make_user(s3_client, "ada")
    answer = s3_client.post(
        "/v1/photos/upload-urls",
        json={"count": 1, "content_type": "image/svg+xml"},
        headers=headers,
    )
    assert answer.status_code == 422
    assert error_of(answer)["field"] == "content_type"


def test_pending_uploads_and_photos_together_are_bounded(s3_client, s3_services):
    headers = make_user(s3_client, "ada")
    for _ in range(2):
        forms = s3_client.post("/v1/photos/upload-urls", json={"count": 10}, headers=headers)
        assert forms.status_code == 200, forms.text
        for upload in forms.json()["uploads"]:  # posted: each now counts as pending
            key = upload["fields"]["key"]
            s3_services.store.put_bytes(f"s3://{s3_services.settings.bucket}/{key}", b"x")
    answer = s3_client.post("/v1/photos/upload-urls", json={"count": 1}, headers=headers)
    assert answer.status_code == 409
    error = error_of(answer)
    assert (error["code"], error["field"]) == ("too_many_photos", "count")
    assert error["allowed"] == "at most 0 more uploads"
    assert "DELETE /v1/photos/uploads/{upload_id}" in error["message"]


def test_a_pending_upload_is_deleted_by_id_and_only_by_its_owner(s3_client, s3_services):
    ada, bo = make_user(s3_client, "ada"), make_user(s3_client, "bo")
    [upload] = s3_client.post("/v1/photos/upload-urls", json={}, headers=ada).json()["uploads"]
    assert post_form(upload, pngs(1)[0][1], "image/jpeg").status_code == 204
    assert s3_client.delete(f"/v1/photos/uploads/{upload['id']}", headers=bo).status_code == 404
    answer = s3_client.delete(f"/v1/photos/uploads/{upload['id']}", headers=ada)
    assert answer.status_code == 204
    again = s3_client.delete(f"/v1/photos/uploads/{upload['id']}", headers=ada)
    assert again.status_code == 404
    assert (error_of(again)["code"], error_of(again)["field"]) == ("upload_not_found", "upload_id")
    assert stored(s3_services, "ada", uploads_prefix) == []


def test_local_backend_explains_presigned_uploads_and_lists_none(client):
    headers = make_user(client, "ada")
    answer = client.post("/v1/photos/upload-urls", json={"count": 2}, headers=headers)
    assert answer.status_code == 409
    assert error_of(answer)["code"] == "presign_not_supported"
    assert "POST /v1/photos" in error_of(answer)["message"]
    assert client.get("/v1/photos/uploads", headers=headers).json() == {"uploads": [], "count": 0}


# ---------------------------------------------------------------------------- collecting uploads


def put_upload(api, user_id: str, upload_id: str, data: bytes) -> str:
    uri = uploads_prefix(api.settings.bucket, user_id) + upload_id
    api.store.put_bytes(uri, data)
    return uri


def test_an_oversize_upload_is_deleted_unread_and_the_good_ones_collected(
    client, services, monkeypatch
):
    """S3 refuses a POST over the policy's size; should one be there anyway (moto, or an
    object put by other means), fine-tuning never reads it."""
    headers = make_user(client, "ada")
    for index, (_, data) in enumerate(pngs(3)):
        put_upload(services, "ada", f"{index:032x}", data)
    big = put_upload(services, "ada", "f" * 32, b"\x89PNG" + b"\0" * (11 * 1024 * 1024))
    read = []
    get_bytes = services.store.get_bytes
    monkeypatch.setattr(services.store, "get_bytes", lambda uri: read.append(uri) or get_bytes(uri))
    answer = client.post("/v1/models", json={}, headers=headers)
    assert answer.status_code == 422
    error = error_of(answer)
    assert error["code"] == "invalid_photos"
    assert error["field"] == f"files[{'f' * 32}].bytes"
    assert "deleted without being read" in error["message"]
    assert big not in read
    assert not services.store.exists(big)
    assert len(stored(services, "ada")) == 3  # the good ones became photos
    assert client.post("/v1/models", json={}, headers=headers).status_code == 202


def test_too_many_pending_uploads_is_too_many_photos_and_nothing_is_read(
    client, services, monkeypatch
):
    headers = make_user(client, "ada")
    for index in range(photos.MAX_PHOTOS + 1):
        put_upload(services, "ada", f"{index:032x}", b"x")
    monkeypatch.setattr(services.store, "get_bytes", lambda uri: pytest.fail(f"read {uri}"))
    answer = client.post("/v1/models", json={}, headers=headers)
    assert answer.status_code == 409
    error = error_of(answer)
    assert (error["code"], error["field"]) == ("too_many_photos", "uploads")
    assert error["allowed"] == f"at most {photos.MAX_PHOTOS} pending uploads"


def test_too_few_photos_keeps_its_own_code(client):
    headers = make_user(client, "ada")
    client.post("/v1/photos", files=photo_files(count=2), headers=headers)
    answer = client.post("/v1/models", json={}, headers=headers)
    assert answer.status_code == 409
    assert (error_of(answer)["code"], error_of(answer)["field"]) == ("not_enough_photos", "photos")
