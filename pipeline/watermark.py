"""The invisible watermark on every output: invisible-watermark's DWT-DCT-SVD method,
carrying a payload that names this service and the output.

The SDXL reference scripts use the same library's plain DWT-DCT method; measured here
(docs/SAFETY.md), it misreads its own mark on smooth pictures before any change to them
(it moves the largest value of each 4x4 block of the U channel's first Haar level, and in
a smooth block that value can stop being the largest), so this service uses its DWT-DCT-SVD
sibling: the same blocks, the mark in each block's largest singular value, read back from
every unchanged picture.

Payload, 22 bytes (176 bits), repeated over the picture's blocks:

* 3 bytes: the service's tag, the first bytes of SHA-256 of its name (``instantid`` unless
  configured), so that a reader can tell our marks from another service's;
* 1 byte: what follows: 1, a generation id's 16 bytes (``g_`` + 22 base64url characters
  is 16 random bytes); 2, the first 16 bytes of SHA-256 of another id (an offline
  render's row id), which can be matched against the ids one has;
* 16 bytes: the id, as that byte says;
* 2 bytes: a CRC of the 20 before, so that noise is not read as a payload.

One bit per 4x4 block of the first Haar level, so a picture needs 64 pixels per bit; the
library refuses pictures under 256x256 pixels in area, and so does this module (such
outputs are stored unmarked, and their record says so). Chroma subsampling (JPEG's usual
4:2:0, WebP always) erases most of the mark, so the service writes JPEG in 4:4:4; a
determined attacker removes it (docs/SAFETY.md says what survives what).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import zlib
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np

SERVICE = "instantid"
MIN_PIXELS = 256 * 256  # the library's own floor (its encoder refuses smaller pictures)
PAYLOAD_BYTES = 22
PAYLOAD_BITS = PAYLOAD_BYTES * 8
GENERATION, OTHER_ID = 1, 2  # what the payload's id bytes are


@cache
def _embedder_class():
    """invisible-watermark's DWT-DCT-SVD embedder class. Loaded from its module alone: the
    package's ``__init__`` also imports its RivaGAN method, hence torch and onnxruntime,
    which a CPU stage that only encodes pictures has no use for."""
    spec = importlib.util.find_spec("imwatermark")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the invisible watermark needs the invisible-watermark package (make setup installs it)")
    path = f"{list(spec.submodule_search_locations)[0]}/dwtDctSvd.py"
    module_spec = importlib.util.spec_from_file_location("_instantid_imwatermark_dwtdctsvd", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.EmbedDwtDctSvd


@dataclass(frozen=True)
class Reading:
    """What :meth:`Watermark.read` found. ``found``: a payload whose CRC matches;
    ``this_service``: it carries this service's tag; then the id it names, as a generation
    id or as the SHA-256 prefix (hex) of another id."""

    found: bool
    this_service: bool = False
    generation_id: str | None = None
    id_sha256_prefix: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def names(self, output_id: str) -> bool:
        """Whether the mark names ``output_id``."""
        if self.generation_id is not None:
            return self.generation_id == output_id
        return self.found and self.id_sha256_prefix == id_sha256_prefix(output_id)


def _id_bytes(output_id: str) -> tuple[int, bytes]:
    if output_id.startswith("g_") and len(output_id) == 24:
        try:
            raw = base64.urlsafe_b64decode(output_id[2:] + "==")
        except (binascii.Error, ValueError):
            raw = b""
        # only an id that reads back as itself (the service's are: 16 random bytes)
        if len(raw) == 16 and base64.urlsafe_b64encode(raw).decode().rstrip("=") == output_id[2:]:
            return GENERATION, raw
    return OTHER_ID, hashlib.sha256(output_id.encode()).digest()[:16]


def _crc(data: bytes) -> bytes:
    return (zlib.crc32(data) & 0xFFFF).to_bytes(2, "big")


class Watermark:
    """Marks pictures for ``service`` and reads marks back."""

    def __init__(self, service: str = SERVICE) -> None:
        if not service:
            raise ValueError("watermark service: must not be empty")
        self.service = service
        self.tag = hashlib.sha256(service.encode()).digest()[:3]

    def payload(self, output_id: str) -> bytes:
        kind, raw = _id_bytes(output_id)
        body = self.tag + bytes([kind]) + raw
        return body + _crc(body)

    @staticmethod
    def fits(image: np.ndarray) -> bool:
        """Whether the picture is large enough to carry the mark."""
        return image.shape[0] * image.shape[1] >= MIN_PIXELS

    def mark(self, image: np.ndarray, output_id: str) -> np.ndarray | None:
        """The HxWx3 RGB uint8 picture with the payload naming ``output_id`` embedded; None
        when it is too small to carry it (:func:`fits`)."""
        if not self.fits(image):
            return None
        bits = list(np.unpackbits(np.frombuffer(self.payload(output_id), dtype=np.uint8)))
        embedder = _embedder_class()(bits, wmLen=PAYLOAD_BITS)
        return np.ascontiguousarray(embedder.encode(np.ascontiguousarray(image[:, :, ::-1]))[:, :, ::-1])

    def read(self, image: np.ndarray) -> Reading:
        """The payload in an HxWx3 RGB uint8 picture, if one is there."""
        if image.ndim != 3 or image.shape[2] != 3 or not self.fits(image):
            return Reading(found=False)  # (no mark is made that small: one would not fit)
        embedder = _embedder_class()([], wmLen=PAYLOAD_BITS)
        bits = embedder.decode(np.ascontiguousarray(image[:, :, ::-1]))
        data = np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()
        body, check = data[:-2], data[-2:]
        if len(data) != PAYLOAD_BYTES or _crc(body) != check:
            return Reading(found=False)
        kind, raw = body[3], body[4:]
        if kind == GENERATION:
            return Reading(True, body[:3] == self.tag, generation_id="g_" + base64.urlsafe_b64encode(raw).decode()
                           .rstrip("="))
        if kind == OTHER_ID:
            return Reading(True, body[:3] == self.tag, id_sha256_prefix=raw.hex())
        return Reading(found=False)


def id_sha256_prefix(output_id: str) -> str:
    """What a mark carries for an id that is not a generation id (hex), to match readings."""
    return hashlib.sha256(output_id.encode()).digest()[:16].hex()
