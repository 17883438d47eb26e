import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from pipeline.errors import WeightsNotFound
from pipeline.weights import ExtraWeights, resolve_weights
from tests.conftest import face_photo

REQUIRED = [
    "sdxl/model_index.json",
    "sdxl/unet/diffusion_pytorch_model.safetensors",
    "sdxl/tokenizer_2/vocab.json",
    "instantid/ControlNetModel/config.json",
    "instantid/ControlNetModel/diffusion_pytorch_model.safetensors",
    "instantid/ip-adapter.bin",
    "antelopev2/scrfd_10g_bnkps.onnx",
    "antelopev2/glintr100.onnx",
]


def test_local_root_resolves_to_the_published_layout(weights_dir):
    paths = resolve_weights(weights_dir)
    assert paths.sdxl == weights_dir / "sdxl" and not paths.sdxl_is_single_file
    assert paths.controlnet == weights_dir / "instantid" / "ControlNetModel"
    assert paths.ip_adapter == weights_dir / "instantid" / "ip-adapter.bin"
    assert paths.antelopev2 == weights_dir / "antelopev2"


@pytest.mark.parametrize("missing", REQUIRED)
def test_a_missing_file_is_named_with_where_it_was_looked_for(weights_dir, tmp_path, missing):
    root = tmp_path / "w"
    shutil.copytree(weights_dir, root)
    (root / missing).unlink()
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(root)
    message = str(info.value)
    assert missing.split("/")[-1] in message and str(root) in message


