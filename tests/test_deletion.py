"""Deleting a user leaves nothing of them anywhere, even when the deletion is interrupted and
run again: over the real local store, SQLite, training-job subprocesses and (slow) Triton."""

from __future__ import annotations

import sqlite3
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from helpers.api import ApiServices, create_app
from helpers.api.auth import hash_key, new_key
from helpers.domain.paths import (
    adapter_prefix,
    code_prefix,
    endpoint_prefix,
    job_name_for,
    photos_prefix,
    retry_job_name,
    training_photos_prefix,
    uploads_prefix,
)
from helpers.domain.records import JobStatus, ModelRecord, UserRecord
from helpers.infra.local.jobs import LocalTrainingJobs
from helpers.infra.local.metadata import SqliteMetadataStore
from helpers.infra.local.store import LocalArtifactStore
from helpers.ports.endpoint import Endpoint
from helpers.services.local_onboarding import LocalOnboarding
from helpers.services.onboarding import training_request
from helpers.settings import load_settings

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"

#: Stands in for the training script: writes a model and a log line, as the script would.
STUB_SCRIPT = """
import os, pathlib
pathlib.Path(os.environ["SM_MODEL_DIR"], "pytorch_lora_weights.safetensors").write_bytes(b"w")
print("step=1 loss=0.5", flush=True)
"""


class FlakyStore(LocalArtifactStore):
    """The real local store, whose `delete` fails once `budget` deletes have succeeded."""

    budget: int | None = None

    def delete(self, uri) -> None:
        if self.budget is not None:
            if self.budget <= 0:
                raise OSError("the store went away")
            self.budget -= 1
        super().delete(uri)


class CopiesEndpoint(Endpoint):
    """An endpoint that holds copies of models by name; `forget` drops them (the real one,
    Triton's, is in the slow test below)."""

    name, prefix_uri = "test", None

    def __init__(self, loaded: set[str]) -> None:
        self.loaded = set(loaded)
        self.forgotten: list[list[str]] = []

    def forget(self, model_names):
        self.forgotten.append(list(model_names))
        gone = sorted(self.loaded & set(model_names))
        self.loaded -= set(model_names)
        return gone

    def deploy(self, **_):
        raise NotImplementedError

    wait = describe = runtime_client_options = stop = deploy


@pytest.fixture
def world(tmp_path):
    """Two users, ada and bo, each with photos, an upload, a model trained twice (an
    interrupted first attempt, then a retry) by real job subprocesses, job code, an endpoint
    archive and adapter, and a copy loaded on the endpoint."""
    settings = load_settings(work_dir=tmp_path / "work")
    store = FlakyStore(settings.store_root)
    store.create_bucket(settings.bucket)
    metadata = SqliteMetadataStore(settings.metadata_path)
    metadata.create_table()
    script = tmp_path / "stub_train.py"
    script.write_text(textwrap.dedent(STUB_SCRIPT))
    base_model = tmp_path / "base"
    base_model.mkdir()
    jobs = LocalTrainingJobs(settings, store, metadata, poll_interval=0.05, script=script)
    keys = {user: _populate(settings, store, metadata, jobs, user, base_model) for user in USERS}
    endpoint = CopiesEndpoint({f"{user}--m1" for user in USERS})
    services = ApiServices(
        settings=settings,
        store=store,
        metadata=metadata,
        onboarding=LocalOnboarding(settings, store, metadata, jobs),
        generator=None,
        admin_key_hash=hash_key(ADMIN_KEY),
        jobs=jobs,
        endpoint=endpoint,
    )
    with TestClient(create_app(services), raise_server_exceptions=False) as client:
        yield client, services, keys
    jobs.close(stop_jobs=True)


USERS = ("ada", "bo")


def _populate(settings, store, metadata, jobs, user_id: str, base_model: Path) -> str:
    key = new_key(user_id)
    metadata.put_user(UserRecord(user_id, api_key_hash=hash_key(key)))
    bucket = settings.bucket
    for i in range(3):
        store.put_bytes(f"{photos_prefix(bucket, user_id)}{i}.png", b"png")
        store.put_bytes(f"{training_photos_prefix(bucket, user_id, 'm1')}{i}.png", b"png")
    store.put_bytes(f"{uploads_prefix(bucket, user_id)}pending.png", b"png")
    first = job_name_for(user_id, "m1")
    model = ModelRecord(
        user_id,
        "m1",
        instance_data_uri=training_photos_prefix(bucket, user_id, "m1"),
        training_job_name=retry_job_name(first, 2),
    )
    metadata.create_model(model)
    request = replace(training_request(settings, model), base_model=str(base_model))
    for job_name in (first, retry_job_name(first, 2)):
        jobs.submit(replace(request, job_name=job_name))
        assert jobs.wait(job_name, user_id, timeout=60, poll=0.05).status == JobStatus.COMPLETED
        assert (jobs.job_dir(job_name) / "input" / "data" / "instance" / "0.png").is_file()
        store.put_bytes(f"{code_prefix(bucket, job_name)}sourcedir.tar.gz", b"code")
    models = endpoint_prefix(bucket)
    store.put_bytes(f"{models}{user_id}--m1.tar.gz", b"archive")
    store.put_bytes(f"{adapter_prefix(models)}{user_id}--m1.safetensors", b"lora")
    return key


