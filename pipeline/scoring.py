"""Identity-fidelity scores of one rendered image: face similarity and CLIP text-image score.

* **Face similarity**: the cosine between the identity photo's embedding and the embedding
  of the largest face found in the image. Both come from the pipeline's own face stage
  (:class:`~pipeline.face.FaceAnalyzer` over ``antelopev2/``: SCRFD detection, the largest
  face, glintr100; the photo resized by the reference rule, the image scored as rendered).
  When the weights root holds a second recogniser (``eval/face/``: one ArcFace-signature
  ONNX model, 112x112 aligned input), the same faces (same detections and keypoints) are
  also embedded by it: InstantID was trained on antelopev2 embeddings, so scoring with that
  same model flatters it. An image without a face has no similarity (``None``), never 0.
* **CLIP score**: ``100 * max(cos, 0)`` of the CLIP image and text embeddings (the CLIP-score
  convention), with the model in ``eval/clip/`` (transformers layout: CLIPModel +
  CLIPProcessor); ``None`` when the root has none.

Every model runs deterministically: the same image gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import InvalidWeights, NoFaceDetected
from .face import FaceAnalyzer, embed_aligned, reference_picture, select_providers, session_options, to_bgr
from .images import ImageInput, load_image

EVAL_FACE_DIR = Path("eval") / "face"
EVAL_CLIP_DIR = Path("eval") / "clip"


@dataclass(frozen=True)
class Reference:
    """An identity as the scores compare against it: its antelopev2 embedding (as the
    pipeline's face analysis gives it) and, when there is a second recogniser, its
    embedding by that one (of the same detected face)."""

    embedding: np.ndarray
    embedding2: np.ndarray | None


@dataclass(frozen=True)
class CaseScore:
    face_found: bool
    det_score: float | None
    face_sim: float | None  # antelopev2
    face_sim2: float | None  # the second recogniser
    clip_cosine: float | None  # cosine of the CLIP image and text embeddings
    clip_score: float | None  # the CLIP-score convention: 100 * max(cos, 0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def find_recognizer(root: Path) -> Path | None:
    """The one ``.onnx`` file of ``eval/face/`` (None when there is none)."""
    folder = Path(root) / EVAL_FACE_DIR
    found = sorted(folder.glob("*.onnx")) if folder.is_dir() else []
    if len(found) > 1:
        raise InvalidWeights(f"{folder} holds {len(found)} .onnx files ({', '.join(p.name for p in found)}): "
                             "keep the one recogniser to score with")
    return found[0] if found else None


def find_clip(root: Path) -> Path | None:
    folder = Path(root) / EVAL_CLIP_DIR
    return folder if (folder / "config.json").is_file() else None


def load_recognizer(path: Path, providers: Sequence[str]):
    """An ArcFace-signature ONNX model through insightface's model zoo (as FaceAnalysis
    loads glintr100), ready to embed aligned crops."""
    from insightface.model_zoo import model_zoo

    try:
        model = model_zoo.get_model(str(path), providers=list(providers), sess_options=session_options())
    except Exception as error:  # onnxruntime or onnx refused the file
        raise InvalidWeights(f"{path}: not a loadable ONNX model ({error})") from None
    if model is None or getattr(model, "taskname", None) != "recognition":
        raise InvalidWeights(f"{path}: not a face recogniser (expected ArcFace's signature: one square input of "
                             "at least 112 px, one embedding output)")
    model.prepare(ctx_id=0 if providers[0] != "CPUExecutionProvider" else -1)
    return model


class ClipScorer:
    """CLIP text-image score with a transformers CLIPModel + CLIPProcessor folder, in fp32."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(folder))
        except (OSError, ValueError) as error:
            raise InvalidWeights(f"{folder}: not a CLIPModel with its CLIPProcessor ({error})") from None
        self.folder, self.device = Path(folder), device

    def describe(self) -> str:
        config = self.model.config
        vision = config.vision_config
        return (f"CLIP ViT, {vision.image_size} px in {vision.patch_size} px patches, {vision.num_hidden_layers} "
                f"layers of {vision.hidden_size}, {config.projection_dim}-d embeddings")

    def cosine(self, image: Image.Image, prompt: str) -> float:
        import torch

        inputs = self.processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt", padding=True,
                                truncation=True)
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return float(torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item())


def clip_score(cos: float | None) -> float | None:
    """The CLIP-score convention: ``100 * max(cos, 0)``."""
    return None if cos is None else 100.0 * max(cos, 0.0)


