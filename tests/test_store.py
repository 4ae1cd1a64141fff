"""The artifact store contract, run against the local directory tree and S3 (moto)."""

from __future__ import annotations

import os

import pytest
from aws_fakes import fake_aws

from helpers.infra.local.store import LocalArtifactStore
from helpers.ports.store import (
    TEMP_PREFIX,
    BucketNotFound,
    ObjectNotFound,
    PresignNotSupported,
)

BUCKET = "workshop-artifacts"
REGION = "eu-west-1"  # not us-east-1, so create_bucket's LocationConstraint path runs


def uri(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws

    fake_aws(monkeypatch, REGION)
    with mock_aws():
        yield


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        store = LocalArtifactStore(tmp_path / "store")
    else:
        request.getfixturevalue("aws")
        from helpers.infra.aws.store import S3ArtifactStore

        store = S3ArtifactStore(REGION)
    store.create_bucket(BUCKET)
    return store


@pytest.fixture
def local(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    return store


# -- the contract, on both backends -------------------------------------------------------


def test_round_trips_bytes_and_files(store, tmp_path):
    store.put_bytes(uri("users/u1/a.bin"), b"first")
    store.put_bytes(uri("users/u1/a.bin"), b"second")  # overwrite
    assert store.get_bytes(uri("users/u1/a.bin")) == b"second"
    assert store.exists(uri("users/u1/a.bin"))
    assert not store.exists(uri("users/u1/b.bin"))

    source = tmp_path / "model.tar.gz"
    source.write_bytes(os.urandom(300_000))
    store.put_file(uri("users/u1/model.tar.gz"), source)
    target = tmp_path / "cache" / "deep" / "model.tar.gz"
    store.get_file(uri("users/u1/model.tar.gz"), target)
    assert target.read_bytes() == source.read_bytes()
    assert store.size(uri("users/u1/model.tar.gz")) == 300_000


def test_missing_object_is_reported_and_leaves_the_target_untouched(store, tmp_path):
    with pytest.raises(ObjectNotFound, match=r"s3://workshop-artifacts/users/u1/none"):
        store.get_bytes(uri("users/u1/none"))
    with pytest.raises(ObjectNotFound):
        store.size(uri("users/u1/none"))
    target = tmp_path / "out" / "kept.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(ObjectNotFound):
        store.get_file(uri("users/u1/none"), target)
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["kept.bin"]  # no half-downloaded temp file


def test_list_is_recursive_sorted_and_scoped_to_the_folder(store):
    for key in ["users/u1/b.png", "users/u1/a/x.png", "users/u10/a.png", "base/model.bin"]:
        store.put_bytes(uri(key), b"x")
    assert store.list(uri("users/u1")) == [uri("users/u1/a/x.png"), uri("users/u1/b.png")]
    assert store.list(uri("users/u1/")) == store.list(uri("users/u1"))
    assert len(store.list(f"s3://{BUCKET}")) == 4
    assert store.list(uri("nobody")) == []


def test_delete_and_delete_prefix_remove_only_their_objects(store):
    for key in ["users/u1/a", "users/u1/deep/b", "users/u10/c", "users/u2/d"]:
        store.put_bytes(uri(key), b"x")
    store.delete(uri("users/u2/d"))
    store.delete(uri("users/u2/d"))  # deleting what is gone is fine
    assert not store.exists(uri("users/u2/d"))
    assert store.delete_prefix(uri("users/u1")) == 2
    assert store.list(f"s3://{BUCKET}/") == [uri("users/u10/c")]
    # Locally the emptied folders are gone too, so the key can now be an object.
    store.put_bytes(uri("users/u1"), b"object where a folder was")
    assert store.get_bytes(uri("users/u1")) == b"object where a folder was"


@pytest.mark.parametrize(
    "bad",
    [
        "s3://workshop-artifacts/../escape",
        "s3://workshop-artifacts/users/../../escape",
        "s3://workshop-artifacts//etc/passwd",
        "s3://workshop-artifacts/users\\..\\..\\escape",
        "/etc/passwd",
    ],
)
def test_path_traversal_keys_are_rejected(store, tmp_path, bad):
    with pytest.raises(ValueError, match="uri"):
        store.put_bytes(bad, b"x")
    with pytest.raises(ValueError, match="uri"):
        store.get_bytes(bad)
    with pytest.raises(ValueError, match="uri"):
        store.delete_prefix(bad.rsplit("/", 1)[0] + "/../")
    assert not (tmp_path / "escape").exists()


def test_missing_bucket_says_how_to_create_it(store):
    with pytest.raises(BucketNotFound, match="provision"):
        store.put_bytes("s3://no-such-bucket/a", b"x")
    assert not store.exists("s3://no-such-bucket/a")
    store.create_bucket("no-such-bucket")
    store.create_bucket("no-such-bucket")  # idempotent
    store.put_bytes("s3://no-such-bucket/a", b"x")
    assert store.exists("s3://no-such-bucket/a")


def test_bad_arguments_are_named(store):
    with pytest.raises(ValueError, match="data"):
        store.put_bytes(uri("a"), "text, not bytes")
    with pytest.raises(ValueError, match="method"):
        store.presign(uri("a"), method="delete_object")
    with pytest.raises(ValueError, match="expires_in"):
        store.presign(uri("a"), expires_in=0)
    with pytest.raises(ValueError, match="method"):  # unbounded writes: presign_post instead
        store.presign(uri("a"), method="put_object")
    with pytest.raises(ValueError, match="max_bytes"):
        store.presign_post(uri("a"), max_bytes=0, content_type="image/png")
    with pytest.raises(ValueError, match="content_type"):
        store.presign_post(uri("a"), max_bytes=10, content_type="png")
    with pytest.raises(ValueError, match="expires_in"):
        store.presign_post(uri("a"), max_bytes=10, content_type="image/png", expires_in=0)
    with pytest.raises(ValueError, match="bucket"):
        store.create_bucket("Not_A_Bucket")


# -- local: atomic writes, symlinks, presign ------------------------------------------------


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_local_write_failure_leaves_previous_version_and_no_stray_file(local, monkeypatch, failing):
    local.put_bytes(uri("users/u1/model.bin"), b"version 1")
    folder = local.root / BUCKET / "users" / "u1"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # Fails after the new bytes are written to the temp file, before it becomes the object.
    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="disk full"):
        local.put_bytes(uri("users/u1/model.bin"), b"version 2, never complete")
    with pytest.raises(OSError, match="disk full"):
        local.put_bytes(uri("users/u1/new.bin"), b"never visible")
    monkeypatch.undo()

    assert local.get_bytes(uri("users/u1/model.bin")) == b"version 1"
    assert not local.exists(uri("users/u1/new.bin"))
    assert local.list(uri("users/u1")) == [uri("users/u1/model.bin")]
    assert os.listdir(folder) == ["model.bin"]


def test_local_get_file_failure_keeps_the_old_file(local, tmp_path, monkeypatch):
    local.put_bytes(uri("base/model.bin"), b"new weights")
    target = tmp_path / "cache" / "model.bin"
    target.parent.mkdir()
    target.write_bytes(b"old weights")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        local.get_file(uri("base/model.bin"), target)
    monkeypatch.undo()
    assert target.read_bytes() == b"old weights"
    assert os.listdir(target.parent) == ["model.bin"]


def test_local_readers_never_see_temp_files(local):
    folder = local.root / BUCKET / "users" / "u1"
    folder.mkdir(parents=True)
    (folder / f"{TEMP_PREFIX}crashed").write_bytes(b"half")  # left by a killed writer
    local.put_bytes(uri("users/u1/a"), b"x")
    assert local.list(uri("users/u1")) == [uri("users/u1/a")]
    with pytest.raises(ValueError, match=TEMP_PREFIX):
        local.get_bytes(uri(f"users/u1/{TEMP_PREFIX}crashed"))


def test_local_refuses_symlinks_out_of_the_root(local, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (local.root / BUCKET / "users").mkdir()
    (local.root / BUCKET / "users" / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ValueError, match="symlink"):
        local.get_bytes(uri("users/link/secret"))
    with pytest.raises(ValueError, match="symlink"):
        local.put_bytes(uri("users/link/planted"), b"x")
    assert local.list(uri("users")) == []  # the link is not walked
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_local_presign_explains_the_alternative(local):
    with pytest.raises(PresignNotSupported, match="through the workshop API") as caught:
        local.presign(uri("users/u1/a.png"))
    assert isinstance(caught.value, NotImplementedError)
    with pytest.raises(PresignNotSupported, match="POST /v1/photos"):
        local.presign_post(uri("users/u1/a.png"), max_bytes=10, content_type="image/png")


# -- S3: presign, bucket settings, batches ---------------------------------------------------


@pytest.mark.usefixtures("aws")
def test_s3_presign_signs_the_object_url():
    from helpers.infra.aws.store import S3ArtifactStore

    store = S3ArtifactStore(REGION)
    store.create_bucket(BUCKET)
    url = store.presign(uri("users/u1/images/0.png"), expires_in=600)
    assert "users/u1/images/0.png" in url
    assert "X-Amz-Signature=" in url
    assert "X-Amz-Expires=600" in url


@pytest.mark.usefixtures("aws")
def test_s3_presigned_post_is_bounded_by_its_signed_policy():
    """S3 itself refuses a POST that breaks the policy: another key, another Content-Type, or
    a size outside 1..max_bytes (moto stores without checking policies, so they are read)."""
    import base64
    import json

    from helpers.infra.aws.store import S3ArtifactStore

    store = S3ArtifactStore(REGION)
    store.create_bucket(BUCKET)
    form = store.presign_post(uri("users/u1/uploads/ab12"), 4096, "image/png", expires_in=600)
    assert form.fields["key"] == "users/u1/uploads/ab12"
    assert form.fields["Content-Type"] == "image/png"
    assert form.fields["x-amz-signature"]
    policy = json.loads(base64.b64decode(form.fields["policy"]))
    conditions = policy["conditions"]
    assert ["content-length-range", 1, 4096] in conditions
    assert {"Content-Type": "image/png"} in conditions
    assert {"key": "users/u1/uploads/ab12"} in conditions
    assert {"bucket": BUCKET} in conditions
    assert policy["expiration"].endswith("Z")


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_s3_bucket_is_private_encrypted_and_created_idempotently(monkeypatch, region):
    from moto import mock_aws

    from helpers.infra.aws.store import S3ArtifactStore

    fake_aws(monkeypatch, region)
    with mock_aws():
        store = S3ArtifactStore(region)
        store.create_bucket(BUCKET)
        store.create_bucket(BUCKET)
        client = store.client
        rules = client.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]
        assert rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        block = client.get_public_access_block(Bucket=BUCKET)["PublicAccessBlockConfiguration"]
        assert all(block.values())
        location = client.get_bucket_location(Bucket=BUCKET)["LocationConstraint"]
        assert location == (None if region == "us-east-1" else region)


@pytest.mark.usefixtures("aws")
def test_s3_delete_prefix_deletes_in_batches(monkeypatch):
    from helpers.infra.aws import store as s3_store

    monkeypatch.setattr(s3_store, "_DELETE_BATCH", 2)
    store = s3_store.S3ArtifactStore(REGION)
    store.create_bucket(BUCKET)
    for index in range(5):
        store.put_bytes(uri(f"users/u1/{index}"), b"x")
    assert store.delete_prefix(uri("users/u1")) == 5
    assert store.list(uri("users")) == []


# -- factory -------------------------------------------------------------------------------
