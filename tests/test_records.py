"""Domain records: the item shape both metadata backends store, ids and the status machine."""

from __future__ import annotations

from decimal import Decimal

import pytest

from helpers.domain.records import (
    TRANSITIONS,
    ModelRecord,
    ModelStatus,
    UserRecord,
    can_move,
)


def test_user_item_shape_and_round_trip():
    user = UserRecord("alice", api_key_hash="sha256:abc", display_name="Alice")
    item = user.to_item()
    assert item["user_id"] == "alice"
    assert (item["sk"], item["entity"]) == ("USER", "USER")
    assert item["created_at"].endswith("+00:00")
    assert UserRecord.from_item(item) == user
    # A user without optional fields leaves them out: DynamoDB items carry no nulls.
    assert "display_name" not in UserRecord("bob").to_item()


def test_model_item_shape_and_round_trip_through_dynamodb_types():
    model = ModelRecord(
        "alice",
        "m-1",
        instance_data_uri="s3://workshop-artifacts/users/alice/images/",
        params={"steps": 200, "lr": 1e-3, "prompt": "a photo of sks toy"},
    )
    item = model.to_item()
    assert (item["sk"], item["entity"], item["status"]) == ("MODEL#m-1", "MODEL", "REQUESTED")
    assert isinstance(item["params"], str)  # floats survive DynamoDB as JSON text
    # boto3 hands numbers back as Decimal.
    assert ModelRecord.from_item({**item, "version": Decimal(1)}) == model


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: UserRecord("Alice"), "user_id"),
        (lambda: UserRecord("a" * 65), "user_id"),
        (lambda: UserRecord("../x"), "user_id"),
        (lambda: UserRecord(""), "user_id"),
        (lambda: ModelRecord("alice", "m/1"), "model_id"),
        (lambda: ModelRecord("alice", "m1", status="DONE"), "status"),
        (lambda: ModelRecord("alice", "m1", model_artifact_uri="/tmp/x"), "model_artifact_uri"),
        (lambda: ModelRecord("alice", "m1", params={"x": object()}), "params"),
        (lambda: ModelRecord("alice", "m1", version=0), "version"),
        (lambda: UserRecord("alice", created_at="2024-01-01T00:00:00"), "created_at"),
    ],
)
def test_invalid_values_raise_naming_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_from_item_refuses_the_wrong_entity():
    with pytest.raises(ValueError, match="USER"):
        UserRecord.from_item(ModelRecord("alice", "m1").to_item())


def test_status_machine_reaches_available_and_allows_retry_after_failure():
    path = [ModelStatus.REQUESTED, ModelStatus.TRAINING, ModelStatus.PACKAGING]
    for current, new in zip(path, [*path[1:], ModelStatus.AVAILABLE], strict=True):
        assert can_move(current, new)
    assert all(can_move(status, "FAILED") for status in path)
    assert can_move("FAILED", "REQUESTED")
    assert not can_move("REQUESTED", "AVAILABLE")  # no skipping training
    assert not can_move("AVAILABLE", "TRAINING")
    assert TRANSITIONS[ModelStatus.AVAILABLE] == frozenset()
