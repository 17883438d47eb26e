"""The face stage: detection and ArcFace identity embedding with insightface.

Loads an antelopev2-layout folder through insightface's ``FaceAnalysis`` (detection and
recognition only), keeps the largest face by true area, retries at smaller detection
sizes when nothing is found, and combines several reference photos.

:meth:`FaceAnalyzer.analyze_batch` detects each photo and then runs recognition once for
all their faces (one ONNX Runtime call for the aligned crops), with the same results as
:meth:`FaceAnalyzer.analyze` photo by photo. :meth:`FaceAnalyzer.analyze_requests` does
the same across several requests (:class:`FaceRequest`: photos, pose photo, combine mode),
each request getting :meth:`FaceAnalyzer.analyze_many`'s result or its own error.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from .errors import InstantIDError, InvalidParameter, NoFaceDetected, ProviderUnavailable, WeightsNotFound
from .images import DEFAULT_LIMITS, ImageInput, ImageLimits, load_image
from .keypoints import reference_size

logger = logging.getLogger(__name__)

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
DEFAULT_DET_SIZES: tuple[int, ...] = (640, 512, 384, 320, 256, 160)
CombineMode = Literal["mean", "norm_mean"]


@dataclass(frozen=True)
class FaceInfo:
    """One analysed face. Coordinates are pixels of the picture it was found in,
    whose size is ``image_size`` (width, height)."""

    bbox: tuple[float, float, float, float]
    kps: tuple[tuple[float, float], ...]
    det_score: float
    embedding: np.ndarray = field(repr=False)
    image_size: tuple[int, int]

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


class FaceSummary(BaseModel):
    """Where a face is and how sure the detector was: what the CLI reports, the HTTP API
    shows and the service's records keep (the one public face model; it never carries the
    embedding)."""

    model_config = ConfigDict(extra="ignore")

    bbox: list[float] = Field(description="x1, y1, x2, y2 in the analysed photo's pixels.")
    kps: list[list[float]] = Field(description="Eyes, nose, mouth corners (x, y).")
    det_score: float
    image_size: list[int] = Field(description="Width, height of the frame the box and keypoints are in.")

    @classmethod
    def of(cls, info: FaceInfo) -> "FaceSummary":
        return FaceSummary(**face_geometry(info)).public()

    def public(self) -> "FaceSummary":
        """As it is shown: coordinates to 0.01 px, the score to 4 places."""
        return FaceSummary(bbox=[round(v, 2) for v in self.bbox], kps=[[round(x, 2), round(y, 2)] for x, y in self.kps],
                           det_score=round(self.det_score, 4), image_size=list(self.image_size))


def face_geometry(info: FaceInfo) -> dict:
    """A face's box, keypoints, score and frame size as plain values, exactly."""
    return {"bbox": [float(v) for v in info.bbox], "kps": [[float(x), float(y)] for x, y in info.kps],
            "det_score": float(info.det_score), "image_size": [int(v) for v in info.image_size]}


@dataclass(frozen=True)
class FaceRequest:
    """One identity to analyse (what :meth:`FaceAnalyzer.analyze_many` takes): its photos,
    an optional pose photo for the keypoints, how to combine the embeddings, and the names
    errors give the photos (default ``face_images[i]`` and ``pose_image``)."""

    images: Sequence[ImageInput]
    pose: ImageInput | None = None
    combine: CombineMode = "mean"
    names: Sequence[str] | None = None
    pose_name: str = "pose_image"
    field: str = "face_images"

    def photo_names(self) -> list[str]:
        if not self.images:
            raise InvalidParameter(self.field, "at least one face photo is needed")
        names = list(self.names) if self.names is not None else [f"{self.field}[{i}]" for i in range(len(self.images))]
        if len(names) != len(self.images):
            raise InvalidParameter("names", f"one name per photo: {len(names)} names for {len(self.images)} photos")
        return names



def combine_embeddings(embeddings: Sequence[np.ndarray], mode: CombineMode = "mean") -> np.ndarray:
    """Combine the raw ArcFace embeddings of several photos of one person.

    ``mean``: their average (the paper). ``norm_mean``: the average of the L2-normalised
    embeddings, rescaled to the mean norm of the inputs (equal weight per photo, the
    usual magnitude).
    """
    stack = np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in embeddings])
    if mode == "mean":
        return stack.mean(axis=0)
    if mode == "norm_mean":
        norms = np.linalg.norm(stack, axis=1, keepdims=True)
        direction = (stack / np.maximum(norms, 1e-12)).mean(axis=0)
        return direction / max(float(np.linalg.norm(direction)), 1e-12) * float(norms.mean())
    raise InvalidParameter("face_combine", f"unknown mode {mode!r}; choose 'mean' or 'norm_mean'")


