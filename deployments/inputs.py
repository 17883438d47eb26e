"""Image references in requests -> bytes, within the limits: ``data:`` URLs and plain
base64, or ``s3://`` objects the calling API key uploaded: under its own prefix
(``uploads/<owner>/``) of a bucket this server reads, where ``POST /v1/uploads`` lets it
upload (a presigned POST, size-capped by the store). Nothing else (no http(s), no files, no
other buckets or tenants) is ever fetched, and a refusal never tells whether another
tenant's object exists."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import secrets
import time

from pipeline.errors import ImageTooLarge, InvalidImage, InvalidParameter
from pipeline.s3 import S3Location, s3_client
from service.errors import NotFound
from service.storage import StorageUnavailable

from service.config import Limits
from .messages import FaceJob

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


def upload_prefix(owner: str) -> str:
    """Where an API key's uploads go, in an input bucket (the only place its s3:// images may be)."""
    return f"uploads/{owner}/"


class ImageInputs:
    def __init__(self, limits: Limits, input_buckets: list[str], s3_endpoint: str | None,
                 presign_endpoint: str | None = None) -> None:
        self.limits, self.input_buckets, self.s3_endpoint = limits, input_buckets, s3_endpoint
        self.presign_endpoint = presign_endpoint
        self._s3 = self._presign = None

    async def face_job(self, refs: list[str], pose: str | None, combine: str, owner: str,
                       pose_name: str = "pose_image", field: str = "face_images") -> FaceJob:
        """The photos of one face (errors name them ``field[i]``, the pose photo ``pose_name``)."""
        if len(refs) > self.limits.max_face_images:
            raise InvalidParameter(field, f"at most {self.limits.max_face_images} photos")
        names = [f"{field}[{i}]" for i in range(len(refs))]
        images = [await self.image_bytes(ref, name, owner) for ref, name in zip(refs, names)]
        pose_bytes = await self.image_bytes(pose, pose_name, owner) if pose else None
        return FaceJob(images=images, pose=pose_bytes, combine=combine, names=names, pose_name=pose_name)

    def upload(self, owner: str, content_type: str, expires_s: int) -> dict:
        """A presigned POST for one image under ``owner``'s prefix of the first input bucket:
        the store itself refuses another key, another content type or more than
        ``max_image_bytes``."""
        if not self.input_buckets:
            raise NotFound("this server takes no uploads (it has no input bucket)")
        if self._presign is None:  # signs for the endpoint clients reach
            self._presign = s3_client(self.presign_endpoint or self.s3_endpoint)
        bucket, key = self.input_buckets[0], upload_prefix(owner) + secrets.token_urlsafe(16)
        post = self._presign.generate_presigned_post(
            bucket, key, Fields={"Content-Type": content_type}, ExpiresIn=expires_s,
            Conditions=[["content-length-range", 1, self.limits.max_image_bytes], {"Content-Type": content_type}])
        return {"image": f"s3://{bucket}/{key}", "url": post["url"], "fields": post["fields"],
                "max_bytes": self.limits.max_image_bytes, "expires_at": time.time() + expires_s}

    async def image_bytes(self, ref: str, field: str, owner: str) -> bytes:
        if ref.startswith("s3://"):
            return await asyncio.to_thread(self._s3_image, ref, field, owner)
        if SCHEME.match(ref):
            raise InvalidParameter(field, "only data: URLs, base64 and s3:// URIs of allowed buckets are accepted")
        payload = ref
        match = DATA_URL.match(ref)
        if match:
            if not match.group("b64"):
                raise InvalidImage("data: URLs must be base64-encoded", field)
            payload = ref[match.end():]
        elif ref.startswith("data:"):
            raise InvalidImage("is a malformed data: URL", field)
        if len(payload) * 3 // 4 > self.limits.max_image_bytes:
            raise ImageTooLarge(f"is over {self.limits.max_image_bytes} bytes", field)
        try:
            return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImage("is neither base64 nor a base64 data: URL", field) from None

    def _s3_image(self, ref: str, field: str, owner: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        where = S3Location.parse(ref, field=field)
        if any(part in ("", ".", "..") for part in where.prefix.split("/")) or len(where.prefix) > 1024:
            raise InvalidParameter(field, "the s3 key must be a plain path (no empty, '.' or '..' segments)")
        if where.bucket not in self.input_buckets or not where.prefix.startswith(upload_prefix(owner)):
            # the same answer for any object this key did not upload, whether it exists or not
            raise InvalidParameter(field, "an s3:// image must be one this API key uploaded (POST /v1/uploads)")
        if self._s3 is None:
            self._s3 = s3_client(self.s3_endpoint)
        try:
            cap = self.limits.max_image_bytes
            head = self._s3.head_object(Bucket=where.bucket, Key=where.prefix)
            if head["ContentLength"] > cap:
                raise ImageTooLarge(f"is {head['ContentLength']} bytes, over {cap}", field)
            # the object that was size-checked (If-Match its ETag), and never more than the cap of it
            body = self._s3.get_object(Bucket=where.bucket, Key=where.prefix, IfMatch=head["ETag"],
                                       Range=f"bytes=0-{cap - 1}")["Body"]
            data = body.read(cap + 1)
            body.close()
            if len(data) > cap:
                raise ImageTooLarge(f"is over {cap} bytes", field)
            return data
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound") or status == 404:
                raise InvalidParameter(field, f"no object at {ref}") from None
            if status < 500:  # refused (e.g. access denied): a problem with the reference
                raise InvalidParameter(field, f"cannot read {ref}") from None
            raise StorageUnavailable(f"{field}: could not read {ref}") from None
        except BotoCoreError:
            raise StorageUnavailable(f"{field}: could not read {ref}") from None
