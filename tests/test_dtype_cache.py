"""Model folders and the ip-adapter kept converted to the dtype they are loaded in, once per
node: the same values a conversion while loading makes, made once (also by processes
starting together), remade when the source changes, and never in the way of loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.adapter import AdapterWeightsError, read_adapter_file
from pipeline.dtype_cache import adapter_in_dtype, header_dtypes, in_dtype


def model_folder(root: Path, dtype=torch.float16) -> Path:
    folder = root / "unet"
    (folder / "sub").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(64, 48, generator=generator).to(dtype),
               "b": torch.randn(7, generator=generator).to(dtype), "steps": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    save_file({"x": torch.randn(3, 3, generator=generator).to(dtype)}, str(folder / "sub" / "part.safetensors"))
    (folder / "config.json").write_text('{"a": 1}')
    return folder


@pytest.mark.parametrize("source, target", [(torch.float16, torch.bfloat16), (torch.float32, torch.float16),
                                            (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_folder_in_another_dtype_is_mirrored_converted_once(tmp_path, source, target):
    folder = model_folder(tmp_path / "weights", source)
    cache = tmp_path / "cache"
    mirror = in_dtype(folder, target, cache)
    assert mirror != folder and mirror.is_relative_to(cache)
    for name in ("diffusion_pytorch_model.safetensors", "sub/part.safetensors"):
        original, converted = load_file(str(folder / name)), load_file(str(mirror / name))
        assert set(converted) == set(original)
        for key, tensor in original.items():
            expected = tensor.to(target) if tensor.is_floating_point() else tensor
            assert converted[key].dtype == expected.dtype and torch.equal(converted[key], expected), key
    assert (mirror / "config.json").read_text() == '{"a": 1}'
    assert (mirror / "config.json").stat().st_ino == (folder / "config.json").stat().st_ino  # linked, not copied
    made = (mirror / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert in_dtype(folder, target, cache) == mirror  # found, not made again
    assert (mirror / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == made
    assert not [p for p in mirror.parent.iterdir() if ".partial" in p.name]


def test_a_folder_already_in_the_dtype_is_used_as_it_is(tmp_path):
    folder = model_folder(tmp_path / "weights", torch.bfloat16)
    assert in_dtype(folder, torch.bfloat16, tmp_path / "cache") == folder
    assert not (tmp_path / "cache").exists()
    assert header_dtypes(folder / "diffusion_pytorch_model.safetensors") == {"BF16", "I64"}


def test_a_changed_source_gets_a_new_mirror(tmp_path):
    folder = model_folder(tmp_path / "weights")
    first = in_dtype(folder, torch.bfloat16, tmp_path / "cache")
    save_file({"x": torch.ones(4, 4, dtype=torch.float16)}, str(folder / "sub" / "part.safetensors"))
    second = in_dtype(folder, torch.bfloat16, tmp_path / "cache")
    assert second != first and torch.equal(load_file(str(second / "sub" / "part.safetensors"))["x"],
                                           torch.ones(4, 4, dtype=torch.bfloat16))


def test_a_cache_that_cannot_be_written_leaves_loading_to_the_source(tmp_path):
    folder = model_folder(tmp_path / "weights")
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("not a folder")
    assert in_dtype(folder, torch.bfloat16, blocked) == folder


def test_processes_starting_together_convert_once(tmp_path):
    folder = model_folder(tmp_path / "weights")
    cache = tmp_path / "cache"
    code = ("import sys, torch; from pipeline.dtype_cache import in_dtype; "
            "print(in_dtype(sys.argv[1], torch.bfloat16, sys.argv[2]))")
    root = Path(__file__).resolve().parent.parent
    runs = [subprocess.Popen([sys.executable, "-c", code, str(folder), str(cache)], cwd=root, stdout=subprocess.PIPE,
                             text=True) for _ in range(3)]
    outputs = {run.communicate(timeout=300)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    [mirror] = outputs
    assert [p.name for p in (cache / "in-dtype").iterdir() if p.is_dir()] == [Path(mirror).name]


def test_a_pipeline_loaded_through_the_cache_holds_the_tensors_of_a_plain_load_in_that_dtype(weights_dir, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from pipeline.adapter import cross_attention_layers, load_image_proj
    from pipeline.pipeline import InstantIDPipeline

    cache = tmp_path / "cache"
    ours = InstantIDPipeline.from_weights(weights_dir, device="cpu", dtype="bf16", load_face=False, dtype_cache=cache)
    assert len([p for p in (cache / "in-dtype").iterdir() if p.is_dir()]) == 2  # the SDXL folder and IdentityNet
    assert [p.suffix for p in (cache / "in-dtype").glob("ip-adapter*") if p.suffix != ".lock"] == [".safetensors"]
    controlnet = ControlNetModel.from_pretrained(str(weights_dir / "instantid" / "ControlNetModel"),
                                                 torch_dtype=torch.bfloat16)
    plain = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(weights_dir / "sdxl"), controlnet=controlnet, torch_dtype=torch.bfloat16, add_watermarker=False)
    for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2"):
        mine = getattr(ours.sdxl, name).state_dict()
        for key, tensor in getattr(plain, name).state_dict().items():
            assert mine[key].dtype == tensor.dtype and torch.equal(mine[key], tensor), f"{name}.{key}"
    adapter = read_adapter_file(weights_dir / "instantid" / "ip-adapter.bin")
    for key, tensor in load_image_proj(adapter["image_proj"]).state_dict().items():
        assert torch.equal(ours.image_proj.state_dict()[key], tensor.to(torch.bfloat16)), f"image_proj.{key}"
    processors = ours.sdxl.unet.attn_processors
    for position, name, _ in cross_attention_layers(ours.sdxl.unet):
        for part in ("to_k_ip", "to_v_ip"):
            weight = getattr(processors[name], part).weight
            published = adapter["ip_adapter"][f"{position}.{part}.weight"]
            assert weight.dtype == torch.bfloat16 and torch.equal(weight, published.to(torch.bfloat16)), position


def adapter_file(path: Path, dtype=torch.float16, layers: int = 3) -> Path:
    """An ip-adapter file in the published groups (a zip-format torch pickle, as published)."""
    generator = torch.Generator().manual_seed(1)
    state = {"image_proj": {"latents": torch.randn(1, 4, 8, generator=generator).to(dtype),
                            "proj_in.weight": torch.randn(8, 6, generator=generator).to(dtype)},
             "ip_adapter": {f"{2 * k + 1}.to_{kv}_ip.weight": torch.randn(8, 8, generator=generator).to(dtype)
                            for k in range(layers) for kv in "kv"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("source, target", [(torch.float16, torch.bfloat16), (torch.float16, torch.float32),
                                            (torch.float32, torch.float16)])
def test_the_ip_adapter_in_another_dtype_is_kept_converted_as_safetensors_once(tmp_path, source, target):
    original = adapter_file(tmp_path / "weights" / "ip-adapter.bin", source)
    cache = tmp_path / "cache"
    copy = adapter_in_dtype(original, target, cache)
    assert copy.suffix == ".safetensors" and copy.is_relative_to(cache)
    published, converted = read_adapter_file(original), read_adapter_file(copy)
    for group in ("image_proj", "ip_adapter"):
        assert set(converted[group]) == set(published[group])
        for key, tensor in published[group].items():
            assert converted[group][key].dtype == target and torch.equal(converted[group][key], tensor.to(target))
    made = copy.stat().st_mtime_ns
    assert adapter_in_dtype(original, target, cache) == copy and copy.stat().st_mtime_ns == made  # not made again
    assert adapter_in_dtype(original, source, cache) == original  # already in that dtype: the file itself
    adapter_file(original, source, layers=4)  # a new file in its place gets its own copy
    assert len(read_adapter_file(adapter_in_dtype(original, target, cache))["ip_adapter"]) == 8


def test_an_unreadable_ip_adapter_is_left_to_the_loader_to_name(tmp_path):
    broken = tmp_path / "ip-adapter.bin"
    broken.write_bytes(b"not a pickle")
    assert adapter_in_dtype(broken, torch.bfloat16, tmp_path / "cache") == broken
    with pytest.raises(AdapterWeightsError, match="ip-adapter.bin: not a loadable weights file"):
        read_adapter_file(broken)


def test_adapter_layers_take_tensors_in_their_dtype_without_a_copy_and_convert_others(tmp_path):
    from pipeline.adapter import IdentityAttnProcessor, load_adapter_layers

    state = read_adapter_file(adapter_file(tmp_path / "ip-adapter.bin", torch.bfloat16, layers=1))["ip_adapter"]
    same, other = IdentityAttnProcessor(8, 8, 4, dtype=torch.bfloat16), IdentityAttnProcessor(8, 8, 4)
    load_adapter_layers({"1": same}, state)
    load_adapter_layers({"1": other}, state)
    assert same.to_k_ip.weight.data_ptr() == state["1.to_k_ip.weight"].data_ptr()  # the mapped tensor itself
    assert other.to_k_ip.weight.dtype == torch.float32 and other.to_k_ip.weight.data_ptr() != \
        state["1.to_k_ip.weight"].data_ptr()
    assert torch.equal(other.to_v_ip.weight, state["1.to_v_ip.weight"].float())
    assert not same.to_k_ip.weight.requires_grad and not other.to_v_ip.weight.requires_grad