def cuda_is_usable() -> bool:
    """True when a CUDA device can really run work (not merely a CUDA build installed)."""
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:  # pragma: no cover - torch missing or broken driver
        return False


def session_options():
    """ONNX Runtime session options for the face models: the intra-op threads sleep when
    they run out of work instead of spinning. Measured on a 2-core CPU (the fixture
    detector at 640x640): the same 80 ms a detection either way, but 161 ms of CPU time
    with ORT's default spinning against 81 ms without, CPU taken from the replicas and
    requests beside it. (Only ORT's CPU-side thread pool is concerned: a GPU provider's
    kernels are not.)"""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def select_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """ONNX Runtime execution providers for the face models.

    ``"auto"``: CUDA when the runtime has it *and* a CUDA device is usable, else CPU.
    An explicit list is checked against what the runtime offers; asking for a GPU
    provider without a usable GPU is an error, never a silent fallback.
    """
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    if providers == "auto":
        if "CUDAExecutionProvider" in available and cuda_is_usable():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    chosen = list(providers)
    if not chosen:
        raise InvalidParameter("providers", "an empty provider list")
    for name in chosen:
        if name not in available:
            raise ProviderUnavailable(f"execution provider {name} is not in this onnxruntime build ({sorted(available)})")
        if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and not cuda_is_usable():
            raise ProviderUnavailable(f"execution provider {name} was asked for but no CUDA device is usable")
    return chosen


