"""The metadata store contract, run against SQLite and DynamoDB (moto)."""

from __future__ import annotations

import contextlib
import multiprocessing
import sqlite3
import sys
import threading
import time

import pytest
from aws_fakes import fake_aws

from helpers.domain.records import (
    JobRecord,
    JobStatus,
    ModelRecord,
    ModelStatus,
    UserRecord,
    utc_now,
)
from helpers.infra.local.metadata import SqliteMetadataStore
from helpers.ports.metadata import (
    AlreadyExists,
    InvalidTransition,
    MetadataStore,
    NotFound,
    TableMissing,
    UserIdRetired,
    VersionConflict,
)

TABLE = "workshop-models"
REGION = "eu-west-1"


@pytest.fixture(params=["sqlite", "dynamodb"])
def metadata(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        store = SqliteMetadataStore(tmp_path / "metadata.sqlite")
        store.create_table()
        yield store
        return
    from moto import mock_aws

    from helpers.infra.aws.metadata import DynamoDbMetadataStore

    fake_aws(monkeypatch, REGION)
    make_moto_writes_atomic(monkeypatch)
    with mock_aws():
        store = DynamoDbMetadataStore(TABLE, REGION)
        store.create_table()
        yield store


def make_moto_writes_atomic(monkeypatch) -> None:
    """DynamoDB applies a conditional write to one item atomically; moto checks the condition
    and then writes without a lock, so two threads can both pass the check and one update is
    lost (seen in CI: 38 of 40 increments). Serialize moto's writes to restore the guarantee
    that the adapter relies on; the test then checks the adapter, not moto."""
    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.RLock()  # moto's transact_write_items calls its own put_item
    for name in ("put_item", "update_item", "delete_item", "transact_write_items"):
        original = getattr(DynamoDBBackend, name)

        def atomic(self, *args, _original=original, **kwargs):
            with lock:
                return _original(self, *args, **kwargs)

        monkeypatch.setattr(DynamoDBBackend, name, atomic)


@pytest.fixture
def alice(metadata):
    metadata.put_user(UserRecord("alice", display_name="Alice", api_key_hash="sha256:1"))
    metadata.create_model(
        ModelRecord("alice", "m1", instance_data_uri="s3://workshop-artifacts/u/alice/images/")
    )
    return metadata


def increment(store: MetadataStore, user_id: str, model_id: str, times: int) -> int:
    """Add 1 to `params["count"]` `times` times, re-reading on every conflict; return the
    number of conflicts met (the lost updates there would have been without versions)."""
    conflicts = 0
    for _ in range(times):
        while True:
            current = store.get_model(user_id, model_id)
            params = {**current.params, "count": current.params.get("count", 0) + 1}
            try:
                store.update_model(
                    user_id, model_id, expected_version=current.version, params=params
                )
                break
            except VersionConflict:
                conflicts += 1
    return conflicts


def _increment_in_process(path: str, times: int) -> None:
    increment(SqliteMetadataStore(path), "alice", "m1", times)


# -- users ---------------------------------------------------------------------------------


def test_users_round_trip_and_are_unique(metadata):
    metadata.create_table()  # idempotent, data kept below
    alice = UserRecord("alice", display_name="Alice", api_key_hash="sha256:1")
    metadata.put_user(alice)
    time.sleep(0.001)
    metadata.put_user(UserRecord("bob"))
    assert metadata.get_user("alice") == alice
    assert metadata.get_user("carol") is None
    assert [user.user_id for user in metadata.list_users()] == ["alice", "bob"]
    with pytest.raises(AlreadyExists, match="alice"):
        metadata.put_user(UserRecord("alice", display_name="Impostor"))
    assert metadata.get_user("alice").display_name == "Alice"


def test_delete_user_removes_the_user_and_all_their_models(alice):
    alice.create_model(ModelRecord("alice", "m2"))
    alice.put_user(UserRecord("bob"))
    alice.create_model(ModelRecord("bob", "m1"))
    assert alice.delete_user("alice") == 3
    assert alice.get_user("alice") is None
    assert alice.list_models("alice") == []
    assert alice.get_model("alice", "m1") is None
    assert [model.user_id for model in alice.list_models("bob")] == ["bob"]  # untouched
    assert alice.delete_user("alice") == 0


def test_a_deleted_users_id_is_retired_for_good(alice):
    alice.put_job(_job("job-1"))
    alice.put_user(UserRecord("bob"))
    alice.delete_user("alice")
    for _ in range(2):  # a second delete keeps the tombstone
        with pytest.raises(UserIdRetired, match="deleted user"):
            alice.put_user(UserRecord("alice", api_key_hash="sha256:2"))
        assert alice.delete_user("alice") == 0
    assert issubclass(UserIdRetired, AlreadyExists)
    assert alice.get_user("alice") is None
    assert [user.user_id for user in alice.list_users()] == ["bob"]
    assert alice.list_models("alice") == [] and alice.list_jobs("alice") == []
    with pytest.raises(NotFound, match="alice"):  # the tombstone is no user to add models to
        alice.create_model(ModelRecord("alice", "m1"))
    with pytest.raises(NotFound, match="alice"):
        alice.update_user("alice", expected_version=1, display_name="back")


def test_an_id_never_used_stays_free_after_a_delete(metadata):
    assert metadata.delete_user("ghost") == 0
    metadata.put_user(UserRecord("ghost"))
    assert metadata.get_user("ghost").user_id == "ghost"


def test_update_user_replaces_the_key_hash_at_the_expected_version(alice):
    user = alice.get_user("alice")
    rotated = alice.update_user("alice", expected_version=user.version, api_key_hash="sha256:2")
    assert rotated.version == user.version + 1 and rotated.api_key_hash == "sha256:2"
    assert alice.get_user("alice") == rotated
    with pytest.raises(VersionConflict):  # a second rotation based on the old record
        alice.update_user("alice", expected_version=user.version, api_key_hash="sha256:3")
    assert alice.get_user("alice").api_key_hash == "sha256:2"
    with pytest.raises(ValueError, match="created_at"):
        alice.update_user("alice", expected_version=rotated.version, created_at=utc_now())
    with pytest.raises(NotFound, match="carol"):
        alice.update_user("carol", expected_version=1, api_key_hash="sha256:4")


def test_a_user_being_deleted_gets_no_new_model_and_stays_deleting(alice):
    user = alice.get_user("alice")
    since = utc_now()
    marked = alice.update_user("alice", expected_version=user.version, deleting_since=since)
    assert alice.get_user("alice").deleting_since == since
    with pytest.raises(NotFound, match="being deleted"):
        alice.create_model(ModelRecord("alice", "m2"))
    with pytest.raises(InvalidTransition, match="being deleted"):
        alice.update_user("alice", expected_version=marked.version, deleting_since=None)
    assert [model.model_id for model in alice.list_models("alice")] == ["m1"]


# -- models --------------------------------------------------------------------------------


def test_models_round_trip_oldest_first_and_are_unique(alice):
    time.sleep(0.001)
    alice.create_model(ModelRecord("alice", "a-later", params={"lr": 1e-3, "steps": 200}))
    models = alice.list_models("alice")
    assert [model.model_id for model in models] == ["m1", "a-later"]  # by time, not by id
    assert models[1].params == {"lr": 1e-3, "steps": 200}
    assert alice.get_model("alice", "a-later") == models[1]
    assert alice.get_model("alice", "missing") is None
    with pytest.raises(AlreadyExists, match="alice/m1"):
        alice.create_model(ModelRecord("alice", "m1"))


def test_a_model_needs_an_existing_user(metadata):
    with pytest.raises(NotFound, match="ghost"):
        metadata.create_model(ModelRecord("ghost", "m1"))
    assert metadata.list_models("ghost") == []


def test_update_model_walks_the_lifecycle_with_versions(alice):
    model = alice.get_model("alice", "m1")
    training = alice.update_model(
        "alice", "m1", expected_version=model.version, status="TRAINING", training_job_name="j1"
    )
    assert (training.status, training.version) == (ModelStatus.TRAINING, model.version + 1)
    assert training.updated_at > model.updated_at
    assert training.created_at == model.created_at
    packaged = alice.update_model("alice", "m1", expected_version=2, status=ModelStatus.PACKAGING)
    done = alice.update_model(
        "alice",
        "m1",
        expected_version=packaged.version,
        status="AVAILABLE",
        model_artifact_uri="s3://workshop-artifacts/u/alice/m1/model.tar.gz",
    )
    assert alice.get_model("alice", "m1") == done
    assert done.training_job_name == "j1"  # fields not named are kept


def test_stale_version_is_refused_and_nothing_changes(alice):
    alice.update_model("alice", "m1", expected_version=1, status="TRAINING")
    with pytest.raises(VersionConflict, match="version 2, not 1") as caught:
        alice.update_model("alice", "m1", expected_version=1, status="FAILED")
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    stored = alice.get_model("alice", "m1")
    assert (stored.status, stored.version) == (ModelStatus.TRAINING, 2)


def test_invalid_transition_is_refused(alice):
    with pytest.raises(InvalidTransition, match="REQUESTED to AVAILABLE"):
        alice.update_model("alice", "m1", expected_version=1, status="AVAILABLE")
    assert isinstance(InvalidTransition("x"), ValueError)
    # Restating the current status is not a move, so a retried step is harmless.
    again = alice.update_model("alice", "m1", expected_version=1, status="REQUESTED")
    assert again.version == 2
    assert alice.get_model("alice", "m1").status == ModelStatus.REQUESTED


def test_update_refuses_unknown_or_fixed_fields_and_missing_models(alice):
    with pytest.raises(ValueError, match=r"\['colour', 'version'\]"):
        alice.update_model("alice", "m1", expected_version=1, colour="red", version=9)
    with pytest.raises(ValueError, match="model_artifact_uri"):
        alice.update_model("alice", "m1", expected_version=1, model_artifact_uri="../x")
    with pytest.raises(ValueError, match="expected_version"):
        alice.update_model("alice", "m1", expected_version=0, status="TRAINING")
    with pytest.raises(NotFound, match="alice/ghost"):
        alice.update_model("alice", "ghost", expected_version=1, status="TRAINING")
    assert alice.get_model("alice", "m1").version == 1


def test_delete_model(alice):
    assert alice.delete_model("alice", "m1") is True
    assert alice.delete_model("alice", "m1") is False
    assert alice.get_model("alice", "m1") is None
    assert alice.get_user("alice") is not None


def test_ids_are_validated_before_any_lookup(metadata):
    with pytest.raises(ValueError, match="user_id"):
        metadata.get_user("../../etc")
    with pytest.raises(ValueError, match="model_id"):
        metadata.get_model("alice", "M1")
    with pytest.raises(ValueError, match="user"):
        metadata.put_user({"user_id": "alice"})


# -- training jobs -------------------------------------------------------------------------


def _job(job_name: str, user_id: str = "alice", **values) -> JobRecord:
    return JobRecord(
        job_name,
        user_id,
        "m1",
        hyperparameters={"max_train_steps": 3, "learning_rate": 1e-4},
        instance_data_uri="s3://workshop-artifacts/u/alice/images/",
        **values,
    )


def test_jobs_round_trip_per_user_and_for_everyone(metadata):
    metadata.put_job(_job("job-1"))
    time.sleep(0.001)
    metadata.put_job(_job("a-job-2", user_id="bob"))
    job = metadata.get_job("alice", "job-1")
    assert job == _job("job-1", created_at=job.created_at)
    assert job.hyperparameters == {"max_train_steps": 3, "learning_rate": 1e-4}
    assert job.status == JobStatus.PENDING
    assert metadata.get_job("bob", "job-1") is None  # jobs live in their owner's partition
    assert [j.job_name for j in metadata.list_jobs("alice")] == ["job-1"]
    assert [j.job_name for j in metadata.list_jobs()] == ["job-1", "a-job-2"]  # by time
    assert metadata.list_models("alice") == []  # a job is not a model
    with pytest.raises(AlreadyExists, match="alice/job-1"):
        metadata.put_job(_job("job-1"))


def test_update_job_records_progress_and_the_outcome(metadata):
    metadata.put_job(_job("job-1"))
    running = metadata.update_job(
        "alice", "job-1", status="RUNNING", started_at="2026-01-01T00:00:00.000000+00:00"
    )
    assert (running.status, running.version) == (JobStatus.RUNNING, 2)
    progress = metadata.update_job(
        "alice", "job-1", expected_version=2, last_step=2, last_loss=0.123456
    )
    assert (progress.last_step, progress.last_loss) == (2, 0.123456)
    done = metadata.update_job(
        "alice",
        "job-1",
        status=JobStatus.COMPLETED,
        output_uri="s3://workshop-artifacts/jobs/job-1/output/model.tar.gz",
        ended_at="2026-01-01T00:01:00.000000+00:00",
    )
    assert metadata.get_job("alice", "job-1") == done
    assert done.version == 4 and done.last_loss == 0.123456  # fields not named are kept


def test_update_job_refuses_stale_versions_final_states_and_bad_fields(metadata):
    metadata.put_job(_job("job-1"))
    metadata.update_job("alice", "job-1", status="RUNNING")
    with pytest.raises(VersionConflict, match="version 2, not 1"):
        metadata.update_job("alice", "job-1", expected_version=1, status="FAILED")
    metadata.update_job("alice", "job-1", status="STOPPED")
    with pytest.raises(InvalidTransition, match="STOPPED to COMPLETED"):
        metadata.update_job("alice", "job-1", status="COMPLETED")
    with pytest.raises(ValueError, match=r"\['model_id'\]"):
        metadata.update_job("alice", "job-1", model_id="m2")
    with pytest.raises(ValueError, match="output_uri"):
        metadata.update_job("alice", "job-1", output_uri="../x")
    with pytest.raises(NotFound, match="alice/ghost"):
        metadata.update_job("alice", "ghost", status="RUNNING")
    with pytest.raises(ValueError, match="job_name"):
        metadata.get_job("alice", "Bad_Name")
    assert metadata.get_job("alice", "job-1").status == JobStatus.STOPPED


def test_delete_job_removes_one_record(metadata):
    metadata.put_job(_job("job-1"))
    metadata.put_job(_job("job-2"))
    assert metadata.delete_job("alice", "job-1") is True
    assert metadata.delete_job("alice", "job-1") is False
    assert [job.job_name for job in metadata.list_jobs("alice")] == ["job-2"]


def test_delete_user_removes_their_jobs_too(alice):
    alice.put_job(_job("job-1"))
    assert alice.delete_user("alice") == 3
    assert alice.list_jobs("alice") == []


# -- concurrency ---------------------------------------------------------------------------


def test_concurrent_writers_in_threads_lose_no_update(alice):
    # Under moto every call is Python in this process (5 ms each, conflicts retried), so the
    # AWS run is smaller: what it checks is the conditional write, not DynamoDB's throughput.
    sqlite = isinstance(alice, SqliteMetadataStore)
    threads_n, times = (8, 25) if sqlite else (4, 10)
    conflicts = []
    threads = [
        threading.Thread(target=lambda: conflicts.append(increment(alice, "alice", "m1", times)))
        for _ in range(threads_n)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    model = alice.get_model("alice", "m1")
    assert model.params["count"] == threads_n * times
    assert model.version == 1 + threads_n * times
    assert len(conflicts) == threads_n  # every thread finished without an error


def test_dynamodb_write_racing_a_read_is_refused_by_the_condition(monkeypatch):
    from moto import mock_aws

    from helpers.infra.aws.metadata import DynamoDbMetadataStore

    fake_aws(monkeypatch, REGION)
    make_moto_writes_atomic(monkeypatch)
    with mock_aws():
        store = DynamoDbMetadataStore(TABLE, REGION)
        store.create_table()
        store.put_user(UserRecord("alice"))
        store.create_model(ModelRecord("alice", "m1"))
        stale = store.get_model("alice", "m1")
        store.update_model("alice", "m1", expected_version=1, status="TRAINING")
        # Another worker wrote between this one's read and its write.
        monkeypatch.setattr(store, "get_model", lambda *args: stale)
        with pytest.raises(VersionConflict) as caught:
            store.update_model("alice", "m1", expected_version=1, status="FAILED")
        assert caught.value.actual == 2
        monkeypatch.undo()
        assert store.get_model("alice", "m1").status == ModelStatus.TRAINING


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_concurrent_writers_in_processes_share_the_sqlite_file(tmp_path):
    path = tmp_path / "metadata.sqlite"
    store = SqliteMetadataStore(path)
    store.create_table()
    store.put_user(UserRecord("alice"))
    store.create_model(ModelRecord("alice", "m1"))
    # fork: the children need only the function, not a fresh interpreter (spawn costs ~1 s).
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_increment_in_process, args=(str(path), 20)) for _ in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert store.get_model("alice", "m1").params["count"] == 60
    # WAL, so readers (the API) never wait for a writer (the onboarding worker).
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- setup ---------------------------------------------------------------------------------


def test_a_missing_table_says_how_to_create_it(tmp_path, monkeypatch):
    with pytest.raises(TableMissing, match="create_table"):
        SqliteMetadataStore(tmp_path / "new" / "metadata.sqlite").get_user("alice")
    from moto import mock_aws

    from helpers.infra.aws.metadata import DynamoDbMetadataStore

    fake_aws(monkeypatch, REGION)
    with mock_aws(), pytest.raises(TableMissing, match="create_table"):
        DynamoDbMetadataStore(TABLE, REGION).get_user("alice")


def test_dynamodb_table_is_on_demand_with_point_in_time_recovery(monkeypatch):
    from moto import mock_aws

    from helpers.infra.aws.metadata import DynamoDbMetadataStore

    fake_aws(monkeypatch, REGION)
    make_moto_writes_atomic(monkeypatch)
    with mock_aws():
        store = DynamoDbMetadataStore(TABLE, REGION)
        store.create_table()
        table = store.client.describe_table(TableName=TABLE)["Table"]
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        assert {key["AttributeName"]: key["KeyType"] for key in table["KeySchema"]} == {
            "user_id": "HASH",
            "sk": "RANGE",
        }
        backups = store.client.describe_continuous_backups(TableName=TABLE)
        recovery = backups["ContinuousBackupsDescription"]["PointInTimeRecoveryDescription"]
        assert recovery["PointInTimeRecoveryStatus"] == "ENABLED"
