"""Fake AWS credentials for moto, shared by the tests of the AWS adapters."""

from __future__ import annotations


def fake_aws(monkeypatch, region: str) -> None:
    """Fake credentials and region, and no endpoint or profile of the machine leaking in."""
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