class FaceAnalyzer:
    """Detects the largest face of a photo and computes its identity embedding."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        providers: str | Sequence[str] = "auto",
        det_sizes: Sequence[int] = DEFAULT_DET_SIZES,
        det_thresh: float = 0.5,
        batch_recognition: bool = False,
        provider_options: Sequence[dict] | None = None,
    ) -> None:
        """``batch_recognition``: :meth:`analyze_many` analyses its photos with
        :meth:`analyze_batch` (one recognition call). ``provider_options``: one dict per
        provider, as onnxruntime takes them (default: a TensorRT engine cache next to the
        models when TensorRT is asked for)."""
        model_dir = Path(model_dir)
        for name in (DETECTOR_FILE, RECOGNIZER_FILE):
            if not (model_dir / name).is_file():
                raise WeightsNotFound(name, str(model_dir), "the antelopev2 folder needs the detector and recogniser")
        if not det_sizes or any(int(s) < 32 or int(s) % 32 for s in det_sizes):
            raise InvalidParameter("det_sizes", "must be positive multiples of 32")
        self.providers = select_providers(providers)
        self.det_sizes = tuple(int(s) for s in det_sizes)
        self.det_thresh = float(det_thresh)
        self.model_dir = model_dir
        self.batch_recognition = bool(batch_recognition)
        if provider_options is None and self.providers[0] == "TensorrtExecutionProvider":
            cache = Path(os.environ.get("INSTANTID_TRT_CACHE", model_dir / ".trt-cache"))
            provider_options = [{"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                 "trt_engine_cache_path": str(cache)}] + [{} for _ in self.providers[1:]]
        extra = {"provider_options": list(provider_options)} if provider_options is not None else {}
        if provider_options is not None and len(extra["provider_options"]) != len(self.providers):
            raise InvalidParameter("provider_options", f"one dict per provider ({len(self.providers)})")
        from insightface.app import FaceAnalysis

        self._app = FaceAnalysis(
            name=str(model_dir), allowed_modules=["detection", "recognition"], providers=self.providers,
            sess_options=session_options(), **extra,
        )
        if "recognition" not in self._app.models:
            raise WeightsNotFound(RECOGNIZER_FILE, str(model_dir), "no recognition model was recognised there")
        ctx_id = 0 if self.providers[0] != "CPUExecutionProvider" else -1
        self._app.prepare(ctx_id=ctx_id, det_thresh=self.det_thresh, det_size=(self.det_sizes[0], self.det_sizes[0]))
        self._detector = self._app.det_model
        self._recognizer = self._app.models["recognition"]
        self._check_active_providers()
        self._lock = threading.Lock()

    @property
    def active_providers(self) -> list[str]:
        return list(self._detector.session.get_providers())

    def _check_active_providers(self) -> None:
        wanted = self.providers[0]
        for model in (self._detector, self._recognizer):
            active = model.session.get_providers()
            if not active or active[0] != wanted:
                raise ProviderUnavailable(
                    f"{Path(model.model_file).name}: asked for {wanted} but onnxruntime runs it on {active}"
                )

    def analyze(self, image: ImageInput, *, field: str = "image", reference_resize: bool = True) -> FaceInfo:
        """Analyse the largest face of one photo.

        With ``reference_resize`` the photo is first resized by the reference rule
        (short side 1024, long side at most 1280, multiples of 64), as the reference
        implementation does, so keypoints are in that frame. Raises
        :class:`NoFaceDetected` when no detection size finds a face.
        """
        picture, bgr = self._prepare(image, field, reference_resize)
        with self._lock:  # the ORT sessions are thread safe; insightface's caches are not
            bbox, kps, score = self._detect(bgr, field)
            from insightface.app.common import Face

            face = Face(bbox=bbox, kps=kps, det_score=score)
            embedding = np.asarray(self._recognizer.get(bgr, face), dtype=np.float32).reshape(-1)
        return _face_info(bbox, kps, score, embedding, picture.size)

    def analyze_batch(
        self,
        images: Sequence[ImageInput],
        *,
        fields: Sequence[str] | None = None,
        reference_resize: bool = True,
        errors: Literal["raise", "return"] = "raise",
    ) -> list[FaceInfo | Exception]:
        """:meth:`analyze` for several photos, with one recognition call for all their
        faces (the aligned crops go to the recogniser as one batch). Detection runs photo
        by photo (SCRFD's published export takes one image at a time). With
        ``errors="return"`` a photo that fails (no face, not an image) gives its error in
        its place instead of failing the others; with ``"raise"`` the first failing photo,
        in order, raises."""
        fields = list(fields) if fields is not None else [f"images[{i}]" for i in range(len(images))]
        if len(fields) != len(images):
            raise InvalidParameter("fields", "one name per image")
        results = self._analyze_photos([(image, name, True) for image, name in zip(images, fields)],
                                       reference_resize=reference_resize)
        failed = [result for result in results if isinstance(result, Exception)]
        if failed and errors == "raise":
            raise failed[0]
        return results

    def analyze_requests(self, requests: Sequence[FaceRequest], *,
                         limits: ImageLimits = DEFAULT_LIMITS) -> list[FaceInfo | Exception]:
        """:meth:`analyze_many` for several requests at once: every photo of every request
        is detected (photo by photo), then ONE recognition call embeds the faces of all the
        requests' identity photos (pose photos need only detection). Each request gets its
        :class:`FaceInfo`, or the error :meth:`analyze_many` would have raised for it (its
        first failing photo, in order); one bad request does not fail the others. Photos
        are decoded under ``limits``."""
        photos: list[tuple[ImageInput, str, bool]] = []
        spans: list[tuple[int, int] | Exception] = []  # per request: its photos in ``photos``, or its error
        for request in requests:
            try:
                names = request.photo_names()
            except InstantIDError as error:
                spans.append(error)
                continue
            start = len(photos)
            photos += [(image, name, True) for image, name in zip(request.images, names)]
            if request.pose is not None:
                photos.append((request.pose, request.pose_name, False))
            spans.append((start, len(photos)))
        results = self._analyze_photos(photos, limits=limits)
        out: list[FaceInfo | Exception] = []
        for request, span in zip(requests, spans):
            if isinstance(span, Exception):
                out.append(span)
                continue
            mine = results[span[0] : span[1]]
            failed = [result for result in mine if isinstance(result, Exception)]
            if failed:
                out.append(failed[0])
                continue
            faces = mine[: len(request.images)]
            layout = mine[-1] if request.pose is not None else faces[0]
            try:
                out.append(_identity(faces, layout, request.combine))
            except InstantIDError as error:  # e.g. an unknown combine mode
                out.append(error)
        return out

    def _analyze_photos(self, photos: Sequence[tuple[ImageInput, str, bool]], *, reference_resize: bool = True,
                        limits: ImageLimits = DEFAULT_LIMITS) -> list[FaceInfo | Exception]:
        """Per ``(photo, field name, recognise)``: its largest face, or the error it failed
        with (decoding, detection). Decoding and resizing need no lock; detection runs
        photo by photo; the faces of the photos to recognise go to the recogniser in one
        call (the others get an empty embedding)."""
        results: list[FaceInfo | Exception | None] = [None] * len(photos)
        prepared = []  # (index, field, picture size, bgr)
        for index, (image, name, _) in enumerate(photos):
            try:
                picture, bgr = self._prepare(image, name, reference_resize, limits)
                prepared.append((index, name, picture.size, bgr))
            except Exception as error:  # this photo's error, not its batch's
                results[index] = error
        found = []  # (index, picture size, bgr, bbox, kps, score)
        with self._lock:
            for index, name, size, bgr in prepared:
                try:
                    found.append((index, size, bgr, *self._detect(bgr, name)))
                except Exception as error:
                    results[index] = error
            recognise = [face for face in found if photos[face[0]][2]]
            embeddings = np.zeros((0, 0), np.float32)
            if recognise:
                embeddings = embed_aligned(self._recognizer, [(bgr, kps) for _, _, bgr, _, kps, _ in recognise])
        rows = {face[0]: row for row, face in enumerate(recognise)}
        for index, size, _, bbox, kps, score in found:
            embedding = embeddings[rows[index]] if index in rows else np.zeros(0, np.float32)
            results[index] = _face_info(bbox, kps, score, embedding, size)
        return results  # type: ignore[return-value]

    def _prepare(self, image: ImageInput, field: str, reference_resize: bool, limits: ImageLimits = DEFAULT_LIMITS):
        picture = load_image(image, field=field, limits=limits)
        if reference_resize:
            picture = reference_picture(picture)
        return picture, to_bgr(picture)

    def _detect(self, bgr: np.ndarray, field: str):
        """The largest face: (bbox, kps, score), trying smaller detection sizes when none is found."""
        for det_size in self.det_sizes:
            bboxes, kpss = self._detector.detect(bgr, input_size=(det_size, det_size), max_num=0)
            if len(bboxes):
                break
        else:
            raise NoFaceDetected(f"no face was detected (tried detection sizes {list(self.det_sizes)})", field)
        areas = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
        best = int(np.argmax(areas))
        return bboxes[best, :4], kpss[best], bboxes[best, 4]

    def analyze_many(
        self,
        images: Sequence[ImageInput],
        *,
        pose: ImageInput | None = None,
        combine: CombineMode = "mean",
        field: str = "face_images",
        names: Sequence[str] | None = None,
        pose_name: str = "pose_image",
    ) -> FaceInfo:
        """One identity from several photos: combined embedding; keypoints and box from
        the first photo, or from ``pose`` (another photo) when given. ``names`` name the
        photos in error messages (default ``face_images[i]``)."""
        request = FaceRequest(images=list(images), pose=pose, combine=combine, names=names, pose_name=pose_name,
                              field=field)
        names = request.photo_names()
        if self.batch_recognition:
            faces = self.analyze_batch(request.images, fields=names)
        else:
            faces = [self.analyze(img, field=name) for img, name in zip(request.images, names)]
        layout = self.analyze(pose, field=pose_name) if pose is not None else faces[0]
        return _identity(faces, layout, combine)


def reference_picture(picture: Image.Image) -> Image.Image:
    """The photo as the face stage analyses it: resized by the reference rule (short side
    1024, long side at most 1280, multiples of 64)."""
    size = reference_size(*picture.size)
    return picture if size == picture.size else picture.resize(size, Image.Resampling.LANCZOS)


def to_bgr(picture: Image.Image) -> np.ndarray:
    """An RGB picture as insightface takes it (BGR, contiguous)."""
    picture = picture if picture.mode == "RGB" else picture.convert("RGB")
    return np.ascontiguousarray(np.asarray(picture)[:, :, ::-1])


def embed_aligned(recognizer, faces: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """ArcFace embeddings (raw) of faces given as (BGR picture, 5 keypoints): each aligned to
    the recogniser's square input by insightface's ``norm_crop`` (the five-point similarity
    transform ArcFace models are trained on), then one recogniser call for all of them.
    ``recognizer``: an insightface ``ArcFaceONNX`` (any ArcFace-signature ONNX model)."""
    from insightface.utils import face_align

    side = recognizer.input_size[0]
    crops = [face_align.norm_crop(bgr, landmark=np.asarray(kps, np.float32), image_size=side) for bgr, kps in faces]
    return np.asarray(recognizer.get_feat(crops), dtype=np.float32)


def _identity(faces: Sequence[FaceInfo], layout: FaceInfo, combine: CombineMode) -> FaceInfo:
    """One identity: the photos' combined embedding; keypoints, box and picture size from
    ``layout`` (the first photo or the pose photo); the first photo's detection score."""
    embedding = combine_embeddings([f.embedding for f in faces], combine) if len(faces) > 1 else faces[0].embedding
    return FaceInfo(
        bbox=layout.bbox,
        kps=layout.kps,
        det_score=faces[0].det_score,
        embedding=embedding,
        image_size=layout.image_size,
    )


def with_layout(face: FaceInfo, layout: FaceInfo) -> FaceInfo:
    """``face``'s identity with the keypoints, box and picture size of ``layout`` (a
    registered face rendered in another photo's head pose)."""
    return FaceInfo(bbox=layout.bbox, kps=layout.kps, det_score=face.det_score, embedding=face.embedding,
                    image_size=layout.image_size)


def _face_info(bbox, kps, score, embedding: np.ndarray, image_size: tuple[int, int]) -> FaceInfo:
    return FaceInfo(
        bbox=tuple(float(v) for v in bbox),
        kps=tuple((float(x), float(y)) for x, y in kps),
        det_score=float(score),
        embedding=np.asarray(embedding, dtype=np.float32).reshape(-1),
        image_size=image_size,
    )
