"""Where outputs and records live: one small interface, two stores.

* :class:`S3Storage` — any S3-compatible server through boto3 (configurable endpoint,
  botocore retries, multipart uploads for big objects, presigned GET URLs that expire).
* :class:`LocalStorage` — a directory, the embedded default; its URLs are paths served
  back by the ingress (``/v1/files/<key>``) and signed with an HMAC and an expiry, so
  they behave like presigned URLs.

Keys are always made by the server (never from user text). Besides plain reads and writes,
both stores offer two atomic conditional writes: create-if-absent (:meth:`put_if_absent`)
and replace-if-unchanged (:meth:`put_if_match`, against the version :meth:`get_versioned`
returned), which is what claims and leases are built on. This module does not import Ray:
the offline renderer and the CLI use it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlencode

from pipeline.errors import InstantIDError, InvalidParameter
from pipeline.s3 import S3Location, s3_client

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)*")  # matched whole
MULTIPART_THRESHOLD = 8 * 1024 * 1024


class ObjectNotFound(InstantIDError):
    code = "not_found"


class StorageUnavailable(InstantIDError):
    """The store could not be reached or refused the operation."""

    code = "storage_unavailable"


def check_key(key: str) -> str:
    """Keys are server-made: plain segments, no '..', no leading slash."""
    if not KEY_PATTERN.fullmatch(key) or ".." in key or len(key) > 512:
        raise InvalidParameter("key", f"not a valid storage key: {key!r}")
    return key


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def url(self, key: str, expires_s: int) -> str: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def list_modified(self, prefix: str) -> dict[str, float]:
        """Key -> when it was last written (epoch seconds), for every key under ``prefix``."""
        ...

    def abort_partial(self, before: float) -> int:
        """Remove uploads that were started before ``before`` and never completed (a
        crashed writer's temporary files, an S3 multipart upload never finished); how many."""
        ...

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/json") -> bool:
        """Create ``key`` atomically; False (and nothing written) when it exists."""
        ...

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object and its version (an opaque tag for :meth:`put_if_match`)."""
        ...

    def put_if_match(self, key: str, data: bytes, version: str,
                     content_type: str = "application/json") -> str | None:
        """Replace ``key`` atomically if it is still at ``version``: the new version, or
        None (and nothing written) when it changed or was deleted meanwhile."""
        ...

    def put_json(self, key: str, value: dict) -> None: ...

    def get_json(self, key: str) -> dict: ...


def json_bytes(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class _JsonMixin:
    def put_json(self, key: str, value: dict) -> None:
        self.put(key, json_bytes(value), "application/json")

    def get_json(self, key: str) -> dict:
        return json.loads(self.get(key))


class LocalStorage(_JsonMixin):
    def __init__(self, root: str | os.PathLike, signing_key: bytes, url_prefix: str = "/v1/files") -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.signing_key = signing_key
        self.url_prefix = url_prefix

    def __repr__(self) -> str:
        return f"LocalStorage({self.root})"

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise InvalidParameter("key", f"not a valid storage key: {key!r}")
        return path

    def _publish(self, key: str, data: bytes, publish) -> None:
        """Write ``data`` to a temporary file beside the key's path, then ``publish(temp, path)``
        it in one step, so readers see the whole file or nothing; the temporary file never stays."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            publish(temp, path)
        finally:
            Path(temp).unlink(missing_ok=True)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._publish(key, data, os.replace)

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/json") -> bool:
        try:
            self._publish(key, data, os.link)  # a hard link fails when the key exists
            return True
        except FileExistsError:
            return False

    @contextlib.contextmanager
    def _locked(self, key: str):
        """An exclusive lock per key, across processes on this machine (conditional
        replaces read, compare and publish under it)."""
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        name = hashlib.sha256(check_key(key).encode()).hexdigest()[:32]
        with open(locks / name, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, hashlib.md5(data).hexdigest()

    def put_if_match(self, key: str, data: bytes, version: str,
                     content_type: str = "application/json") -> str | None:
        with self._locked(key):
            try:
                current = self.get(key)
            except ObjectNotFound:
                return None
            if not hmac.compare_digest(hashlib.md5(current).hexdigest(), version):
                return None
            self._publish(key, data, os.replace)
            return hashlib.md5(data).hexdigest()

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key}") from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # tidy empty folders up to the root
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith((".part-", ".locks")))

    def list_modified(self, prefix: str) -> dict[str, float]:
        return {key: self._path(key).stat().st_mtime for key in self.list_keys(prefix)
                if self._path(key).is_file()}

    def abort_partial(self, before: float) -> int:
        aborted = 0
        for path in self.root.rglob(".part-*"):  # a write interrupted between its temporary file and its rename
            with contextlib.suppress(FileNotFoundError):
                if path.is_file() and path.stat().st_mtime < before:
                    path.unlink()
                    aborted += 1
        return aborted

    def url(self, key: str, expires_s: int) -> str:
        expires = int(time.time()) + int(expires_s)
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return f"{self.url_prefix}/{quote(check_key(key))}?{query}"

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self.signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(self.signature(key, expires), signature)