def _names_user(name: str, user_id: str) -> bool:
    """Whether a file or folder name is the user's: `ada`, `ada--m1...`, `ada-m1-...` (a job)."""
    return name == user_id or name.startswith(f"{user_id}-")


def _store_keys(services, user_id: str) -> list[str]:
    uris = services.store.list(services.settings.uri(""))
    return [uri for uri in uris if any(_names_user(part, user_id) for part in uri.split("/"))]


def _local_paths(services, user_id: str) -> list[Path]:
    work_dir = Path(services.settings.work_dir)
    return [path for path in work_dir.rglob("*") if _names_user(path.name, user_id)]


def _job_folders(services, user_id: str) -> list[Path]:
    return list(services.jobs.jobs_dir.glob(f"{user_id}-*"))


def _items(services, user_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(services.settings.metadata_path) as connection:
        return connection.execute(
            "SELECT sk, entity FROM items WHERE user_id = ? OR item LIKE ?",
            (user_id, f'%"{user_id}%'),
        ).fetchall()


@pytest.mark.parametrize("budget", [0, 1, 6, 12], ids=lambda n: f"after-{n}-deletes")
def test_a_deletion_interrupted_halfway_finishes_when_run_again(world, budget):
    client, services, keys = world
    ada = {"Authorization": f"Bearer {keys['ada']}"}
    before = len(_store_keys(services, "ada"))
    assert before == 13
    assert len(_job_folders(services, "ada")) == 2  # both attempts' folders

    services.store.budget = budget
    answer = client.delete("/v1/users/me", headers=ada)
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "deletion_incomplete" and "again" in error["message"]
    assert answer.headers["Retry-After"] and "Traceback" not in answer.text
    # Halfway: the deletes before the failure happened; the records and the key are still there.
    assert len(_store_keys(services, "ada")) == before - budget
    assert services.metadata.get_user("ada").deleting_since is not None
    assert client.get("/v1/users/me", headers=ada).json()["error"]["code"] == (
        "account_being_deleted"
    )

    services.store.budget = None
    assert client.delete("/v1/users/me", headers=ada).status_code == 204

    # Nothing of ada is left anywhere: store, metadata (but the tombstone), job folders, and
    # the endpoint's copies.
    assert _store_keys(services, "ada") == []
    assert _items(services, "ada") == [("USER", "TOMBSTONE")]
    assert _local_paths(services, "ada") == []
    assert services.endpoint.loaded == {"bo--m1"}
    assert services.endpoint.forgotten[-1] == ["ada--m1"]
    assert client.delete("/v1/users/me", headers=ada).status_code == 401  # the key is gone
    retired = client.post(
        "/v1/users", json={"user_id": "ada"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert retired.json()["error"]["code"] == "user_id_retired"

    # bo keeps everything.
    assert len(_store_keys(services, "bo")) == before
    assert len(_job_folders(services, "bo")) == 2
    assert [model.model_id for model in services.metadata.list_models("bo")] == ["m1"]
    assert len(services.metadata.list_jobs("bo")) == 2
    bo = {"Authorization": f"Bearer {keys['bo']}"}
    assert client.get("/v1/users/me", headers=bo).json()["user_id"] == "bo"


def test_forgetting_a_job_never_touches_another_users(world):
    _, services, _ = world
    bo_job = job_name_for("bo", "m1")
    services.jobs.forget(bo_job, "ada")  # ada naming bo's job
    assert services.jobs.job_dir(bo_job).is_dir()
    assert services.metadata.get_job("bo", bo_job) is not None
    services.jobs.forget(bo_job, "bo")
    assert not services.jobs.job_dir(bo_job).exists()
    assert services.metadata.get_job("bo", bo_job) is None
    services.jobs.forget(bo_job, "bo")  # gone already: fine


@pytest.mark.slow
def test_deleting_a_user_unloads_their_model_from_triton_and_removes_its_files(
    tmp_path, lora_weights, tiny_pipeline_dir
):
    from helpers.domain.generation import invoke_model
    from helpers.infra.local.endpoint import LocalEndpoint
    from helpers.services.onboarding import delete_user_data
    from helpers.services.packaging import build_archive

    settings = load_settings(work_dir=tmp_path / "work")
    store = LocalArtifactStore(settings.store_root)
    store.create_bucket(settings.bucket)
    metadata = SqliteMetadataStore(settings.metadata_path)
    metadata.create_table()
    prefix = endpoint_prefix(settings.bucket)
    for user in USERS:
        metadata.put_user(UserRecord(user))
        metadata.create_model(ModelRecord(user, "m1"))
        archive = build_archive(
            f"{user}--m1", lora_weights, str(tiny_pipeline_dir), tmp_path / f"{user}.tar.gz"
        )
        store.put_file(f"{prefix}{user}--m1.tar.gz", archive)
    jobs = LocalTrainingJobs(settings, store, metadata)
    onboarding = LocalOnboarding(settings, store, metadata, jobs)
    with LocalEndpoint(store, prefix, tmp_path / "endpoint", max_loaded_models=2) as endpoint:
        for user in USERS:
            invoke_model(
                endpoint.runtime_client(),
                endpoint.name,
                f"{user}--m1.tar.gz",
                "a photo of sks toy",
                num_inference_steps=1,
            )
        assert sorted(endpoint.loaded_models()) == ["ada--m1", "bo--m1"]
        ada_pids = endpoint.triton.model_stub_pids("ada--m1")
        assert ada_pids

        delete_user_data(store, metadata, onboarding, settings, "ada", endpoint=endpoint)

        assert endpoint.loaded_models() == ["bo--m1"]
        assert not (endpoint.run_dir / "ada--m1").exists()
        assert (endpoint.run_dir / "bo--m1").is_dir()
        assert not store.exists(f"{prefix}ada--m1.tar.gz")
        leftovers = Path(tmp_path / "endpoint").rglob("*")
        assert [path for path in leftovers if _names_user(path.name, "ada")] == []
        deadline = time.monotonic() + 30  # Triton's stub exits a moment after the unload
        while any(psutil.pid_exists(pid) for pid in ada_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(psutil.pid_exists(pid) for pid in ada_pids)
        assert endpoint.triton.model_stub_pids("bo--m1")
    jobs.close()


def test_the_router_forgets_a_users_models_and_resets_a_shared_base(tmp_path):
    """`ModelCache.forget`, with Triton's repository API recorded: the user's model and the
    shared base (whose adapter cache may hold theirs) are unloaded and their folders removed;
    another user's model stays loaded."""
    import asyncio

    import httpx

    from helpers.infra.local.mme_router import ModelCache

    cache = ModelCache(LocalArtifactStore(tmp_path / "store"), "s3://b/m/", "http://t", tmp_path)
    calls = []

    def triton(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200)

    cache.triton = httpx.AsyncClient(base_url="http://t", transport=httpx.MockTransport(triton))
    configs = {
        "ada--m1": 'name: "ada--m1"',
        "bo--m1": 'name: "bo--m1"',
        "shared": 'parameters { key: "adapter_source", value: { string_value: "/a" } }',
    }
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(config)
        cache.loaded[name] = tmp_path / name

    assert asyncio.run(cache.forget(["ada--m1", "ada--m2"])) == ["ada--m1", "shared"]
    assert list(cache.loaded) == ["bo--m1"]
    assert sorted(calls) == [
        "/v2/repository/models/ada--m1/unload",
        "/v2/repository/models/shared/unload",
    ]
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "store") == ["bo--m1"]


def test_a_model_requested_as_the_deletion_begins_leaves_nothing(tmp_path):
    """A `POST /v1/models` let in just before its account was marked for deletion gets a
    clear refusal, and its photo snapshot does not outlive the deletion."""
    from helpers.ports.metadata import NotFound
    from helpers.services.onboarding import request_model
    from helpers.services.photos import add_photos
    from helpers.workshop.demo_subjects import get_demo_subject, subject_images

    settings = load_settings(work_dir=tmp_path)
    store = LocalArtifactStore(settings.store_root)
    store.create_bucket(settings.bucket)
    metadata = SqliteMetadataStore(tmp_path / "metadata.sqlite")
    metadata.create_table()
    metadata.put_user(UserRecord("ada"))
    photos = subject_images(get_demo_subject("demo-ada"), count=3)
    add_photos(
        store, settings, "ada", [(f"{i}.png", _png(image)) for i, image in enumerate(photos)]
    )
    user = metadata.get_user("ada")
    metadata.update_user("ada", expected_version=user.version, deleting_since=user.created_at)

    with pytest.raises(NotFound):
        request_model(metadata, store, settings, "ada")

    assert store.list(training_photos_prefix(settings.bucket, "ada", "m1")) == []
    assert metadata.list_models("ada") == []


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
