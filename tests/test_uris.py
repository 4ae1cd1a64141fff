"""`S3Uri`: the parse rules that keep keys from naming files outside their bucket."""

from __future__ import annotations

import pytest

from helpers.domain.uris import MAX_KEY_BYTES, S3Uri


def test_parse_round_trips_and_joins():
    uri = S3Uri.parse("s3://workshop-artifacts/users/u1/images/0.png")
    assert (uri.bucket, uri.key) == ("workshop-artifacts", "users/u1/images/0.png")
    assert str(uri) == "s3://workshop-artifacts/users/u1/images/0.png"
    base = S3Uri("workshop-artifacts", "users")
    assert str(base.join("u1/", "models", "m1/model.tar.gz")) == (
        "s3://workshop-artifacts/users/u1/models/m1/model.tar.gz"
    )
    assert S3Uri.parse(str(base.join("a b", "ü.png"))).key == "users/a b/ü.png"


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/../etc/passwd",
        "s3://bucket/users/../../outside",
        "s3://bucket/users/./x",
        "s3://bucket//absolute",
        "s3://bucket/users//x",
        "s3://bucket/users/",
        "s3://bucket/users\\..\\x",
        "s3://bucket/nul\x00byte",
        "s3://bucket/" + "k" * (MAX_KEY_BYTES + 1),
        "s3://bucket/" + "é" * (MAX_KEY_BYTES // 2 + 1),  # short in characters, long in bytes
        "s3://bucket",
        "s3://bucket/",
        "s3:///key",
        "s3://../key",
        "s3://Bucket/key",
        "file:///etc/passwd",
        "/etc/passwd",
        "bucket/key",
    ],
)
def test_parse_rejects_unsafe_or_malformed_uris_naming_them(uri):
    with pytest.raises(ValueError, match="uri"):
        S3Uri.parse(uri)


@pytest.mark.parametrize("part", ["..", "a/../..", "a//b", ".", "x\\y"])
def test_join_rejects_traversal(part):
    with pytest.raises(ValueError, match="key"):
        S3Uri("bucket", "users").join(part)


def test_parse_prefix_accepts_folders_and_the_whole_bucket():
    assert S3Uri.parse_prefix("s3://bucket/users/u1/") == S3Uri("bucket", "users/u1")
    assert S3Uri.parse_prefix("s3://bucket/users/u1").key_prefix == "users/u1/"
    assert S3Uri.parse_prefix("s3://bucket").key_prefix == ""
    assert S3Uri.parse_prefix("s3://bucket/") == S3Uri("bucket")
    with pytest.raises(ValueError, match="uri"):
        S3Uri.parse_prefix("s3://bucket/users/../")