class Scorer:
    """Loads the scoring models of a weights root once; the same for every setting scored."""

    def __init__(self, antelopev2: Path, *, recognizer: Path | None = None, clip: Path | None = None,
                 providers: str | Sequence[str] = "auto", device: str = "cpu") -> None:
        self.providers = select_providers(providers)
        self.face = FaceAnalyzer(antelopev2, providers=self.providers)
        self.recognizer_path, self.clip_path = recognizer, clip
        self.recognizer = load_recognizer(recognizer, self.providers) if recognizer is not None else None
        self.clip = ClipScorer(clip, device) if clip is not None else None

    @classmethod
    def from_root(cls, root: str | Path, **kwargs) -> "Scorer":
        """``antelopev2/`` of a weights root (local or remote, as the pipeline finds it) and,
        in a local root, ``eval/face/*.onnx`` and ``eval/clip/`` when there."""
        from .weights import resolve_weights

        antelopev2 = resolve_weights(root, components=("antelopev2",)).antelopev2
        local = Path(root) if Path(str(root)).is_dir() else None
        return cls(antelopev2, recognizer=find_recognizer(local) if local else None,
                   clip=find_clip(local) if local else None, **kwargs)

    def notes(self) -> list[str]:
        """What the report should say about the models it scored with."""
        notes = ["face similarity: cosine of the identity photo's and the output's largest face's embeddings, "
                 "mean and standard deviation over the outputs where a face was found (face_found: their share); "
                 "face_sim: antelopev2 (glintr100, the recogniser InstantID was trained on)"]
        if self.recognizer_path is not None:
            notes.append(f"face_sim2: {self.recognizer_path.name} (eval/face/), an independent recogniser on the "
                         "same faces")
        else:
            notes.append("face_sim2 empty: no second recogniser (eval/face/*.onnx in a local weights root)")
        if self.clip_path is not None:
            notes.append("clip_score: 100 * max(cos, 0) of the CLIP embeddings of the image and its prompt "
                         f"(eval/clip/: {self.clip.describe()})")
        else:
            notes.append("clip_score empty: no CLIP model (eval/clip/ in a local weights root: a CLIPModel with its "
                         "CLIPProcessor)")
        return notes

    def reference(self, photo: ImageInput, *, field: str = "identity") -> Reference:
        """An identity photo's embeddings: antelopev2's as the pipeline's face analysis gives
        it (the photo resized by the reference rule, the largest face); raises
        :class:`~pipeline.errors.NoFaceDetected` when it has no face."""
        picture = reference_picture(load_image(photo, field=field))
        info = self.face.analyze(picture, field=field, reference_resize=False)
        second = None
        if self.recognizer is not None:
            second = embed_aligned(self.recognizer, [(to_bgr(picture), np.asarray(info.kps))])[0]
        return Reference(info.embedding, second)

    def score(self, image: Image.Image, reference: Reference, prompt: str) -> CaseScore:
        """One rendered image, as it was rendered (no resize), against ``reference`` and its prompt."""
        cos = self.clip.cosine(image, prompt) if self.clip is not None else None
        return self._face_score(image, reference, cos, "output")[0]

    def score_regions(self, image: Image.Image, boxes: Sequence[Sequence[float]], references: Sequence[Reference],
                      prompt: str) -> list[tuple[CaseScore, float | None]]:
        """Several people in one image: per region (``boxes``, one per reference), the face
        found there (the box grown by a quarter of its size each side) against its own
        reference, and ``leak``: its highest antelopev2 similarity to the other references
        (``None`` without a face). CLIP scores the whole image against ``prompt``."""
        cos = self.clip.cosine(image, prompt) if self.clip is not None else None
        out = []
        for k, box in enumerate(boxes):
            crop = image.crop(grown(box, image.size))
            score, embedding = self._face_score(crop, references[k], cos, f"region {k}")
            leak = None if embedding is None else max(
                cosine(r.embedding, embedding) for j, r in enumerate(references) if j != k)
            out.append((score, leak))
        return out

    def _face_score(self, picture: Image.Image, reference: Reference, cos: float | None, field: str):
        """(the score of the largest face in ``picture``, its antelopev2 embedding or None)."""
        try:
            found = self.face.analyze(picture, field=field, reference_resize=False)
        except NoFaceDetected:
            return CaseScore(False, None, None, None, cos, clip_score(cos)), None
        second = None
        if self.recognizer is not None and reference.embedding2 is not None:
            embedding = embed_aligned(self.recognizer, [(to_bgr(picture), np.asarray(found.kps))])[0]
            second = cosine(reference.embedding2, embedding)
        return CaseScore(True, found.det_score, cosine(reference.embedding, found.embedding), second, cos,
                         clip_score(cos)), found.embedding


def grown(box: Sequence[float], size: tuple[int, int], by: float = 0.25) -> tuple[int, int, int, int]:
    """``box`` grown by ``by`` of its width and height on each side, within a ``size`` picture."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = by * (x2 - x1), by * (y2 - y1)
    return (max(0, int(x1 - dx)), max(0, int(y1 - dy)), min(size[0], int(round(x2 + dx))),
            min(size[1], int(round(y2 + dy))))
