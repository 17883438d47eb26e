"""Image references in requests -> bytes, within the limits: ``data:`` URLs and plain
base64, or ``s3://`` objects in the buckets this server is configured to read. Nothing
else (no http(s), no files, no other buckets) is ever fetched."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re

from pipeline.errors import ImageTooLarge, InvalidImage, InvalidParameter
from pipeline.s3 import S3Location, s3_client
from service.storage import StorageUnavailable

from service.config import Limits
from .messages import FaceJob

DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


class ImageInputs:
    def __init__(self, limits: Limits, input_buckets: list[str], s3_endpoint: str | None) -> None:
        self.limits, self.input_buckets, self.s3_endpoint = limits, input_buckets, s3_endpoint
        self._s3 = None

    async def face_job(self, refs: list[str], pose: str | None, combine: str) -> FaceJob:
        if len(refs) > self.limits.max_face_images:
            raise InvalidParameter("face_images", f"at most {self.limits.max_face_images} photos")
        names = [f"face_images[{i}]" for i in range(len(refs))]
        images = [await self.image_bytes(ref, name) for ref, name in zip(refs, names)]
        pose_bytes = await self.image_bytes(pose, "pose_image") if pose else None
        return FaceJob(images=images, pose=pose_bytes, combine=combine, names=names)

    async def image_bytes(self, ref: str, field: str) -> bytes:
        if ref.startswith("s3://"):
            return await asyncio.to_thread(self._s3_image, ref, field)
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

    def _s3_image(self, ref: str, field: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        where = S3Location.parse(ref, field=field)
        if where.bucket not in self.input_buckets or not where.prefix:
            raise InvalidParameter(field, f"s3 bucket {where.bucket!r} is not one this server reads images from")
        if any(part in ("", ".", "..") for part in where.prefix.split("/")) or len(where.prefix) > 1024:
            raise InvalidParameter(field, "the s3 key must be a plain path (no empty, '.' or '..' segments)")
        if self._s3 is None:
            self._s3 = s3_client(self.s3_endpoint)
        try:
            head = self._s3.head_object(Bucket=where.bucket, Key=where.prefix)
            if head["ContentLength"] > self.limits.max_image_bytes:
                raise ImageTooLarge(f"is {head['ContentLength']} bytes, over {self.limits.max_image_bytes}", field)
            return self._s3.get_object(Bucket=where.bucket, Key=where.prefix)["Body"].read()
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound") or status == 404:
                raise InvalidParameter(field, f"no object at {ref}") from None
            if status < 500:  # refused (e.g. access denied): a problem with the reference
                raise InvalidParameter(field, f"cannot read {ref}") from None
            raise StorageUnavailable(f"{field}: could not read {ref}") from None
        except BotoCoreError:
            raise StorageUnavailable(f"{field}: could not read {ref}") from None
