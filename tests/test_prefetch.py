"""Reading weight files ahead of the loader: every byte read, in load order, stoppable, and
a pipeline loaded with it holds exactly the tensors a plain diffusers load holds."""

from __future__ import annotations

import pytest
import torch

from pipeline.prefetch import Prefetcher, model_files, prefetching


def test_the_files_read_ahead_are_those_diffusers_loads_in_the_order_asked(tmp_path):
    pipeline = tmp_path / "sdxl"
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        (pipeline / name).mkdir(parents=True)
        (pipeline / name / "config.json").write_text("{}")
    for name in ("unet", "vae"):  # the loaded file, beside another variant and another framework's
        for file in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.msgpack"):
            (pipeline / name / file).write_bytes(b"w")
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (pipeline / "text_encoder" / shard).write_bytes(b"w")
    (pipeline / "sd_xl_base_1.0.safetensors").write_bytes(b"a single-file checkpoint beside the folders")
    only_bin = tmp_path / "ControlNetModel"
    only_bin.mkdir()
    (only_bin / "diffusion_pytorch_model.bin").write_bytes(b"w")
    (only_bin / "diffusion_pytorch_model.fp16.bin").write_bytes(b"w")
    assert model_files(pipeline, ["text_encoder", "tokenizer", "unet", "vae"]) == [
        pipeline / "text_encoder" / "model-00001-of-00002.safetensors",
        pipeline / "text_encoder" / "model-00002-of-00002.safetensors",
        pipeline / "unet" / "diffusion_pytorch_model.safetensors",
        pipeline / "vae" / "diffusion_pytorch_model.safetensors"]
    assert model_files(only_bin) == [only_bin / "diffusion_pytorch_model.bin"]


def test_the_prefetcher_reads_every_byte_and_stops_when_told(tmp_path):
    sizes = [0, 1, 8 * 1024 * 1024 + 3, 100]
    files = []
    for k, size in enumerate(sizes):
        path = tmp_path / f"{k}.safetensors"
        path.write_bytes(b"x" * size)
        files.append(path)
    done = Prefetcher(files + [tmp_path / "missing.bin"]).start()  # a file it cannot read is skipped
    done._thread.join()
    assert done.bytes_read == sum(sizes)

    stopped = Prefetcher(files * 50)
    stopped._stop.set()  # told to stop before it starts: it reads nothing more
    stopped.start().stop()
    assert stopped.bytes_read == 0 and not stopped._thread.is_alive()
    with prefetching(files) as running:
        assert isinstance(running, Prefetcher)
    assert running.bytes_read == sum(sizes)  # the body succeeded: every byte is read before it returns
    with pytest.raises(RuntimeError, match="the load failed"):
        with prefetching(files * 50) as failing:
            raise RuntimeError("the load failed")
    assert not failing._thread.is_alive()  # stopped with the failed body
    with prefetching(files, enabled=False) as nothing:
        assert nothing is None


def test_a_prefetched_load_holds_exactly_the_tensors_of_a_plain_diffusers_load(weights_dir):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from pipeline.adapter import cross_attention_layers, load_image_proj, read_adapter_file
    from pipeline.pipeline import InstantIDPipeline

    ours = InstantIDPipeline.from_weights(weights_dir, device="cpu", dtype="fp32", load_face=False, prefetch=True)
    controlnet = ControlNetModel.from_pretrained(str(weights_dir / "instantid" / "ControlNetModel"))
    plain = StableDiffusionXLControlNetPipeline.from_pretrained(str(weights_dir / "sdxl"), controlnet=controlnet,
                                                                add_watermarker=False)
    compared = 0
    for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2"):
        mine = getattr(ours.sdxl, name).state_dict()
        for key, tensor in getattr(plain, name).state_dict().items():
            assert mine[key].dtype == tensor.dtype and torch.equal(mine[key], tensor), f"{name}.{key}"
            compared += 1
    adapter = read_adapter_file(weights_dir / "instantid" / "ip-adapter.bin")
    for key, tensor in load_image_proj(adapter["image_proj"]).state_dict().items():  # the published Resampler
        assert torch.equal(ours.image_proj.state_dict()[key], tensor.float()), key
    processors = ours.sdxl.unet.attn_processors
    for position, name, _ in cross_attention_layers(ours.sdxl.unet):  # the published index of each layer
        for part in ("to_k_ip", "to_v_ip"):
            published = adapter["ip_adapter"][f"{position}.{part}.weight"].float()
            assert torch.equal(getattr(processors[name], part).weight, published), f"{position}.{part}"
            compared += 1
    assert compared > 100


def test_waiting_for_files_returns_once_they_are_read_or_the_thread_ended(tmp_path):
    files = []
    for k, size in enumerate([3 * 1024 * 1024, 5, 2 * 1024 * 1024]):
        path = tmp_path / f"{k}.safetensors"
        path.write_bytes(b"y" * size)
        files.append(path)
    ahead = Prefetcher(files).start()
    ahead.wait_for(files[:2])
    assert ahead.bytes_read >= 3 * 1024 * 1024 + 5  # both read to their ends
    ahead.wait_for([tmp_path / "not-given.bin"])  # not one of its files: returns when the thread is done
    assert ahead.bytes_read == 5 * 1024 * 1024 + 5 and not ahead._thread.is_alive()
    stopped = Prefetcher(files * 50)
    stopped._stop.set()
    stopped.start()
    stopped.wait_for(files)  # stopped before reading: waiters are not left hanging
    assert stopped.bytes_read == 0


def test_each_model_loads_after_its_files_were_read_ahead_in_load_order(weights_dir, monkeypatch):
    from pipeline import prefetch
    from pipeline.assembly import load_sdxl_parts
    from pipeline.weights import resolve_weights

    waited, given = [], []

    class Watched(prefetch.Prefetcher):
        def wait_for(self, files):
            super().wait_for(files)
            given[:] = self.files
            for path in files:  # every byte up to the model's last file is read when it loads
                assert self.bytes_read >= sum(f.stat().st_size for f in self.files[:self.files.index(path) + 1])
            waited.extend(files)

    monkeypatch.setattr(prefetch, "Prefetcher", Watched)
    paths = resolve_weights(weights_dir)
    load_sdxl_parts(paths, torch.float32, torch.device("cpu"))
    sdxl = paths.sdxl
    assert waited == given == [*model_files(paths.controlnet), *model_files(sdxl / "text_encoder"),
                               *model_files(sdxl / "text_encoder_2"), *model_files(sdxl / "unet"),
                               *model_files(sdxl / "vae"), paths.ip_adapter]
