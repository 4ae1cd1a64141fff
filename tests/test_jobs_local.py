"""Local training jobs: real subprocess runs of the entry script on the random-init tiny
pipeline, three tiny images and three steps (a few seconds each on a CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from helpers.domain.records import JobRecord, JobStatus
from helpers.infra.local.jobs import INTERRUPTED_REASON, LocalTrainingJobs
from helpers.infra.local.metadata import SqliteMetadataStore
from helpers.infra.local.processes import start_time
from helpers.infra.local.store import LocalArtifactStore
from helpers.ports.jobs import JobExists, TrainingJobRequest, check_hyperparameters
from helpers.ports.metadata import NotFound
from helpers.settings import Settings
from helpers.workshop.demo_subjects import get_demo_subject, write_subject_images

BUCKET = "workshop-artifacts"
USER = "demo-ada"
IMAGES = f"s3://{BUCKET}/users/{USER}/images"
OUTPUT = f"s3://{BUCKET}/jobs"
FAST = {"max_train_steps": 3, "num_validation_images": 1, "num_inference_steps": 2}
TIMEOUT = 120


@pytest.fixture
def world(tmp_path, tiny_pipeline_dir):
    settings = Settings(work_dir=tmp_path / "work", base_model=str(tiny_pipeline_dir))
    store = LocalArtifactStore(settings.store_root)
    store.create_bucket(BUCKET)
    for path in write_subject_images(get_demo_subject(USER), tmp_path / "photos", count=3):
        store.put_file(f"{IMAGES}/{path.name}", path)
    metadata = SqliteMetadataStore(settings.metadata_path)
    metadata.create_table()
    return settings, store, metadata


@pytest.fixture
def make_jobs(world):
    made = []

    def make(**kwargs) -> LocalTrainingJobs:
        jobs = LocalTrainingJobs(*world, poll_interval=0.05, **kwargs)
        made.append(jobs)
        return jobs

    yield make
    for jobs in made:
        jobs.close(stop_jobs=True)


def request(settings: Settings, name: str, **changes) -> TrainingJobRequest:
    values = {
        "job_name": name,
        "user_id": USER,
        "model_id": "m1",
        "instance_data_uri": IMAGES,
        "base_model": settings.base_model,
        "output_path": OUTPUT,
        "hyperparameters": dict(FAST),
        **changes,
    }
    return TrainingJobRequest(**values)


def wait_for(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_job_trains_packages_the_model_and_survives_a_restart(world, make_jobs, tmp_path):
    settings, store, _ = world
    jobs = make_jobs()
    submitted = jobs.submit(request(settings, "ada-m1-1"))
    assert submitted.status in (JobStatus.PENDING, JobStatus.RUNNING)
    assert submitted.max_steps == 3
    seen = []
    done = jobs.wait("ada-m1-1", USER, timeout=TIMEOUT, poll=0.05, on_progress=seen.append)
    assert done.status == JobStatus.COMPLETED, jobs.logs("ada-m1-1", USER)
    assert (done.last_step, done.failure_reason) == (3, None)
    assert done.last_loss is not None and done.seconds > 0
    assert JobStatus.RUNNING in {d.status for d in seen} and seen[-1] == done
    assert "step=3 loss=" in jobs.logs("ada-m1-1", USER)

    # SageMaker's layout, and the archive holds the LoRA weights at its root.
    uri = f"{OUTPUT}/ada-m1-1/output/model.tar.gz"
    assert done.output_uri == uri and store.exists(uri)
    assert store.exists(f"{OUTPUT}/ada-m1-1/output/output.tar.gz")  # validation images
    store.get_file(uri, tmp_path / "model.tar.gz")
    with tarfile.open(tmp_path / "model.tar.gz") as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "model", filter="data")
    assert "pytorch_lora_weights.safetensors" in names
    assert (tmp_path / "model" / "training_summary.json").is_file()

    # A new instance (a restarted kernel) sees the job and its outcome.
    again = make_jobs()
    assert again.describe("ada-m1-1", USER) == done
    assert [d.job_name for d in again.list(USER)] == ["ada-m1-1"]
    with pytest.raises(JobExists, match="ada-m1-1"):
        again.submit(request(settings, "ada-m1-1"))
    with pytest.raises(NotFound, match="ada-m1-1"):
        again.describe("ada-m1-1", "someone-else")


def test_the_queue_runs_one_job_at_a_time_and_failures_keep_their_reason(
    world, make_jobs, tmp_path
):
    settings, store, _ = world
    jobs = make_jobs(max_concurrent=1)
    assert jobs.threads_per_job >= 1
    # Killed mid-training, as the kernel's out-of-memory killer would: the script writes no
    # failure file, so the exit status and the log tail explain it.
    long = {**FAST, "max_train_steps": 5000}
    jobs.submit(request(settings, "killed", hyperparameters=long))
    # Fails reading its photos: a file that is not an image slipped into the instance folder
    # (only the script sees it: submit checks the folder holds files, the upload checks them).
    mixed = f"s3://{BUCKET}/users/{USER}/mixed"
    for uri in store.list(IMAGES):
        store.put_bytes(f"{mixed}/{uri.rsplit('/', 1)[1]}", store.get_bytes(uri))
    store.put_bytes(f"{mixed}/notes.txt", b"not a photo")
    second = jobs.submit(request(settings, "bad-photo", instance_data_uri=mixed))
    # Fails while loading: a directory that is not a pipeline; the script writes the reason.
    (tmp_path / "empty").mkdir()
    third = jobs.submit(request(settings, "bad-base", base_model=str(tmp_path / "empty")))
    assert second.status == third.status == JobStatus.PENDING

    wait_for(lambda: "step=1 loss=" in jobs.logs("killed", USER))
    os.killpg(jobs._running[(USER, "killed")].process.pid, signal.SIGKILL)
    first = jobs.wait("killed", USER, timeout=TIMEOUT, poll=0.05)
    second = jobs.wait("bad-photo", USER, timeout=TIMEOUT, poll=0.05)
    third = jobs.wait("bad-base", USER, timeout=TIMEOUT, poll=0.05)

    assert first.status == second.status == third.status == JobStatus.FAILED
    assert first.failure_reason.startswith(f"exit status -{signal.SIGKILL}; last log lines:")
    assert "step=1 loss=" in first.failure_reason  # the tail shows how far it got
    assert "notes.txt' is not a readable image" in second.failure_reason
    assert third.failure_reason and "exit status" not in third.failure_reason
    assert "exit status" not in second.failure_reason
    assert first.ended_at <= second.started_at <= second.ended_at <= third.started_at
    assert len(store.list(IMAGES)) == 3 and len(store.list(mixed)) == 4  # inputs stay
    for name in ("killed", "bad-photo", "bad-base"):
        assert not store.exists(f"{OUTPUT}/{name}/output/model.tar.gz")


def test_bad_requests_are_refused_before_anything_is_created(world, make_jobs):
    settings, _, metadata = world
    jobs = make_jobs()
    cases = [
        (
            {"hyperparameters": {"max_train_step": 3, "colour": 1}},
            r"\['colour', 'max_train_step'\]",
        ),
        ({"hyperparameters": {"max_train_steps": 0}}, "max_train_steps must be from 1 to 10000"),
        ({"hyperparameters": {"max_train_steps": 10001}}, "max_train_steps"),
        ({"hyperparameters": {"learning_rate": 0.0}}, r"learning_rate must be in \(0.0, 1.0\]"),
        ({"hyperparameters": {"rank": 129}}, "rank"),
        ({"hyperparameters": {"resolution": 60}}, "a multiple of 8"),
        ({"hyperparameters": {"train_batch_size": 65}}, "train_batch_size"),
        ({"hyperparameters": {"output_dir": "/tmp"}}, "set by the job itself"),
        (
            {"hyperparameters": {"max_train_steps": 3, "lr_warmup_steps": 5}},
            r"lr_warmup_steps must be below max_train_steps \(3\), got 5",
        ),
        ({"job_name": "Bad_Name"}, "job_name"),
        ({"job_name": "x" * 64}, "job_name"),
        ({"instance_data_uri": "/local/path"}, "instance_data_uri"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            jobs.submit(request(settings, "refused", **changes))
    with pytest.raises(ValueError, match="holds no images"):
        jobs.submit(request(settings, "refused", instance_data_uri=f"s3://{BUCKET}/nothing"))
    with pytest.raises(ValueError, match="hub ids need SageMaker"):
        jobs.submit(request(settings, "refused", base_model="org/model"))
    assert metadata.list_jobs() == []
    assert not jobs.jobs_dir.exists()


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("-a photo of sks toy", "instance_prompt must not start with '-'"),
        (" --help", "instance_prompt must not start with '-'"),
        ("a photo " * 100, "instance_prompt must be at most 500 characters, got 800"),
    ],
)
def test_prompts_the_script_would_misread_are_refused_at_submit(prompt, message):
    with pytest.raises(ValueError, match=message):
        check_hyperparameters({"instance_prompt": prompt})


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        (
            {"max_train_steps": 10, "lr_warmup_steps": 10},
            r"lr_warmup_steps must be below max_train_steps \(10\), got 10: .*lower "
            "lr_warmup_steps or raise max_train_steps",
        ),
        (
            {"lr_warmup_steps": 300},  # the script trains 300 steps unless told otherwise
            r"below max_train_steps \(300, the script's default\), got 300",
        ),
        (
            {"with_prior_preservation": True},
            "with_prior_preservation needs class_prompt .*: set class_prompt, or "
            "with_prior_preservation to false",
        ),
        (
            {"with_prior_preservation": True, "class_prompt": "  "},
            "class_prompt must be a non-empty string",
        ),
        (
            {"checkpoints_total_limit": 2},
            "checkpoints_total_limit needs checkpointing_steps from 1 to 10000 .*got "
            "checkpointing_steps 0: set checkpointing_steps, or leave checkpoints_total_limit out",
        ),
        (
            {"checkpoints_total_limit": 2, "checkpointing_steps": 0},
            "checkpoints_total_limit needs checkpointing_steps",
        ),
    ],
)
def test_combinations_the_script_refuses_are_refused_at_submit(hyperparameters, message):
    with pytest.raises(ValueError, match=message):
        check_hyperparameters(hyperparameters)


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"max_train_steps": 10, "lr_warmup_steps": 9},
        {"lr_warmup_steps": 299},
        {"max_train_steps": 3, "lr_warmup_steps": 0},
        {"with_prior_preservation": True, "class_prompt": "a photo of a toy"},
        {"with_prior_preservation": False},
        {"checkpoints_total_limit": 2, "checkpointing_steps": 1},
    ],
)
def test_combinations_the_script_accepts_pass(hyperparameters):
    assert check_hyperparameters(hyperparameters) == hyperparameters


def test_a_running_job_whose_supervisor_ended_is_marked_interrupted(world, make_jobs):
    metadata = world[2]
    started = "2026-01-01T00:00:00.000000+00:00"
    metadata.put_job(JobRecord("orphan", USER, "m1", status="RUNNING", started_at=started))
    jobs = make_jobs()
    orphan = jobs.describe("orphan", USER)
    assert (orphan.status, orphan.failure_reason) == (JobStatus.FAILED, INTERRUPTED_REASON)
    assert orphan.ended_at is not None


def test_stop_ends_a_running_job_and_cancels_a_queued_one(world, make_jobs):
    settings = world[0]
    jobs = make_jobs(max_concurrent=1)
    long = {**FAST, "max_train_steps": 5000}
    jobs.submit(request(settings, "long-1", hyperparameters=long))
    jobs.submit(request(settings, "long-2", hyperparameters=long))
    queued = jobs.stop("long-2", USER)
    assert (queued.status, queued.started_at) == (JobStatus.STOPPED, None)
    wait_for(lambda: jobs.describe("long-1", USER).status == JobStatus.RUNNING)
    process = jobs._running[(USER, "long-1")].process
    stopped = jobs.stop("long-1", USER)
    assert process.poll() is not None  # the process group was ended
    assert stopped.status == JobStatus.STOPPED and stopped.ended_at is not None
    assert jobs.stop("long-1", USER) == stopped  # stopping again changes nothing
    assert not jobs._running and not jobs._pending


def stub_script(directory, seconds: float = 0.0):
    """A stand-in for the entry script where only the queue is under test: it sleeps, then
    writes a weights file into SM_MODEL_DIR and exits 0."""
    path = directory / f"stub-{seconds}.py"
    path.write_text(
        "import os, pathlib, time\n"
        f"time.sleep({seconds})\n"
        "pathlib.Path(os.environ['SM_MODEL_DIR'], 'weights.bin').write_bytes(b'w')\n"
    )
    return path


def test_the_queue_is_fair_one_user_cannot_starve_another(world, make_jobs, tmp_path):
    settings = world[0]
    # Another instance of this process runs a long job and leaves four queued behind it.
    first = make_jobs(max_concurrent=1, script=stub_script(tmp_path, seconds=60))
    first.submit(request(settings, "blocker", user_id="carol"))
    wait_for(lambda: first.describe("blocker", "carol").status == JobStatus.RUNNING)
    names = ["a-1", "a-2", "a-3", "b-1"]
    for name in names:
        first.submit(request(settings, name, user_id=name[0]))
    first.close()
    # Its supervisor thread ended, but the job lives as long as this process does.
    time.sleep(0.5)
    info = json.loads((first.job_dir("blocker") / "supervisor.json").read_text())
    assert start_time(info["pid"]) == info["pid_started"]

    # A new instance adopts them and starts b's first job second, not after all of a's.
    jobs = make_jobs(max_concurrent=1, script=stub_script(tmp_path))
    done = [jobs.wait(name, name[0], timeout=TIMEOUT, poll=0.05) for name in names]
    assert [job.status for job in done] == [JobStatus.COMPLETED] * 4
    assert [job.job_name for job in sorted(done, key=lambda job: job.started_at)] == [
        "a-1",
        "b-1",
        "a-2",
        "a-3",
    ]
    # Submitted to a running queue: again b's job goes before a's backlog.
    for name in ["a-4", "a-5", "a-6", "b-2"]:
        jobs.submit(request(settings, name, user_id=name[0]))
    later = [jobs.wait(name, name[0], timeout=TIMEOUT, poll=0.05) for name in ["a-5", "b-2"]]
    assert later[1].started_at < later[0].started_at
    # The first instance's job was never this one's: it is still RUNNING, supervised by a
    # process that is alive (this one).
    assert jobs.describe("blocker", "carol").status == JobStatus.RUNNING
    assert jobs.stop("blocker", "carol").status == JobStatus.STOPPED


def running_job(metadata, job_dir, name: str, supervisor: dict) -> None:
    """A RUNNING job record with its directory, as a process that died would leave it."""
    started = "2026-01-01T00:00:00.000000+00:00"
    output = f"{OUTPUT}/{name}/output/model.tar.gz"
    metadata.put_job(
        JobRecord(name, USER, "m1", status="RUNNING", started_at=started, output_uri=output)
    )
    (job_dir / "model").mkdir(parents=True)
    (job_dir / "model" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (job_dir / "train.log").write_text("step=3 loss=0.25\n")
    (job_dir / "supervisor.json").write_text(json.dumps(supervisor))


def test_a_pid_that_now_names_another_process_is_never_killed(world, make_jobs, tmp_path):
    metadata = world[2]
    jobs_dir = world[0].work_dir / "jobs"
    unrelated = subprocess.Popen(["sleep", "60"], start_new_session=True)
    ours = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        wait_for(lambda: start_time(unrelated.pid) is not None and start_time(ours.pid))
        # The pids in supervisor.json were reused: same numbers, other start times. The live
        # "supervisor" is not taken for the job's, and its "job" process is not killed.
        reused = start_time(unrelated.pid) - 1
        supervisor = {"supervisor_pid": unrelated.pid, "supervisor_started": reused}
        running_job(
            metadata,
            jobs_dir / "reused",
            "reused",
            {**supervisor, "pid": unrelated.pid, "pid_started": reused},
        )
        # Still the job's own process (same start time): it is killed.
        running_job(
            metadata,
            jobs_dir / "orphan",
            "orphan",
            {**supervisor, "pid": ours.pid, "pid_started": start_time(ours.pid)},
        )
        jobs = make_jobs()
        for name in ("reused", "orphan"):
            job = jobs.describe(name, USER)
            assert (job.status, job.failure_reason) == (JobStatus.FAILED, INTERRUPTED_REASON)
        assert ours.wait(timeout=10) == -signal.SIGKILL
        assert unrelated.poll() is None
    finally:
        for process in (unrelated, ours):
            process.kill()
            process.wait()


def test_a_job_that_ended_while_unsupervised_is_recorded_by_its_exit_status(
    world, make_jobs, tmp_path
):
    _, store, metadata = world
    jobs_dir = world[0].work_dir / "jobs"
    gone = subprocess.Popen(["true"])
    gone.wait()
    supervisor = {"supervisor_pid": gone.pid, "supervisor_started": 1, "pid": None}
    for name, returncode in [("finished", 0), ("failed", 1), ("killed", -15), ("silent", None)]:
        running_job(metadata, jobs_dir / name, name, supervisor)
        if returncode is not None:  # written by the job's launcher when it ended
            status = {"returncode": returncode}
            (jobs_dir / name / "exit_status.json").write_text(json.dumps(status))

    jobs = make_jobs()
    finished = jobs.describe("finished", USER)
    assert (finished.status, finished.failure_reason) == (JobStatus.COMPLETED, None)
    assert finished.last_step == 3 and store.exists(finished.output_uri)
    failed = jobs.describe("failed", USER)
    assert failed.status == JobStatus.FAILED
    assert failed.failure_reason.startswith("exit status 1; last log lines:")
    for name in ("killed", "silent"):  # the onboarding driver trains these again
        job = jobs.describe(name, USER)
        assert (job.status, job.failure_reason) == (JobStatus.FAILED, INTERRUPTED_REASON)
        assert not store.exists(job.output_uri)


def test_a_job_ends_with_the_process_that_started_it(world, tmp_path):
    """SIGKILL of the supervising process ends its job (the kernel's parent-death signal),
    even though the job was started from a thread of that process."""
    settings = world[0]
    script = stub_script(tmp_path, seconds=120)
    program = f"""
import sys, time
from helpers.infra.local.jobs import LocalTrainingJobs
from helpers.infra.local.metadata import SqliteMetadataStore
from helpers.infra.local.store import LocalArtifactStore
from helpers.ports.jobs import TrainingJobRequest
from helpers.settings import Settings
settings = Settings(work_dir={str(settings.work_dir)!r}, base_model={settings.base_model!r})
jobs = LocalTrainingJobs(
    settings, LocalArtifactStore(settings.store_root), SqliteMetadataStore(settings.metadata_path),
    poll_interval=0.05, script={str(script)!r},
)
jobs.submit(TrainingJobRequest("long", {USER!r}, "m1", {IMAGES!r}, settings.base_model,
                               {OUTPUT!r}, {{}}))
while ({USER!r}, "long") not in jobs._running:
    time.sleep(0.05)
print(jobs._running[({USER!r}, "long")].process.pid, flush=True)
time.sleep(120)
"""
    parent = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        job_pid = int(parent.stdout.readline())
        assert start_time(job_pid) is not None
        parent.kill()
        parent.wait()
        wait_for(lambda: start_time(job_pid) is None, timeout=10)
    finally:
        parent.kill()
        parent.wait()
