"""The quota counters contract, run against SQLite and DynamoDB (moto): atomic hits that never
count past a limit, windows that reset, and counters that stay out of the metadata's way."""

from __future__ import annotations

import dataclasses
import datetime as dt
import multiprocessing
import sys
import threading

import pytest
import test_api
from aws_fakes import fake_aws
from fastapi.testclient import TestClient
from test_api import (
    ADMIN_KEY,
    bearer,
    error_of,
    make_available,
    make_user,
    onboard,
    photo_files,
)
from test_metadata import make_moto_writes_atomic

from helpers.api import ApiServices, create_app
from helpers.api.quotas import QuotaLimits
from helpers.domain.records import JobRecord, ModelRecord, UserRecord
from helpers.infra.local.quotas import SqliteQuotaCounters
from helpers.ports.quotas import QuotaCounters
from helpers.settings import load_settings

TABLE = "workshop-models"
REGION = "eu-west-1"
DAY = 86400


class Clock:
    """A settable time, in the middle of a day window."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0 + 3600

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def dynamodb(monkeypatch, clock):
    """DynamoDB counters (moto) in the metadata table, with its store as `.metadata`."""
    from moto import mock_aws

    from helpers.infra.aws.metadata import DynamoDbMetadataStore
    from helpers.infra.aws.quotas import DynamoDbQuotaCounters

    fake_aws(monkeypatch, REGION)
    make_moto_writes_atomic(monkeypatch)
    with mock_aws():
        metadata = DynamoDbMetadataStore(TABLE, REGION)
        metadata.create_table()
        counters = DynamoDbQuotaCounters(TABLE, REGION, clock=clock)
        counters.prepare()
        counters.metadata = metadata
        yield counters


@pytest.fixture(params=["sqlite", "dynamodb"])
def counters(request, tmp_path, clock) -> QuotaCounters:
    if request.param == "sqlite":
        return SqliteQuotaCounters(tmp_path / "quotas.sqlite", clock=clock)
    return request.getfixturevalue("dynamodb")


def test_hits_count_up_to_the_limit_and_a_refused_hit_costs_nothing(counters, clock):
    decisions = [counters.hit("requests", "alice", 3, 60) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.used for d in decisions] == [1, 2, 3, 3, 3]
    window_end = (clock.now // 60 + 1) * 60
    assert all(d.limit == 3 and d.resets_at == window_end for d in decisions)
    assert decisions[-1].retry_after(clock.now) == window_end - clock.now


def test_costs_count_whole_and_a_hit_that_does_not_fit_is_refused_whole(counters):
    assert counters.hit("images", "alice", 10, DAY, cost=4).used == 4
    assert counters.hit("images", "alice", 10, DAY, cost=4).used == 8
    refused = counters.hit("images", "alice", 10, DAY, cost=4)
    assert not refused.allowed and refused.used == 8
    assert counters.hit("images", "alice", 10, DAY, cost=2).allowed  # exactly the limit fits
    too_big = counters.hit("images", "bob", 3, DAY, cost=4)
    assert not too_big.allowed and too_big.used == 0


def test_scopes_names_and_window_lengths_count_apart(counters):
    assert counters.hit("requests", "alice", 1, 60).allowed
    assert not counters.hit("requests", "alice", 1, 60).allowed
    assert counters.hit("requests", "bob", 1, 60).allowed
    assert counters.hit("generations", "alice", 1, 60).allowed
    assert counters.hit("requests", "alice", 1, 3600).allowed  # another window length


def test_a_new_window_starts_from_zero(counters, clock):
    assert counters.hit("requests", "alice", 2, 60, cost=2).allowed
    refused = counters.hit("requests", "alice", 2, 60)
    assert not refused.allowed
    clock.now = refused.resets_at  # the first second of the next window
    fresh = counters.hit("requests", "alice", 2, 60)
    assert fresh.allowed and fresh.used == 1 and fresh.resets_at == refused.resets_at + 60


def test_a_zero_limit_refuses_everything(counters):
    decision = counters.hit("admin", "admin", 0, 60)
    assert not decision.allowed and decision.used == 0


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (("", "alice", 1, 60, 1), "scope"),
        (("requests", "a#b", 1, 60, 1), "name"),
        (("requests", "alice", -1, 60, 1), "limit"),
        (("requests", "alice", 1, 0, 1), "window_seconds"),
        (("requests", "alice", 1, 60, 0), "cost"),
        (("requests", "alice", True, 60, 1), "limit"),
    ],
)
def test_invalid_arguments_are_refused_naming_them(counters, arguments, named):
    with pytest.raises(ValueError, match=f"^{named} must"):
        counters.hit(*arguments)


def test_threads_hitting_one_counter_never_pass_the_limit(counters):
    # Under moto every call is Python in this process, so the AWS run is smaller: what it checks
    # is the conditional update, not DynamoDB's throughput.
    sqlite = isinstance(counters, SqliteQuotaCounters)
    threads_n, tries, limit = (8, 20, 50) if sqlite else (4, 10, 25)
    allowed = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(tries):
            decision = counters.hit("generations", "alice", limit, 60)
            with lock:
                allowed.append(decision.allowed)

    threads = [threading.Thread(target=hammer) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == threads_n * tries  # every hit answered, none raised
    assert sum(allowed) == limit
    assert counters.hit("generations", "alice", limit, 60).used == limit


def _hit_in_process(counters: SqliteQuotaCounters, times: int, limit: int, results) -> None:
    results.put(sum(counters.hit("requests", "alice", limit, 3600).allowed for _ in range(times)))


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_processes_share_the_sqlite_counters(tmp_path):
    counters = SqliteQuotaCounters(tmp_path / "quotas.sqlite")
    assert counters.hit("requests", "alice", 70, 3600).used == 1  # the parent's connection
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    # Forked children inherit the object and its open connection; each must open its own.
    processes = [
        context.Process(target=_hit_in_process, args=(counters, 30, 70, results)) for _ in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert sum(results.get(timeout=5) for _ in processes) == 69
    assert not counters.hit("requests", "alice", 70, 3600).allowed
    assert SqliteQuotaCounters(counters.path).hit("requests", "alice", 71, 3600).used == 71


def test_sqlite_sweeps_ended_windows(tmp_path, clock):
    counters = SqliteQuotaCounters(tmp_path / "quotas.sqlite", clock=clock)
    counters.hit("requests", "alice", 5, 60)
    clock.now += 120
    counters.hit("requests", "bob", 5, 60)
    with counters._transaction() as connection:
        names = [row[0] for row in connection.execute("SELECT name FROM counters")]
    assert names == ["bob"]


def test_dynamodb_counters_expire_and_stay_out_of_the_metadata(dynamodb):
    from helpers.infra.aws.quotas import EXPIRY_ATTRIBUTE

    counters = dynamodb

    metadata = counters.metadata
    metadata.put_user(UserRecord("alice", api_key_hash="sha256:1"))
    metadata.create_model(ModelRecord("alice", "m1"))
    metadata.put_job(JobRecord("alice-m1-1", "alice", "m1"))
    for scope, name in (("requests", "alice"), ("address", "203.0.113.9"), ("admin", "admin")):
        assert counters.hit(scope, name, 5, 60).allowed
    ttl = counters.client.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": EXPIRY_ATTRIBUTE}
    counters.prepare()  # again: nothing changes, nothing fails
    items = counters.client.scan(TableName=TABLE)["Items"]
    quota_items = [i for i in items if i["user_id"]["S"].startswith("QUOTA#")]
    assert len(quota_items) == 3
    assert all(int(i[EXPIRY_ATTRIBUTE]["N"]) > counters.clock() for i in quota_items)
    assert [u.user_id for u in metadata.list_users()] == ["alice"]
    assert [j.job_name for j in metadata.list_jobs()] == ["alice-m1-1"]
    assert [m.model_id for m in metadata.list_models("alice")] == ["m1"]
    metadata.delete_user("alice")
    after = counters.client.scan(TableName=TABLE)["Items"]
    # The user's counters expire by TTL; deleting the user neither needs nor touches them.
    assert sum(i["user_id"]["S"].startswith("QUOTA#") for i in after) == 3


# -- the API's quotas ------------------------------------------------------------------------


def api_services(tmp_path, **limits) -> ApiServices:
    """The API's services as `tests/test_api.py` builds them, with `limits` set."""
    return test_api.api_services(tmp_path, limits=QuotaLimits(**limits))


