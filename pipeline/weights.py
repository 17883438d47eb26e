"""Finding the weights: a weights root on local disk, under an ``s3://`` prefix, or on the
Hugging Face hub, in the published layout::

    sdxl/                       diffusers folder (model_index.json ...) or one .safetensors checkpoint
    instantid/ControlNetModel/  config.json + diffusion_pytorch_model.safetensors
    instantid/ip-adapter.bin    (or ip-adapter.safetensors)
    antelopev2/                 scrfd_10g_bnkps.onnx, glintr100.onnx (+ the pack's other models)

Remote files are downloaded once into a local cache (one process downloads, the others
on the node wait for it) and everything is then read from disk. From S3, files come several
at once, each in parallel ranged GETs, checked against their ETag and resumed after an
interruption (:mod:`pipeline.transfer`). A cached S3 file is used
again only while the object is the one it was downloaded from: its ETag (the S3 content
tag) is recorded at download, outside the cached tree, and compared with the listing at
every resolve, so a changed object is fetched again even when its size is unchanged. Hub
downloads go through huggingface_hub's cache, which is keyed by revision and file ETag.
Each component may also be given on its own (``sdxl=``, ``instantid=``, ``antelopev2=``)
as a local path, an ``s3://`` URI or ``hf://owner/repo``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from .errors import InvalidParameter, WeightsNotFound
from .face import DETECTOR_FILE, RECOGNIZER_FILE
from .s3 import S3Location, s3_client
from .transfer import PART_BYTES, WORKERS, ContentMismatch, ObjectChanged, fetch_object, run_all

COMPONENTS = ("sdxl", "instantid", "antelopev2")
HUB_REPOS = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "instantid": "InstantX/InstantID"}
HUB_ROOTS = ("hf://", "hub")
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_SKIP_SUFFIXES = (".msgpack", ".onnx", ".onnx_data", ".ckpt", ".pb", ".xml", ".h5", ".ot")
IP_ADAPTER_NAMES = ("ip-adapter.bin", "ip-adapter.safetensors")
FILES_AT_ONCE = 4  # files of one tree fetched from S3 at once (each in WORKERS ranged parts)


def default_cache_dir() -> Path:
    base = os.environ.get("INSTANTID_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "instantid"
    )
    return Path(base)


@dataclass(frozen=True)
class WeightsPaths:
    """Local paths of every weight the pipeline loads."""

    sdxl: Path | None  # a diffusers folder or a single .safetensors file
    controlnet: Path | None  # folder with config.json + weights
    ip_adapter: Path | None  # ip-adapter.bin or .safetensors
    antelopev2: Path | None  # folder with the detector and the recogniser
    sdxl_config: str | None = None  # for a single-file checkpoint: a folder or hub repo with its configs
    extras: "ExtraWeights | None" = None  # the root's optional parts (extra ControlNets, annotators)

    @property
    def sdxl_is_single_file(self) -> bool:
        return self.sdxl is not None and self.sdxl.is_file()


def resolve_weights(
    root: str | os.PathLike | None = None,
    *,
    sdxl: str | None = None,
    instantid: str | None = None,
    antelopev2: str | None = None,
    sdxl_config: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    s3_endpoint: str | None = None,
    components: tuple[str, ...] = COMPONENTS,
) -> WeightsPaths:
    """Resolve (and fetch when remote) the ``components`` asked for (default: all; the
    others are ``None``). Raises :class:`WeightsNotFound` naming the missing file and
    where it was looked for."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise InvalidParameter("components", f"unknown weight components {sorted(unknown)}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    given = {"sdxl": sdxl, "instantid": instantid, "antelopev2": antelopev2}
    locations = {name: given[name] for name in components}
    root_text = os.fspath(root) if root is not None else None
    for name in locations:
        if locations[name] is None:
            if root_text is None:
                raise InvalidParameter("weights", f"no weights root given and no location for {name}")
            if root_text in HUB_ROOTS:
                if name not in HUB_REPOS:
                    raise WeightsNotFound(
                        "antelopev2/",
                        "the Hugging Face hub",
                        "antelopev2 has no official hub home: give its folder (local or s3://) explicitly",
                    )
                locations[name] = f"hf://{HUB_REPOS[name]}"
            else:
                locations[name] = _join(root_text, name)
    fetcher = _Fetcher(cache, s3_endpoint)
    found: dict[str, Path | None] = dict.fromkeys(("sdxl", "controlnet", "ip_adapter", "antelopev2"))
    if "sdxl" in locations:
        found["sdxl"] = _check_sdxl(fetcher.fetch(locations["sdxl"], _sdxl_filter), locations["sdxl"])
    if "instantid" in locations:
        folder = fetcher.fetch(locations["instantid"], _instantid_filter)
        found["controlnet"] = _check_controlnet(folder / "ControlNetModel", locations["instantid"])
        found["ip_adapter"] = _check_ip_adapter(folder, locations["instantid"])
    if "antelopev2" in locations:
        folder = fetcher.fetch(locations["antelopev2"], _antelope_filter)
        found["antelopev2"] = _check_antelope(folder, locations["antelopev2"])
    return WeightsPaths(**found, sdxl_config=sdxl_config, extras=ExtraWeights(root_text, cache, s3_endpoint))


