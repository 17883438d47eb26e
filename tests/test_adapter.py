import json
import math
import pickle

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from pipeline.adapter import (
    AdapterWeightsError,
    AttnProcessor,
    FaceRegionMask,
    IdentityAttnProcessor,
    ResamplerConfig,
    adapter_key_layout,
    image_proj_to_published,
    install_adapter_processors,
    load_adapter_layers,
    load_image_proj,
    read_adapter_file,
    token_grids,
)
from tests.conftest import DATA

LAYOUT = json.loads((DATA / "ip_adapter_layout.json").read_text())
PUBLISHED_RESAMPLER = ResamplerConfig(
    embed_dims=512, hidden_dims=1280, output_dims=2048, depth=4, heads=20, num_queries=16, ffn_ratio=4
)


@pytest.fixture(scope="module")
def meta_unet():
    """The published SDXL base UNet, built on the meta device: no memory is used."""
    config = json.loads((DATA / "sdxl_unet_config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert next(unet.parameters()).is_meta
    return unet


def test_published_sdxl_unet_takes_exactly_the_published_ip_adapter_keys(meta_unet):
    assert list(meta_unet.attn_processors) == LAYOUT["attn_processor_order"]
    adapters = install_adapter_processors(meta_unet, num_tokens=16)
    layout = adapter_key_layout(adapters)
    assert layout == {k: tuple(v) for k, v in LAYOUT["ip_adapter"].items()}
    assert sorted(int(k) for k in adapters) == list(range(1, 140, 2))  # the odd positions 1..139
    # and loading tensors of those names and shapes works (on meta: no memory)
    state = {k: torch.empty(v, device="meta") for k, v in LAYOUT["ip_adapter"].items()}
    load_adapter_layers(adapters, state)
    assert all(isinstance(p, (AttnProcessor, IdentityAttnProcessor)) for p in meta_unet.attn_processors.values())


def test_published_resampler_takes_exactly_the_published_image_proj_keys():
    with torch.device("meta"):
        module = PUBLISHED_RESAMPLER.build()
    published = image_proj_to_published(module.state_dict(), depth=4)
    assert {k: tuple(v.shape) for k, v in published.items()} == {k: tuple(v) for k, v in LAYOUT["image_proj"].items()}
    # the loader infers the whole configuration from the published tensors
    state = {k: torch.empty(v, device="meta") for k, v in LAYOUT["image_proj"].items()}
    assert ResamplerConfig.from_state_dict(state) == PUBLISHED_RESAMPLER
    loaded = load_image_proj(state)
    assert loaded.latents.shape == (1, 16, 1280)


def reference_resampler(state: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The published Resampler written out from its formula, on the published names."""
    ln = lambda t, p: torch.nn.functional.layer_norm(t, t.shape[-1:], state[p + ".weight"], state[p + ".bias"])  # noqa
    latents = state["latents"].repeat(x.shape[0], 1, 1)
    x = x @ state["proj_in.weight"].T + state["proj_in.bias"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    for i in range(depth):
        p = f"layers.{i}"
        xn, ln_latents = ln(x, f"{p}.0.norm1"), ln(latents, f"{p}.0.norm2")
        q = ln_latents @ state[f"{p}.0.to_q.weight"].T
        k, v = (torch.cat([xn, ln_latents], dim=1) @ state[f"{p}.0.to_kv.weight"].T).chunk(2, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weights = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(latents.shape)
        latents = out @ state[f"{p}.0.to_out.weight"].T + latents
        hidden = ln(latents, f"{p}.1.0") @ state[f"{p}.1.1.weight"].T
        latents = torch.nn.functional.gelu(hidden) @ state[f"{p}.1.3.weight"].T + latents
    out = latents @ state["proj_out.weight"].T + state["proj_out.bias"]
    return ln(out, "norm_out")


def test_resampler_equals_the_published_formula():
    torch.manual_seed(0)
    config = ResamplerConfig(embed_dims=512, hidden_dims=128, output_dims=64, depth=2, heads=2, num_queries=16,
                             ffn_ratio=4)
    source = config.build()
    with torch.no_grad():  # non-trivial norms
        for name, param in source.named_parameters():
            if "ln" in name or "norm" in name or name.endswith("ff.0.weight") or name.endswith("ff.0.bias"):
                param.add_(torch.randn_like(param) * 0.1)
    published = image_proj_to_published(source.state_dict(), depth=2)
    module = load_image_proj(published)
    x = torch.randn(3, 1, 512) * 20
    with torch.no_grad():
        assert torch.allclose(module(x), reference_resampler(published, x, heads=2), atol=1e-5)


def make_attention():
    torch.manual_seed(1)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=8)
    processor = IdentityAttnProcessor(hidden_size=16, cross_attention_dim=16, num_tokens=4)
    torch.nn.init.normal_(processor.to_k_ip.weight)
    torch.nn.init.normal_(processor.to_v_ip.weight)
    return attn, processor


def formula(attn, processor, hidden, text, face, scale):
    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)

    def attend(q, k, v):
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
        return (weights @ v).transpose(1, 2).reshape(q.shape[0], -1, 16)

    q = heads(attn.to_q(hidden))
    text_out = attend(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
    face_out = attend(q, heads(processor.to_k_ip(face)), heads(processor.to_v_ip(face)))
    return attn.to_out[0](text_out + scale.view(-1, 1, 1) * face_out)


@torch.no_grad()
def test_decoupled_attention_equals_the_formula_with_one_scale_per_sample():
    attn, processor = make_attention()
    hidden, text, face = torch.randn(3, 10, 32), torch.randn(3, 7, 16), torch.randn(3, 4, 16)
    scale = torch.tensor([0.0, 0.5, 1.3])
    out = processor(attn, hidden, torch.cat([text, face], dim=1), ip_adapter_scale=scale)
    assert torch.allclose(out, formula(attn, processor, hidden, text, face, scale), atol=1e-5)
    # per sample: each row equals that row computed alone with its own scale
    for row in range(3):
        alone = processor(attn, hidden[row : row + 1], torch.cat([text, face], dim=1)[row : row + 1],
                          ip_adapter_scale=float(scale[row]))
        assert torch.allclose(out[row : row + 1], alone, atol=1e-5)
    # scale 0 is plain text cross-attention
    plain = AttnProcessor2_0()(attn, hidden, text)
    assert torch.allclose(out[0], plain[0], atol=1e-5)


@torch.no_grad()
def test_face_mask_limits_face_attention_to_its_region():
    attn, processor = make_attention()
    hidden, ehs = torch.randn(1, 16, 32), torch.randn(1, 11, 16)  # 16 tokens = a 4x4 map
    pixels = torch.zeros(1, 1, 32, 32)
    pixels[..., :16, :] = 1.0  # top half
    mask = FaceRegionMask(pixels, [(8, 8), (4, 4), (2, 2)])
    masked = processor(attn, hidden, ehs, ip_adapter_scale=1.0, ip_adapter_mask=mask)
    full = processor(attn, hidden, ehs, ip_adapter_scale=1.0)
    none = processor(attn, hidden, ehs, ip_adapter_scale=0.0)
    assert torch.allclose(masked[:, :8], full[:, :8], atol=1e-6)
    assert torch.allclose(masked[:, 8:], none[:, 8:], atol=1e-6)
    with pytest.raises(ValueError, match="no token grid of 12 tokens"):
        processor(attn, torch.randn(1, 12, 32), torch.randn(1, 11, 16), ip_adapter_mask=mask)


def test_token_grids_follow_the_unets_downsampling():
    """SDXL's UNet (on the meta device, no memory): a stride-2 convolution with padding 1
    maps n to ceil(n / 2); the grids are those of the feature maps the UNet really makes."""
    config = json.loads((DATA / "sdxl_unet_config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert token_grids(unet, (33, 48)) == [(33, 48), (17, 24), (9, 12)]  # 264x384 pixels
    assert token_grids(unet, (128, 128)) == [(128, 128), (64, 64), (32, 32)]
    tiny = UNet2DConditionModel.from_config({**config, "block_out_channels": [32, 32, 32], "attention_head_dim": 2,
                                             "transformer_layers_per_block": 1, "cross_attention_dim": 8})
    sizes = []
    hook = tiny.down_blocks[2].register_forward_pre_hook(lambda module, args, kwargs: sizes.append(
        tuple(args[0].shape[-2:]) if args else tuple(kwargs["hidden_states"].shape[-2:])), with_kwargs=True)
    with torch.no_grad():
        tiny(torch.zeros(1, 4, 7, 9), 1, encoder_hidden_states=torch.zeros(1, 2, 8),
             added_cond_kwargs={"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)})
    hook.remove()
    assert sizes == [token_grids(tiny, (7, 9))[2]] == [(2, 3)]


def test_loader_names_missing_and_misshapen_keys(weights_dir):
    state = read_adapter_file(weights_dir / "instantid" / "ip-adapter.bin")
    broken = dict(state["image_proj"])
    del broken["layers.1.0.to_kv.weight"]
    with pytest.raises(AdapterWeightsError, match=r"layers\.1\.0\.to_kv\.weight"):
        load_image_proj(broken)
    wrong = dict(state["image_proj"], **{"proj_out.bias": torch.zeros(3)})
    with pytest.raises(AdapterWeightsError, match="proj_out.bias"):
        load_image_proj(wrong)
    config = json.loads((weights_dir / "sdxl" / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_config(config)
    adapters = install_adapter_processors(unet, num_tokens=16)
    layers = dict(state["ip_adapter"])
    first = sorted(layers)[0]
    del layers[first]
    with pytest.raises(AdapterWeightsError, match=first.replace(".", r"\.")):
        load_adapter_layers(adapters, layers)


def test_bin_and_safetensors_forms_load_the_same(weights_dir, tmp_path):
    from safetensors.torch import save_file

    state = read_adapter_file(weights_dir / "instantid" / "ip-adapter.bin")
    flat = {f"{group}.{k}": v.contiguous() for group in state for k, v in state[group].items()}
    save_file(flat, str(tmp_path / "ip-adapter.safetensors"))
    again = read_adapter_file(tmp_path / "ip-adapter.safetensors")
    for group in state:
        assert state[group].keys() == again[group].keys()
        assert all(torch.equal(state[group][k], again[group][k]) for k in state[group])


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran while loading weights",))


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "ip-adapter.bin"
    with open(path, "wb") as f:
        pickle.dump({"image_proj": _Exploit(), "ip_adapter": {}}, f)
    with pytest.raises(AdapterWeightsError, match="not a loadable weights file"):
        read_adapter_file(path)