def api(services) -> TestClient:
    return TestClient(create_app(services), raise_server_exceptions=False)


def refusal(answer, status: int, code: str, quota: str) -> dict:
    """The error of a quota refusal, checked for what every one must carry."""
    assert answer.status_code == status, answer.text
    error = error_of(answer)
    assert (error["code"], error["field"]) == (code, quota)
    assert int(answer.headers["Retry-After"]) >= 1
    return error


def test_a_tenants_request_rate_is_shared_by_every_process_and_apart_from_others(tmp_path):
    first = api_services(tmp_path, requests_per_minute=3)
    # A second app on the same work dir: another uvicorn worker, or the API restarted.
    second = dataclasses.replace(first, counters=SqliteQuotaCounters(first.settings.quotas_path))
    with api(first) as one, api(second) as two:
        ada, bo = make_user(one, "ada"), make_user(one, "bo")
        codes = [c.get("/v1/models", headers=ada).status_code for c in (one, two, one, two)]
        assert codes == [200, 200, 200, 429]
        error = refusal(
            two.get("/v1/models", headers=ada), 429, "rate_limited", "requests_per_minute"
        )
        assert "3 requests per minute" in error["message"]
        assert dt.datetime.fromisoformat(error["resets_at"]).second == 0  # a minute's end
        assert one.get("/v1/models", headers=bo).status_code == 200


