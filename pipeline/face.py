"""The face stage: detection and ArcFace identity embedding with insightface.

Loads an antelopev2-layout folder through insightface's ``FaceAnalysis`` (detection and
recognition only), keeps the largest face by true area, retries at smaller detection
sizes when nothing is found, and combines several reference photos.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from .errors import InvalidParameter, NoFaceDetected, ProviderUnavailable, WeightsNotFound
from .images import ImageInput, load_image
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

    def to_dict(self, *, with_embedding: bool = False) -> dict:
        out = {
            "bbox": [round(v, 2) for v in self.bbox],
            "kps": [[round(x, 2), round(y, 2)] for x, y in self.kps],
            "det_score": round(float(self.det_score), 4),
            "image_size": list(self.image_size),
        }
        if with_embedding:
            out["embedding"] = [float(v) for v in self.embedding]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FaceInfo":
        return cls(
            bbox=tuple(float(v) for v in data["bbox"]),
            kps=tuple((float(x), float(y)) for x, y in data["kps"]),
            det_score=float(data["det_score"]),
            embedding=np.asarray(data["embedding"], dtype=np.float32),
            image_size=(int(data["image_size"][0]), int(data["image_size"][1])),
        )


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
    ) -> None:
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
        from insightface.app import FaceAnalysis

        self._app = FaceAnalysis(
            name=str(model_dir), allowed_modules=["detection", "recognition"], providers=self.providers
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
        picture = load_image(image, field=field)
        if reference_resize:
            size = reference_size(*picture.size)
            if size != picture.size:
                picture = picture.resize(size, Image.Resampling.LANCZOS)
        bgr = np.ascontiguousarray(np.asarray(picture)[:, :, ::-1])
        with self._lock:  # the ORT sessions are thread safe; insightface's caches are not
            for det_size in self.det_sizes:
                bboxes, kpss = self._detector.detect(bgr, input_size=(det_size, det_size), max_num=0)
                if len(bboxes):
                    break
            else:
                raise NoFaceDetected(f"no face was detected (tried detection sizes {list(self.det_sizes)})", field)
            areas = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
            best = int(np.argmax(areas))
            from insightface.app.common import Face

            face = Face(bbox=bboxes[best, :4], kps=kpss[best], det_score=bboxes[best, 4])
            embedding = np.asarray(self._recognizer.get(bgr, face), dtype=np.float32).reshape(-1)
        return FaceInfo(
            bbox=tuple(float(v) for v in bboxes[best, :4]),
            kps=tuple((float(x), float(y)) for x, y in kpss[best]),
            det_score=float(bboxes[best, 4]),
            embedding=embedding,
            image_size=picture.size,
        )

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
        if not images:
            raise InvalidParameter(field, "at least one face photo is needed")
        names = list(names) if names is not None else [f"{field}[{i}]" for i in range(len(images))]
        faces = [self.analyze(img, field=name) for img, name in zip(images, names)]
        layout = self.analyze(pose, field=pose_name) if pose is not None else faces[0]
        embedding = combine_embeddings([f.embedding for f in faces], combine) if len(faces) > 1 else faces[0].embedding
        return FaceInfo(
            bbox=layout.bbox,
            kps=layout.kps,
            det_score=faces[0].det_score,
            embedding=embedding,
            image_size=layout.image_size,
        )