class S3Storage(_JsonMixin):
    def __init__(
        self,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        presign_endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        self.location = location
        # a few quick retries: a store that is down answers 503 soon rather than stalling requests
        self.client = s3_client(endpoint_url, region, max_attempts=3)
        # Presigned URLs name the host clients will use, which may differ from the one
        # this service reaches (e.g. an internal endpoint vs a public one).
        self.presign_client = s3_client(presign_endpoint_url, region) if presign_endpoint_url else self.client

    def __repr__(self) -> str:
        return f"S3Storage({self.location})"

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as error:
            raise self._translate(what, error) from None

    @staticmethod
    def _translate(what: str, error: Exception) -> InstantIDError:
        from botocore.exceptions import ClientError

        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"no object {what}")
            return StorageUnavailable(f"S3 {what}: {code or type(error).__name__}")
        # the error's own text names the endpoint (an internal URL): only its kind is told
        return StorageUnavailable(f"S3 {what}: {type(error).__name__}")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        import io

        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
        self._call(
            key,
            self.client.upload_fileobj,
            io.BytesIO(data),
            self.location.bucket,
            self.location.key(check_key(key)),
            ExtraArgs={"ContentType": content_type},
            Config=config,
        )

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/json") -> bool:
        return self._conditional_put(key, data, content_type, IfNoneMatch="*") is not None

    def _conditional_put(self, key: str, data: bytes, content_type: str, **condition) -> str | None:
        """One PUT with an S3 precondition (``IfNoneMatch="*"`` or ``IfMatch=etag``): the
        new ETag when it was written, None when the precondition failed (412, or 409 when
        a concurrent conditional write won)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.put_object(Bucket=self.location.bucket, Key=self.location.key(check_key(key)),
                                              Body=data, ContentType=content_type, **condition)
            return response["ETag"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                                "NoSuchKey"):
                return None
            raise self._translate(key, error) from None
        except BotoCoreError as error:
            raise self._translate(key, error) from None

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        response = self._call(key, self.client.get_object, Bucket=self.location.bucket,
                              Key=self.location.key(check_key(key)))
        return response["Body"].read(), response["ETag"]

    def put_if_match(self, key: str, data: bytes, version: str,
                     content_type: str = "application/json") -> str | None:
        return self._conditional_put(key, data, content_type, IfMatch=version)

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.location.bucket, Key=self.location.key(check_key(key)))

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Bucket=self.location.bucket, Key=self.location.key(check_key(key)))
            return True
        except ObjectNotFound:
            return False

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self.list_modified(prefix))

    def list_modified(self, prefix: str) -> dict[str, float]:
        full = self.location.key(check_key(prefix.rstrip("/"))) + "/"
        strip = len(self.location.prefix) + 1 if self.location.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(prefix, lambda: list(paginator.paginate(Bucket=self.location.bucket, Prefix=full)))
        return {item["Key"][strip:]: item["LastModified"].timestamp() for page in pages
                for item in page.get("Contents", [])}

    def abort_partial(self, before: float) -> int:
        """Multipart uploads under this store's prefix started before ``before`` (the bucket's
        lifecycle rule aborts them too, after a day)."""
        prefix = f"{self.location.prefix}/" if self.location.prefix else ""
        paginator = self.client.get_paginator("list_multipart_uploads")
        pages = self._call("multipart uploads",
                           lambda: list(paginator.paginate(Bucket=self.location.bucket, Prefix=prefix)))
        aborted = 0
        for upload in (u for page in pages for u in page.get("Uploads", [])):
            if upload["Initiated"].timestamp() < before:
                self._call(upload["Key"], self.client.abort_multipart_upload, Bucket=self.location.bucket,
                           Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    def url(self, key: str, expires_s: int) -> str:
        return self.presign_client.generate_presigned_url(
            "get_object",
            # the store answers with Cache-Control: no-store (a response override the URL carries)
            Params={"Bucket": self.location.bucket, "Key": self.location.key(check_key(key)),
                    "ResponseCacheControl": "no-store"},
            ExpiresIn=int(expires_s),
        )


def open_storage(
    uri: str,
    *,
    signing_key: bytes = b"",
    endpoint_url: str | None = None,
    presign_endpoint_url: str | None = None,
) -> Storage:
    """``s3://bucket/prefix`` -> :class:`S3Storage`; a folder path (or ``file://``) ->
    :class:`LocalStorage`."""
    if uri.startswith("s3://"):
        return S3Storage(S3Location.parse(uri, field="storage"), endpoint_url=endpoint_url,
                         presign_endpoint_url=presign_endpoint_url)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise InvalidParameter("storage", f"unsupported storage {uri!r}: use a folder or s3://bucket/prefix")
    return LocalStorage(uri, signing_key=signing_key)
