"""S3 access shared by weight fetching and storage: URI parsing and a configured client."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InvalidParameter


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading slash; "" or ends without a slash

    @classmethod
    def parse(cls, uri: str, *, field: str = "uri") -> "S3Location":
        if not uri.startswith("s3://"):
            raise InvalidParameter(field, f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise InvalidParameter(field, f"{uri!r} names no bucket")
        return cls(bucket, prefix.strip("/"))

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def s3_client(endpoint_url: str | None = None, region: str | None = None, *, max_attempts: int = 5,
              max_pool_connections: int = 10):
    """A boto3 S3 client with retries, SigV4 and, for custom endpoints (any
    S3-compatible server), path-style addressing.

    ``endpoint_url`` defaults to ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials
    come from boto3's usual chain (environment, profile, instance role).
    """
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        signature_version="s3v4",
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max_pool_connections,
    )
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # A fresh session: boto3's default session caches the credentials it first found.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
