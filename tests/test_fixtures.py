import hashlib
import json

import numpy as np
import onnxruntime
import pytest
import torch

from pipeline.fixtures import write_fixtures
from tests.conftest import DATA

LAYOUT = [
    "sdxl/model_index.json",
    "sdxl/scheduler/scheduler_config.json",
    "sdxl/unet/config.json",
    "sdxl/unet/diffusion_pytorch_model.safetensors",
    "sdxl/vae/config.json",
    "sdxl/vae/diffusion_pytorch_model.safetensors",
    "sdxl/text_encoder/config.json",
    "sdxl/text_encoder/model.safetensors",
    "sdxl/text_encoder_2/config.json",
    "sdxl/text_encoder_2/model.safetensors",
    "sdxl/tokenizer/vocab.json",
    "sdxl/tokenizer/merges.txt",
    "sdxl/tokenizer_2/vocab.json",
    "sdxl/tokenizer_2/merges.txt",
    "instantid/ControlNetModel/config.json",
    "instantid/ControlNetModel/diffusion_pytorch_model.safetensors",
    "instantid/ip-adapter.bin",
    "antelopev2/scrfd_10g_bnkps.onnx",
    "antelopev2/glintr100.onnx",
    *(f"controlnets/{name}/{file}" for name in ("pose", "canny", "depth")
      for file in ("config.json", "diffusion_pytorch_model.safetensors")),
    "annotators/depth/config.json",
    "annotators/depth/model.safetensors",
    "annotators/depth/preprocessor_config.json",
    "annotators/openpose/body_pose_model.pth",
]


def test_layout_is_the_published_one(weights_dir):
    for relative in LAYOUT:
        assert (weights_dir / relative).is_file(), relative
    index = json.loads((weights_dir / "sdxl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    unet = json.loads((weights_dir / "sdxl" / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    total = sum(p.stat().st_size for p in weights_dir.rglob("*") if p.is_file())
    assert total < 40 * 1024 * 1024  # tiny (three extra ControlNets of IdentityNet's topology among them)


def test_ip_adapter_uses_the_published_key_scheme(weights_dir):
    state = torch.load(weights_dir / "instantid" / "ip-adapter.bin", weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert "latents" in state["image_proj"] and "layers.3.0.to_kv.weight" in state["image_proj"]
    assert state["image_proj"]["latents"].shape[1] == 16
    indices = sorted({int(k.split(".")[0]) for k in state["ip_adapter"]})
    assert all(i % 2 == 1 for i in indices)  # cross-attention processors are at odd positions
    assert all(k.endswith((".to_k_ip.weight", ".to_v_ip.weight")) for k in state["ip_adapter"])


def test_models_follow_the_sdxl_topology_at_tiny_widths(weights_dir):
    """The published SDXL UNet's levels, block types, blocks per level and rising transformer
    depths; IdentityNet made from that UNet (nine down residuals, as SDXL's); a four-level
    VAE; an adapter with one face K/V pair per cross-attention layer of this UNet."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from pipeline.adapter import cross_attention_layers

    published = json.loads((DATA / "sdxl_unet_config.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(weights_dir / "sdxl" / "unet")
    for key in ("down_block_types", "up_block_types", "layers_per_block", "mid_block_type", "addition_embed_type",
                "use_linear_projection"):
        assert unet.config[key] == published[key] or list(unet.config[key]) == published[key], key
    depths = list(unet.config.transformer_layers_per_block)
    assert len(depths) == 3 and depths[1] < depths[2] and max(unet.config.block_out_channels) <= 64
    assert unet.mid_block.attentions[0].transformer_blocks.__len__() == depths[-1]  # as deep as the last level
    controlnet = ControlNetModel.from_pretrained(weights_dir / "instantid" / "ControlNetModel")
    assert len(controlnet.controlnet_down_blocks) == 9
    assert list(controlnet.config.down_block_types) == published["down_block_types"]
    assert list(controlnet.config.transformer_layers_per_block) == depths
    vae = AutoencoderKL.from_pretrained(weights_dir / "sdxl" / "vae")
    assert len(vae.config.down_block_types) == len(vae.config.up_block_types) == 4
    state = torch.load(weights_dir / "instantid" / "ip-adapter.bin", weights_only=True)["ip_adapter"]
    positions = [position for position, _, _ in cross_attention_layers(unet)]
    # two transformers per down level, one in the mid block, three per up level (levels 1 and 2)
    assert len(positions) == 2 * depths[1] + 2 * depths[2] + depths[2] + 3 * depths[2] + 3 * depths[1]
    assert set(state) == {f"{p}.{kind}.weight" for p in positions for kind in ("to_k_ip", "to_v_ip")}


def test_face_models_have_the_signatures_insightface_routes_on(weights_dir):
    from insightface.model_zoo import model_zoo

    providers = ["CPUExecutionProvider"]
    detector = model_zoo.get_model(str(weights_dir / "antelopev2" / "scrfd_10g_bnkps.onnx"), providers=providers)
    recognizer = model_zoo.get_model(str(weights_dir / "antelopev2" / "glintr100.onnx"), providers=providers)
    assert detector.taskname == "detection" and detector.use_kps and detector.fmc == 3
    assert recognizer.taskname == "recognition" and recognizer.input_size == (112, 112)
    session = onnxruntime.InferenceSession(str(weights_dir / "antelopev2" / "glintr100.onnx"), providers=providers)
    out = session.run(None, {"input.1": np.random.default_rng(0).standard_normal((2, 3, 112, 112), np.float32)})[0]
    assert out.shape == (2, 512) and not np.allclose(out[0], out[1])


def test_same_call_writes_the_same_bytes(tmp_path):
    def digests(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    first, second = write_fixtures(tmp_path / "a"), write_fixtures(tmp_path / "b")
    assert digests(first) == digests(second)


@pytest.mark.parametrize("text", ["a watercolor portrait of a woman", "", "neon " * 100])
def test_tokenizers_built_offline_work(weights_dir, text):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(weights_dir / "sdxl" / "tokenizer")
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
