"""The artifact store on Amazon S3 (boto3; `AWS_ENDPOINT_URL` points it at moto unchanged)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from helpers.domain.uris import S3Uri, check_bucket
from helpers.ports.store import (
    ArtifactStore,
    BucketNotFound,
    ObjectNotFound,
    PresignedPost,
    as_prefix,
    as_uri,
    atomic_writer,
    check_data,
    check_presign_args,
    check_presign_post_args,
)

__all__ = ["S3ArtifactStore"]

_MISSING_OBJECT = {"NoSuchKey", "404", "NotFound"}
#: delete_objects takes at most this many keys per call.
_DELETE_BATCH = 1000


class S3ArtifactStore(ArtifactStore):
    """Objects in Amazon S3.

    Args:
        region (`str`): the AWS region of the buckets, e.g. `"us-east-1"`.
        client (`botocore.client.S3`, *optional*): an S3 client to use; by default one for
            `region` that signs with SigV4 (so presigned URLs carry `X-Amz-Signature`).
    """

    def __init__(self, region: str, client=None) -> None:
        if not isinstance(region, str) or not region:
            raise ValueError(f"region must be an AWS region name, got {region!r}")
        self.region = region
        self.client = client or boto3.client(
            "s3", region_name=region, config=Config(signature_version="s3v4")
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(region={self.region!r})"

    # -- writes ---------------------------------------------------------------------------

    def put_bytes(self, uri: S3Uri | str, data: bytes) -> None:
        check_data(data)
        uri = as_uri(uri)
        # S3 makes an object visible only once the whole PUT succeeded: atomic by itself.
        with _mapped(uri):
            self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=bytes(data))

    def put_file(self, uri: S3Uri | str, path: str | os.PathLike) -> None:
        uri = as_uri(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path {os.fspath(path)!r} is not a file")
        # upload_file switches to multipart for large files; the object appears on completion.
        with _mapped(uri):
            self.client.upload_file(os.fspath(path), uri.bucket, uri.key)

    def delete(self, uri: S3Uri | str) -> None:
        uri = as_uri(uri)
        with _mapped(uri):
            self.client.delete_object(Bucket=uri.bucket, Key=uri.key)

    def delete_prefix(self, prefix_uri: S3Uri | str) -> int:
        prefix = as_prefix(prefix_uri)
        keys = [S3Uri.parse(uri).key for uri in self.list(prefix)]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with _mapped(prefix):
                response = self.client.delete_objects(
                    Bucket=prefix.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise RuntimeError(
                    f"could not delete {len(response['Errors'])} object(s) under {prefix}, "
                    f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def create_bucket(self, bucket: str) -> None:
        check_bucket(bucket)
        arguments: dict = {"Bucket": bucket}
        # us-east-1 is the default location and rejects being named as a LocationConstraint.
        if self.region != "us-east-1":
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**arguments)
        except ClientError as error:
            code = _code(error)
            if code == "BucketAlreadyExists" and self._can_reach(bucket):
                pass  # us-east-1 (and moto) may say this about a bucket we own
            elif code != "BucketAlreadyOwnedByYou":
                if code == "BucketAlreadyExists":
                    raise ValueError(
                        f"bucket {bucket!r} belongs to another account: choose another name "
                        "with WORKSHOP_BUCKET"
                    ) from None
                raise
        self.client.put_bucket_encryption(
            Bucket=bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
        self.client.put_public_access_block(
            Bucket=bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )

    # -- reads ----------------------------------------------------------------------------

    def get_bytes(self, uri: S3Uri | str) -> bytes:
        uri = as_uri(uri)
        with _mapped(uri):
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
        return response["Body"].read()

    def get_file(self, uri: S3Uri | str, path: str | os.PathLike) -> None:
        uri = as_uri(uri)
        # download_fileobj would leave a partial file on failure; the writer leaves none.
        with _mapped(uri), atomic_writer(path) as file:
            self.client.download_fileobj(uri.bucket, uri.key, file)

    def exists(self, uri: S3Uri | str) -> bool:
        uri = as_uri(uri)
        try:
            self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except ClientError as error:
            if _code(error) in _MISSING_OBJECT | {"NoSuchBucket"}:
                return False
            raise
        return True

    def size(self, uri: S3Uri | str) -> int:
        uri = as_uri(uri)
        with _mapped(uri):
            return self.client.head_object(Bucket=uri.bucket, Key=uri.key)["ContentLength"]

    def list(self, prefix_uri: S3Uri | str) -> list[str]:
        prefix = as_prefix(prefix_uri)
        paginator = self.client.get_paginator("list_objects_v2")
        found = []
        with _mapped(prefix):
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key_prefix):
                found += [f"s3://{prefix.bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        return sorted(found)

    def presign(self, uri: S3Uri | str, method: str = "get_object", expires_in: int = 3600) -> str:
        check_presign_args(method, expires_in)
        uri = as_uri(uri)
        return self.client.generate_presigned_url(
            method, Params={"Bucket": uri.bucket, "Key": uri.key}, ExpiresIn=expires_in
        )

    def presign_post(
        self, uri: S3Uri | str, max_bytes: int, content_type: str, expires_in: int = 900
    ) -> PresignedPost:
        check_presign_post_args(max_bytes, content_type, expires_in)
        uri = as_uri(uri)
        # The key is fixed by the policy boto3 adds for `Key`; these two bound the rest.
        form = self.client.generate_presigned_post(
            uri.bucket,
            uri.key,
            Fields={"Content-Type": content_type},
            Conditions=[
                ["content-length-range", 1, max_bytes],
                {"Content-Type": content_type},
            ],
            ExpiresIn=expires_in,
        )
        return PresignedPost(url=form["url"], fields=dict(form["fields"]))

    def _can_reach(self, bucket: str) -> bool:
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError:
            return False
        return True


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _mapped(uri: S3Uri) -> Iterator[None]:
    """Turn S3's not-found errors about `uri` into `ObjectNotFound` / `BucketNotFound`."""
    try:
        yield
    except ClientError as error:
        code = _code(error)
        if code == "NoSuchBucket":
            raise BucketNotFound(uri) from None
        if code in _MISSING_OBJECT:
            raise ObjectNotFound(uri) from None
        raise