def test_generations_per_minute_refuse_before_the_endpoint_is_called(tmp_path):
    services = api_services(tmp_path, generations_per_minute=2)
    with api(services) as client:
        headers = onboard(client, "ada")
        make_available(services, "ada")
        answers = [
            client.post("/v1/generations", json={"prompt": "x"}, headers=headers) for _ in range(3)
        ]
        assert [a.status_code for a in answers] == [200, 200, 429]
        error = refusal(answers[2], 429, "rate_limited", "generations_per_minute")
        assert error["message"].startswith("rate limit: 2 generations per minute")
        assert len(services.generator.calls) == 2


def test_images_per_day_count_every_image_and_refuse_a_request_that_does_not_fit(tmp_path):
    services = api_services(tmp_path, images_per_day=5)
    four = {"prompt": "x", "num_images": 4, "response_format": "json"}
    with api(services) as client:
        headers = onboard(client, "ada")
        make_available(services, "ada")
        assert client.post("/v1/generations", json=four, headers=headers).status_code == 200
        answer = client.post("/v1/generations", json=four, headers=headers)
        error = refusal(answer, 429, "quota_exceeded", "images_per_day")
        assert "5 images per day; 4 used; this request needs 4" in error["message"]
        assert error["resets_at"].endswith("T00:00:00Z")  # days reset at midnight UTC
        one = client.post("/v1/generations", json={"prompt": "x"}, headers=headers)
        assert one.status_code == 200  # the refused request cost nothing
        assert [call[2]["num_images"] for call in services.generator.calls] == [4, 1]


def test_a_generation_without_a_model_costs_no_images(tmp_path):
    services = api_services(tmp_path, images_per_day=1)
    with api(services) as client:
        headers = onboard(client, "ada")  # m1 is REQUESTED, not AVAILABLE
        assert (
            client.post("/v1/generations", json={"prompt": "x"}, headers=headers).status_code == 409
        )
        make_available(services, "ada")
        assert (
            client.post("/v1/generations", json={"prompt": "x"}, headers=headers).status_code == 200
        )


def test_models_in_flight_are_capped_per_tenant_and_a_replay_is_not_refused(tmp_path):
    services = api_services(tmp_path, models_in_flight=1)
    with api(services) as client:
        headers = make_user(client, "ada")
        assert client.post("/v1/photos", files=photo_files(), headers=headers).status_code == 201
        retry = {**headers, "Idempotency-Key": "first"}
        assert client.post("/v1/models", json={}, headers=retry).status_code == 202
        error = refusal(
            client.post("/v1/models", json={}, headers=headers),
            429,
            "quota_exceeded",
            "models_in_flight",
        )
        assert "1 models in flight" in error["message"] and "m1" in error["message"]
        assert error["resets_at"] is None  # it ends when a model does, not at a time
        replay = client.post("/v1/models", json={}, headers=retry)
        assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
        make_available(services, "ada")
        assert client.post("/v1/models", json={}, headers=headers).status_code == 202
        assert [m.model_id for m in services.metadata.list_models("ada")] == ["m1", "m2"]
        assert services.onboarding.started == [("ada", "m1"), ("ada", "m2")]