class ExtraWeights:
    """The optional parts of a weights root, fetched when first needed: ``<group>/<name>/``
    folders (``controlnets/canny/``, ``annotators/depth/``) of a local root, or of an
    ``s3://`` root downloaded into the cache as the components are. A hub root has none."""

    def __init__(self, root: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None,
                 s3_endpoint: str | None = None) -> None:
        text = os.fspath(root) if root is not None else ""
        self.root = text if text and not text.startswith("hf://") and text not in HUB_ROOTS else None
        self._fetcher = _Fetcher(Path(cache_dir) if cache_dir else default_cache_dir(), s3_endpoint)

    def __repr__(self) -> str:  # keys get_pipeline's cache: the same root, the same key
        return f"ExtraWeights({self.root!r})"

    def names(self, group: str, markers: tuple[str, ...] = ("config.json",)) -> list[str]:
        """The folders under ``group`` that hold one of the ``markers`` files."""
        if self.root is None:
            return []
        if self.root.startswith("s3://"):
            from botocore.exceptions import BotoCoreError, ClientError

            if self._fetcher._client is None:
                self._fetcher._client = s3_client(self._fetcher.s3_endpoint)
            try:
                keys = self._fetcher._list(S3Location.parse(_join(self.root, group), field="weights"))
            except (BotoCoreError, ClientError):
                return []
            return sorted({key.split("/")[0] for key in keys if key.count("/") == 1 and key.split("/")[1] in markers})
        folder = Path(self.root).expanduser() / group
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if any((p / marker).is_file() for marker in markers))

    def folder(self, group: str, name: str, markers: tuple[str, ...] = ("config.json",)) -> Path | None:
        """The local folder of ``group/name`` (downloaded first from S3); None when the root
        has no such folder or it holds none of the ``markers`` files."""
        if self.root is None:
            return None
        return self._found(f"{group}/{name}", markers)

    def top_folder(self, name: str, markers: tuple[str, ...] = ("config.json",)) -> Path | None:
        """The local folder ``name`` at the root itself (``safety_checker/``), downloaded
        first from S3; None as for :meth:`folder`."""
        if self.root is None:
            return None
        return self._found(name, markers)

    def _found(self, path: str, markers: tuple[str, ...]) -> Path | None:
        folder = self._fetcher.fetch(_join(self.root, path), _extra_filter)
        return folder if any((folder / marker).is_file() for marker in markers) else None


def _join(root: str, name: str) -> str:
    if root.startswith("s3://"):
        return root.rstrip("/") + "/" + name
    return str(Path(root).expanduser() / name)


# --------------------------------------------------------------------------- checks


def _check_sdxl(folder: Path, where: str) -> Path:
    if folder.is_file():
        if folder.suffix != ".safetensors":
            raise WeightsNotFound("sdxl .safetensors checkpoint", where, f"{folder.name} is not a .safetensors file")
        return folder
    if not folder.is_dir():
        raise WeightsNotFound("sdxl/", where, "expected SDXL in diffusers layout or one .safetensors checkpoint")
    if not (folder / "model_index.json").is_file():
        singles = sorted(folder.glob("*.safetensors"))
        if len(singles) == 1:
            return singles[0]
        if len(singles) > 1:
            raise WeightsNotFound(
                "sdxl/model_index.json", where, f"several checkpoints and no model_index.json: {[p.name for p in singles]}"
            )
        raise WeightsNotFound("sdxl/model_index.json", where, "expected SDXL in diffusers layout or one .safetensors")
    for component in SDXL_COMPONENTS:
        sub = folder / component
        if component == "scheduler":
            required = ["scheduler_config.json"]
        elif component.startswith("tokenizer"):
            if (sub / "tokenizer.json").is_file():
                continue
            required = ["vocab.json", "merges.txt"]
        else:
            required = ["config.json"]
        for name in required:
            if not (sub / name).is_file():
                raise WeightsNotFound(f"sdxl/{component}/{name}", where)
        if component in ("unet", "vae", "text_encoder", "text_encoder_2") and not _weight_files(sub):
            stem = "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"
            raise WeightsNotFound(f"sdxl/{component}/{stem}.safetensors", where)
    return folder