def test_ip_adapter_safetensors_form_and_single_file_sdxl_are_recognised(weights_dir, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(weights_dir, root)
    (root / "instantid" / "ip-adapter.bin").rename(root / "instantid" / "ip-adapter.safetensors")
    shutil.rmtree(root / "sdxl")
    (root / "sdxl").mkdir()
    (root / "sdxl" / "my-finetune.safetensors").write_bytes(b"x")
    paths = resolve_weights(root, sdxl_config="stabilityai/stable-diffusion-xl-base-1.0")
    assert paths.ip_adapter.name == "ip-adapter.safetensors"
    assert paths.sdxl_is_single_file and paths.sdxl.name == "my-finetune.safetensors"


def test_hub_root_names_the_repository_when_offline(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound, match="hf://stabilityai/stable-diffusion-xl-base-1.0"):
        resolve_weights("hub", antelopev2=str(weights_dir / "antelopev2"), cache_dir=tmp_path)
    with pytest.raises(WeightsNotFound, match="antelopev2 has no official hub home"):
        resolve_weights("hub", cache_dir=tmp_path)


# ----------------------------------------------------------------------------- S3 (SeaweedFS)

EXTRAS = {  # what a synced hub snapshot also holds, and must not be downloaded
    "sdxl/sd_xl_base_1.0.safetensors": b"single-file twin",
    "sdxl/unet/diffusion_pytorch_model.fp16.safetensors": b"fp16 variant",
    "sdxl/unet/diffusion_pytorch_model.bin": b"pickle twin",
    "sdxl/unet/flax_model.msgpack": b"flax",
    "antelopev2/1k3d68.onnx": b"unused model",
}


@pytest.fixture(scope="module")
def s3_weights(s3_server, weights_dir):
    client = s3_server.client()
    client.create_bucket(Bucket="models")
    for path in sorted(p for p in weights_dir.rglob("*") if p.is_file()):
        client.upload_file(str(path), "models", f"instantid/v1/{path.relative_to(weights_dir).as_posix()}")
    for key, data in EXTRAS.items():
        client.put_object(Bucket="models", Key=f"instantid/v1/{key}", Body=data)
    return "s3://models/instantid/v1"


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


def files_under(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
            and not p.name.endswith(".lock")}


def component_files(root: Path) -> dict[str, int]:
    """The files of the components resolve_weights fetches (extra ControlNets and
    annotators are fetched when first needed)."""
    return {path: size for path, size in files_under(root).items()
            if path.split("/")[0] in ("sdxl", "instantid", "antelopev2")}


def test_s3_prefix_is_downloaded_once_into_the_cache(s3_weights, s3_env, weights_dir, tmp_path):
    paths = resolve_weights(s3_weights, cache_dir=tmp_path)
    cached = tmp_path / "s3" / "models" / "instantid" / "v1"
    assert paths.sdxl == cached / "sdxl" and paths.antelopev2 == cached / "antelopev2"
    assert files_under(cached) == component_files(weights_dir)  # exactly the needed files, nothing extra
    stamp = {p: p.stat().st_mtime_ns for p in cached.rglob("*") if p.is_file()}
    resolve_weights(s3_weights, cache_dir=tmp_path)
    assert stamp == {p: p.stat().st_mtime_ns for p in cached.rglob("*") if p.is_file()}  # not fetched again
    # a cached file with the wrong size (an interrupted copy) is fetched again
    broken = cached / "instantid" / "ip-adapter.bin"
    broken.write_bytes(b"partial")
    resolve_weights(s3_weights, cache_dir=tmp_path)
    assert broken.read_bytes() == (weights_dir / "instantid" / "ip-adapter.bin").read_bytes()


def _resolve_in_child(root: str, cache: str, queue) -> None:
    try:
        paths = resolve_weights(root, cache_dir=cache)
        queue.put(str(paths.ip_adapter))
    except Exception as error:  # report, do not hang the parent
        queue.put(f"error: {error!r}")


def test_several_processes_on_one_node_share_one_download(s3_weights, s3_env, weights_dir, tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_resolve_in_child, args=(s3_weights, str(tmp_path), queue)) for _ in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert all(not r.startswith("error") for r in results), results
    cached = tmp_path / "s3" / "models" / "instantid" / "v1"
    assert files_under(cached) == component_files(weights_dir)
    assert not [p for p in cached.rglob("*.partial-*")]


def test_missing_s3_object_is_named(s3_server, s3_env, weights_dir, tmp_path):
    client = s3_server.client()
    client.create_bucket(Bucket="partial")
    for path in sorted(p for p in weights_dir.rglob("*") if p.is_file() and p.name != "glintr100.onnx"):
        client.upload_file(str(path), "partial", f"w/{path.relative_to(weights_dir).as_posix()}")
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights("s3://partial/w", cache_dir=tmp_path)
    assert "antelopev2/glintr100.onnx" in str(info.value) and "s3://partial/w/antelopev2" in str(info.value)


def test_wrong_credentials_are_reported_not_raised_raw(s3_weights, s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(WeightsNotFound, match="listing failed"):
        resolve_weights(s3_weights, cache_dir=tmp_path)
    assert not os.listdir(tmp_path) or not list(tmp_path.rglob("*.safetensors"))


def test_a_changed_object_of_the_same_size_is_fetched_again(s3_server, s3_env, tmp_path):
    """The cache compares content (the object's ETag, recorded at download), not only sizes."""
    client = s3_server.client()
    client.create_bucket(Bucket="changing")
    recogniser = "faces/glintr100.onnx"
    for key, body in (("faces/scrfd_10g_bnkps.onnx", b"d" * 300), (recogniser, b"A" * 1000)):
        client.put_object(Bucket="changing", Key=key, Body=body)
    paths = resolve_weights(antelopev2="s3://changing/faces", components=("antelopev2",), cache_dir=tmp_path)
    cached = paths.antelopev2 / "glintr100.onnx"
    assert cached.read_bytes() == b"A" * 1000
    detector = paths.antelopev2 / "scrfd_10g_bnkps.onnx"
    stamp = detector.stat().st_mtime_ns
    client.put_object(Bucket="changing", Key=recogniser, Body=b"B" * 1000)  # same size, other bytes
    again = resolve_weights(antelopev2="s3://changing/faces", components=("antelopev2",), cache_dir=tmp_path)
    assert again.antelopev2 == paths.antelopev2 and cached.read_bytes() == b"B" * 1000
    assert detector.stat().st_mtime_ns == stamp  # an unchanged object is not fetched again
    # the cached tree holds the files only (the ETags are kept beside it)
    assert files_under(tmp_path / "s3") == {"changing/faces/glintr100.onnx": 1000,
                                            "changing/faces/scrfd_10g_bnkps.onnx": 300}


def test_extra_controlnets_and_annotators_come_from_an_s3_root_when_first_needed(s3_weights, s3_env, weights_dir,
                                                                                 tmp_path):
    """Only the ControlNet asked for is downloaded (into the cache, as the components are),
    and a pipeline's extra ControlNet loads from there."""
    import torch

    from pipeline.controlnets import Annotators, ExtraControlNets, available_annotators, available_controlnets

    paths = resolve_weights(s3_weights, cache_dir=tmp_path)
    extras = paths.extras
    assert available_controlnets(extras) == ["canny", "depth", "pose"]
    assert available_annotators(extras) == ["canny", "depth", "pose"]
    cached = tmp_path / "s3" / "models" / "instantid" / "v1"
    assert not (cached / "controlnets").exists()  # nothing fetched by resolving or listing
    net = ExtraControlNets(extras, "cpu", torch.float32, 96).get("canny")  # the fixture UNet's width
    assert files_under(cached / "controlnets") == {
        path: size for path, size in files_under(weights_dir / "controlnets").items() if path.startswith("canny/")}
    assert next(net.parameters()).dtype == torch.float32
    assert extras.folder("controlnets", "sketch") is None
    annotators = Annotators(extras, "cpu", torch.float32)
    depth, pose = annotators.depth(face_photo()), annotators.pose(face_photo())
    assert depth.size == pose.size == (256, 256) and (cached / "annotators" / "depth" / "model.safetensors").is_file()
    assert (cached / "annotators" / "openpose" / "body_pose_model.pth").is_file()
    assert ExtraWeights("hub").names("controlnets") == [] and ExtraWeights(None).folder("controlnets", "x") is None