def test_training_steps_per_day_count_what_each_model_asks_for(tmp_path):
    services = api_services(tmp_path, training_steps_per_day=500)
    with api(services) as client:
        headers = make_user(client, "ada")
        assert client.post("/v1/photos", files=photo_files(), headers=headers).status_code == 201
        assert (
            client.post("/v1/models", json={"max_train_steps": 300}, headers=headers).status_code
            == 202
        )
        answer = client.post("/v1/models", json={"max_train_steps": 300}, headers=headers)
        error = refusal(answer, 429, "quota_exceeded", "training_steps_per_day")
        assert "500 training steps per day; 300 used; this request needs 300" in error["message"]
        assert (
            client.post("/v1/models", json={"max_train_steps": 200}, headers=headers).status_code
            == 202
        )
        assert len(services.metadata.list_models("ada")) == 2  # the refused one left nothing


def test_a_full_account_answers_503_to_every_tenant_until_a_model_finishes(tmp_path):
    services = api_services(tmp_path, account_models_in_flight=1)
    with api(services) as client:
        onboard(client, "ada")
        bo = make_user(client, "bo")
        assert client.post("/v1/photos", files=photo_files(), headers=bo).status_code == 201
        answer = client.post("/v1/models", json={}, headers=bo)
        assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 60
        assert error_of(answer)["code"] == "training_capacity_full"
        make_available(services, "ada")
        assert client.post("/v1/models", json={}, headers=bo).status_code == 202


def test_anonymous_requests_and_failed_keys_count_against_the_address(tmp_path):
    services = api_services(tmp_path, anonymous_per_minute=4)
    with api(services) as client:
        ada = make_user(client, "ada")
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=bearer("ada.wrong-secret")).status_code == 401
        assert (
            client.get("/v1/users/me", headers=bearer(ada["Authorization"][7:] + "x")).status_code
            == 401
        )
        error = refusal(client.get("/health"), 429, "rate_limited", "anonymous_per_minute")
        assert "4 requests per minute from one address without a valid key" in error["message"]
        guess = client.get("/v1/models", headers=bearer("ada.another-guess"))
        refusal(guess, 429, "rate_limited", "anonymous_per_minute")
        assert client.get("/v1/models", headers=ada).status_code == 200  # a valid key still works


def test_the_admin_key_has_its_own_rate(tmp_path):
    services = api_services(tmp_path, admin_per_minute=2)
    with api(services) as client:
        make_user(client, "ada")
        make_user(client, "bo")
        answer = client.post("/v1/users", json={"user_id": "cy"}, headers=bearer(ADMIN_KEY))
        error = refusal(answer, 429, "rate_limited", "admin_per_minute")
        assert "2 admin requests per minute" in error["message"]
        assert services.metadata.get_user("cy") is None
        forged = client.post("/v1/users", json={"user_id": "cy"}, headers=bearer("not-the-admin"))
        assert forged.status_code == 403  # a wrong admin key counts against its address instead


def test_every_quota_answer_is_documented_in_the_openapi_spec(tmp_path):
    with api(api_services(tmp_path)) as client:
        spec = client.get("/openapi.json").json()
    assert "resets_at" in spec["components"]["schemas"]["ErrorDetail"]["properties"]
    for path, method in (("/health", "get"), ("/v1/models", "post"), ("/v1/generations", "post")):
        assert "429" in spec["paths"][path][method]["responses"], path
    assert "503" in spec["paths"]["/v1/models"]["post"]["responses"]


def test_limits_name_a_negative_value():
    with pytest.raises(ValueError, match=r"^images_per_day must be an integer >= 0"):
        QuotaLimits(images_per_day=-1)


def test_each_backend_opens_its_shared_counters(tmp_path, dynamodb):
    from helpers.backend import open_backend
    from helpers.infra.aws.quotas import DynamoDbQuotaCounters

    local = open_backend(load_settings(work_dir=tmp_path))
    local.provision()
    assert isinstance(local.quotas, SqliteQuotaCounters)
    assert local.quotas.path == tmp_path / "quotas.sqlite" and local.quotas.path.is_file()
    aws = open_backend(
        load_settings(backend="sagemaker", base_model="org/model", table_name=TABLE, region=REGION)
    )
    assert isinstance(aws.quotas, DynamoDbQuotaCounters)
    assert (aws.quotas.table_name, aws.quotas.region) == (TABLE, REGION)