def _weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()]


def _check_controlnet(folder: Path, where: str) -> Path:
    if not (folder / "config.json").is_file():
        raise WeightsNotFound("instantid/ControlNetModel/config.json", where)
    if not _weight_files(folder):
        raise WeightsNotFound("instantid/ControlNetModel/diffusion_pytorch_model.safetensors", where)
    return folder


def _check_ip_adapter(folder: Path, where: str) -> Path:
    for name in IP_ADAPTER_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsNotFound("instantid/ip-adapter.bin", where)


def _check_antelope(folder: Path, where: str) -> Path:
    for name in (DETECTOR_FILE, RECOGNIZER_FILE):
        if not (folder / name).is_file():
            raise WeightsNotFound(f"antelopev2/{name}", where)
    return folder


# --------------------------------------------------------------------------- which remote files


def _sdxl_filter(relative: str, everything: set[str]) -> bool:
    path = PurePosixPath(relative)
    if "model_index.json" not in everything:  # a single-file checkpoint
        return len(path.parts) == 1 and path.suffix == ".safetensors"
    if len(path.parts) == 1:
        return path.name == "model_index.json"
    if path.parts[0] not in SDXL_COMPONENTS or path.suffix in _SKIP_SUFFIXES:
        return False
    return _preferred_weight(path, everything)


def _preferred_weight(path: PurePosixPath, everything: set[str]) -> bool:
    """Only one format of each weight: safetensors over .bin, no precision variants
    (``*.fp16.*``) when the full-precision file exists."""
    parent = str(path.parent)
    if path.suffix == ".bin":
        return not any(p.startswith(parent + "/") and p.endswith(".safetensors") for p in everything)
    if path.suffix == ".safetensors" and len(path.suffixes) > 1:
        plain = f"{parent}/{path.name.split('.')[0]}.safetensors"
        return plain not in everything
    return True


def _instantid_filter(relative: str, everything: set[str]) -> bool:
    path = PurePosixPath(relative)
    if len(path.parts) == 1:
        return path.name in IP_ADAPTER_NAMES and (path.name == "ip-adapter.bin" or "ip-adapter.bin" not in everything)
    return path.parts[0] == "ControlNetModel" and path.suffix not in _SKIP_SUFFIXES and _preferred_weight(path, everything)


def _extra_filter(relative: str, everything: set[str]) -> bool:
    path = PurePosixPath(relative)
    return path.suffix not in _SKIP_SUFFIXES and _preferred_weight(path, everything)


def _antelope_filter(relative: str, everything: set[str]) -> bool:
    return relative in (DETECTOR_FILE, RECOGNIZER_FILE)


_HUB_PATTERNS = {
    _sdxl_filter: [
        "model_index.json",
        "*/config.json",
        "scheduler/*.json",
        "tokenizer*/*",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder*/model.safetensors",
    ],
    _instantid_filter: ["ControlNetModel/*", "ip-adapter.bin"],
}


# --------------------------------------------------------------------------- fetching


def _etag(response: dict) -> str:
    """An S3 ETag without its quotes ("" when the server gives none: then sizes decide)."""
    return str(response.get("ETag") or "").strip('"')


class _Fetcher:
    def __init__(self, cache: Path, s3_endpoint: str | None) -> None:
        self.cache = cache
        self.s3_endpoint = s3_endpoint
        self._client = None
        self.part_bytes, self.workers, self.files_at_once = PART_BYTES, WORKERS, FILES_AT_ONCE
        self.fetched: list = []  # a transfer.Fetched per file fetched (not found in the cache)

    def fetch(self, location: str, keep: Callable[[str, set[str]], bool]) -> Path:
        if location.startswith("s3://"):
            return self._fetch_s3(S3Location.parse(location, field="weights"), keep)
        if location.startswith("hf://"):
            return self._fetch_hub(location[len("hf://") :], keep)
        return Path(location).expanduser()

    # S3 --------------------------------------------------------------------
    def _fetch_s3(self, where: S3Location, keep) -> Path:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:  # a connection for every part in flight
            self._client = s3_client(self.s3_endpoint, max_pool_connections=self.workers * self.files_at_once + 2)
        local = self.cache / "s3" / where.bucket / where.prefix
        try:
            objects = self._list(where)
        except (BotoCoreError, ClientError) as error:
            raise WeightsNotFound(str(where), "S3", f"listing failed: {error}") from None
        if not objects and where.prefix:  # the location may be one object (a checkpoint file)
            try:
                head = self._client.head_object(Bucket=where.bucket, Key=where.prefix)
            except (BotoCoreError, ClientError):
                return local  # nothing there: the checks name what is missing
            self._download(where.bucket, where.prefix, local, int(head["ContentLength"]), _etag(head))
            return local
        everything = set(objects)
        wanted = [(relative, size, etag) for relative, (size, etag) in sorted(objects.items())
                  if keep(relative, everything)]
        # several files at once (most of a tree is small files), each in parallel parts
        run_all(lambda item: self._download(where.bucket, where.key(item[0]), local / item[0], item[1], item[2]),
                wanted, self.files_at_once, "s3-file")
        return local

    def _list(self, where: S3Location) -> dict[str, tuple[int, str]]:
        """relative key -> (size, ETag) of every object under the prefix."""
        prefix = where.prefix + "/" if where.prefix else ""
        objects: dict[str, tuple[int, str]] = {}
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=where.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix) :]
                if relative and not relative.endswith("/"):
                    objects[relative] = (int(item["Size"]), _etag(item))
        return objects

    def _etag_record(self, bucket: str, key: str) -> Path:
        return self.cache / "s3-etags" / bucket / f"{key}.etag"

    def _is_cached(self, target: Path, record: Path, size: int, etag: str) -> bool:
        try:
            return target.stat().st_size == size and record.read_text() == etag
        except OSError:  # no file, or no record of what it was downloaded from
            return False

    def _download(self, bucket: str, key: str, target: Path, size: int, etag: str, attempts: int = 3) -> None:
        """Parallel ranged GETs into the cache, checked against the ETag, resumed from
        where an interrupted fetch stopped (:mod:`pipeline.transfer`); one process per
        file on a node (a file lock), the others wait and find it cached."""
        from botocore.exceptions import BotoCoreError, ClientError
        from filelock import FileLock

        record = self._etag_record(bucket, key)
        if self._is_cached(target, record, size, etag):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if self._is_cached(target, record, size, etag):
                return  # another process finished it while we waited
            why, changed = "", False
            for _ in range(attempts):
                record.unlink(missing_ok=True)  # no record says "fetch again", whatever happens next
                try:
                    if changed:  # replaced since it was listed: fetch what is there now
                        head = self._client.head_object(Bucket=bucket, Key=key)
                        size, etag = int(head["ContentLength"]), _etag(head)
                    self.fetched.append(fetch_object(self._client, bucket, key, target, size=size, etag=etag,
                                                     part_bytes=self.part_bytes, workers=self.workers))
                except ObjectChanged:
                    why, changed = "it changed while it was fetched", True
                    continue
                except ContentMismatch as error:
                    why = str(error)
                    continue
                except (BotoCoreError, ClientError) as error:  # the connection dropped...: resume from the journal
                    why = f"{type(error).__name__}: {error}"
                    continue
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(etag)
                return
            raise WeightsNotFound(f"s3://{bucket}/{key}", "S3", f"{attempts} fetches failed, the last: {why}")

    # Hugging Face hub ------------------------------------------------------
    def _fetch_hub(self, spec: str, keep) -> Path:
        from huggingface_hub import snapshot_download

        repo_id, _, revision = spec.partition("@")
        try:
            return Path(
                snapshot_download(
                    repo_id,
                    revision=revision or None,
                    allow_patterns=_HUB_PATTERNS.get(keep),
                    cache_dir=str(self.cache / "hub"),
                )
            )
        except Exception as error:  # offline, unknown repo, gated repo...
            raise WeightsNotFound(
                f"hf://{spec}", "the Hugging Face hub", f"could not fetch it ({type(error).__name__}: {error})"
            ) from None
