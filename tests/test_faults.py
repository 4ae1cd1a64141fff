"""Failure paths of onboarding, end to end: what a user reads when training fails, and a
kill -9 of the process that drives training (nothing survives it, nothing is trained twice)."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from test_sockets import (
    ADMIN_KEY as STACK_ADMIN_KEY,
)
from test_sockets import (
    alive,
    start_workshop_api,
    tree,
    wait_healthy,
    workshop_api_env,
)
from test_sockets import wait_for as wait_until

from helpers.api import ApiServices, create_app
from helpers.api.auth import hash_key
from helpers.backend import open_backend
from helpers.domain import failures
from helpers.domain.records import JobStatus, UserRecord
from helpers.infra.local.jobs import INTERRUPTED_REASON, LocalTrainingJobs
from helpers.infra.local.metadata import SqliteMetadataStore
from helpers.services.local_onboarding import LocalOnboarding
from helpers.services.photos import add_photos
from helpers.settings import load_settings
from helpers.workshop.demo_subjects import get_demo_subject, subject_images
from helpers.workshop.personalization import png_bytes

ADMIN_KEY = "admin-key-for-fault-tests-0123456789"
#: What a failing script prints and leaves as its failure file: everything a user must not see.
LEAKY = (
    "Traceback (most recent call last):\n"
    '  File "/srv/secret/model_code/train.py", line 7, in <module>\n'
    "OSError: cannot read s3://{bucket}/users/ada/images/0.png from /var/lib/work/jobs\n"
)


@pytest.fixture
def platform(tmp_path, tiny_pipeline_dir):
    settings = load_settings(work_dir=tmp_path / "work", base_model=str(tiny_pipeline_dir))
    provisioned = open_backend(settings).provision()
    return settings, provisioned.store, provisioned.metadata


def add_user_with_photos(settings, store, metadata, user_id: str = "ada") -> None:
    metadata.put_user(UserRecord(user_id))
    images = subject_images(get_demo_subject("demo-ada"), count=3)
    photos = [(f"{i}.png", png_bytes(image)) for i, image in enumerate(images)]
    add_photos(store, settings, user_id, photos)


def test_a_failed_job_shows_its_user_a_phrase_and_a_reference_never_its_log(platform, tmp_path):
    settings, store, metadata = platform
    script = tmp_path / "leaky.py"
    leak = LEAKY.format(bucket=settings.bucket)
    script.write_text(
        "import os, pathlib, sys\n"
        f"text = {leak!r}\n"
        "sys.stderr.write(text)\n"
        "pathlib.Path(os.environ['SM_OUTPUT_DIR'], 'failure').write_text(text)\n"
        "sys.exit(1)\n"
    )
    jobs = LocalTrainingJobs(settings, store, metadata, poll_interval=0.05, script=script)
    worker = LocalOnboarding(settings, store, metadata, jobs)
    services = ApiServices(
        settings=settings,
        store=store,
        metadata=metadata,
        onboarding=worker,
        generator=None,
        admin_key_hash=hash_key(ADMIN_KEY),
    )
    try:
        with TestClient(create_app(services), raise_server_exceptions=False) as client:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            key = client.post("/v1/users", json={"user_id": "ada"}, headers=admin).json()
            headers = {"Authorization": f"Bearer {key['api_key']}"}
            images = subject_images(get_demo_subject("demo-ada"), count=3)
            files = [
                ("files", (f"{i}.png", png_bytes(image), "image/png"))
                for i, image in enumerate(images)
            ]
            assert client.post("/v1/photos", files=files, headers=headers).status_code == 201
            assert client.post("/v1/models", json={}, headers=headers).status_code == 202
            worker.wait(timeout=120)
            answers = [
                client.get("/v1/models/m1", headers=headers),
                client.get("/v1/models", headers=headers),
                client.post(
                    "/v1/generations", json={"prompt": "a toy", "model_id": "m1"}, headers=headers
                ),
            ]
    finally:
        worker.close()
        jobs.close(stop_jobs=True)

    model = answers[0].json()
    reference = metadata.get_model("ada", "m1").params["failure"]["reference"]
    assert model["status"] == "FAILED"
    assert model["failure_reason"] == f"{failures.TRAINING_FAILED} (ref {reference})"
    assert answers[2].status_code == 409 and reference in answers[2].text
    for answer in answers:
        for secret in ("Traceback", "s3://", settings.bucket, "/srv/", "/var/lib", "OSError"):
            assert secret not in answer.text, (secret, answer.text)
        assert not re.search(r"(^|[\s(\"'])/[a-z]", answer.text), answer.text  # no path
    # The operator finds the details by the reference: on the model and on the job.
    stored = metadata.get_model("ada", "m1")
    assert "OSError: cannot read s3://" in stored.params["failure"]["detail"]
    assert "OSError" in metadata.get_job("ada", stored.training_job_name).failure_reason


def test_a_reason_outside_the_vocabulary_never_reaches_the_user():
    assert failures.public_reason(None) is None
    assert failures.public_reason("packaging failed (ref 3f9c0a1b2d4e)") == (
        "packaging failed (ref 3f9c0a1b2d4e)"
    )
    assert failures.public_reason("training was interrupted 3 times (ref ada-m1)") == (
        "training was interrupted 3 times (ref ada-m1)"
    )
    for leaky in (
        "training: exit status 1; last log lines:\nTraceback ...",
        "packaging failed (ref ../../etc/passwd)",
        "packaging failed (ref x) s3://bucket/key",
        "Package failed: States.TaskFailed: s3://workshop-artifacts/jobs/x",
    ):
        assert failures.public_reason(leaky) == failures.ONBOARDING_FAILED
    with pytest.raises(ValueError, match="not in the failure vocabulary"):
        failures.user_reason("training failed: /srv/x", "abc")


@pytest.mark.slow
def test_kill_9_of_workshop_api_during_training_leaves_nothing_and_a_restart_finishes(
    tmp_path, tiny_pipeline_dir
):
    """`kill -9` of `workshop api` while a model trains: its training job, Triton and stubs
    die with it; a restart on the same ports comes up (no port left taken) and the model ends
    AVAILABLE after exactly one completed training job."""
    env = workshop_api_env(tmp_path, tiny_pipeline_dir)
    url = f"http://127.0.0.1:{env['WORKSHOP_API_PORT']}"
    log = tmp_path / "workshop-api.log"
    server = start_workshop_api(env, log)
    seen: dict[int, psutil.Process] = {}
    try:
        wait_healthy(url, server, log)
        admin = {"Authorization": f"Bearer {STACK_ADMIN_KEY}"}
        key = httpx.post(f"{url}/v1/users", json={"user_id": "ada"}, headers=admin).json()
        ada = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key['api_key']}"}, timeout=60
        )
        images = subject_images(get_demo_subject("demo-ada"), count=3)
        files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
        assert ada.post("/v1/photos", files=files).status_code == 201
        assert ada.post("/v1/models", json={"max_train_steps": 40}).status_code == 202

        def training_now():
            processes = tree(psutil.Process(server.pid))
            seen.update({p.pid: p for p in processes})
            return any("train_dreambooth_lora" in " ".join(_cmdline(p)) for p in processes)

        wait_until(training_now, 120, "the training job")
        server.kill()
        server.wait()
        wait_until(lambda: not [p for p in seen.values() if alive(p)], 30, "the tree to die")

        server = start_workshop_api(env, log)  # the same ports: nothing may hold them
        wait_healthy(url, server, log)
        deadline = time.monotonic() + 300
        while ada.get("/v1/models/m1").json()["status"] not in ("AVAILABLE", "FAILED"):
            assert time.monotonic() < deadline, "the model did not finish in 300 s"
            time.sleep(2)  # well under the tenant's 120 requests a minute
        assert ada.get("/v1/models/m1").json()["status"] == "AVAILABLE"
        metadata = SqliteMetadataStore(Path(env["WORKSHOP_WORK_DIR"]) / "metadata.sqlite")
        jobs = metadata.list_jobs("ada")
        assert [job.status for job in jobs].count(JobStatus.COMPLETED) == 1, jobs
        cut_short = [job for job in jobs if job.status != JobStatus.COMPLETED]
        assert [(j.status, j.failure_reason) for j in cut_short] == [
            (JobStatus.FAILED, INTERRUPTED_REASON)
        ]
    finally:
        if server.poll() is None:
            seen.update({p.pid: p for p in tree(psutil.Process(server.pid))})
            server.terminate()
            server.wait(timeout=60)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not [p for p in seen.values() if alive(p)], 30, "the tree")
        for process in [p for p in seen.values() if alive(p)]:
            process.kill()  # never left running for the rest of the suite


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []
