"""SDXL given as ONE .safetensors checkpoint in the original Stability (SGM) key layout, as
fine-tunes are published: the fixture SDXL is exported to that layout and loaded through
``InstantIDPipeline.from_weights``; it must be the very same model as the diffusers folder."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import SINGLE_FILE_FIXTURE, main
from pipeline.errors import InvalidWeights
from pipeline.fixtures import SGM_PREFIXES, sgm_unet_state, sgm_vae_state, write_sdxl_single_file
from pipeline.pipeline import SDXL_MODELS, InstantIDPipeline
from tests.conftest import pixels

SMALL = dict(width=64, height=64, num_inference_steps=2)


@pytest.fixture(scope="module")
def checkpoint(weights_dir, tmp_path_factory):
    return write_sdxl_single_file(weights_dir / "sdxl", tmp_path_factory.mktemp("single") / "sdxl_fixture.safetensors")


def weights_root(base, checkpoint, weights_dir):
    """A weights root whose sdxl/ is only the checkpoint; the rest links to the fixture root."""
    (base / "sdxl").mkdir(parents=True)
    shutil.copyfile(checkpoint, base / "sdxl" / checkpoint.name)
    for name in ("instantid", "antelopev2"):
        (base / name).symlink_to(weights_dir / name, target_is_directory=True)
    return base


@pytest.fixture(scope="module")
def single(weights_dir, checkpoint, tmp_path_factory):
    root = weights_root(tmp_path_factory.mktemp("root"), checkpoint, weights_dir)
    return InstantIDPipeline.from_weights(root, sdxl_config=str(weights_dir / "sdxl"))


@pytest.fixture(scope="module")
def configs_only(weights_dir, tmp_path_factory):
    """The diffusers folder without any weights: what the hub default gives (configs and
    tokenizers), so that nothing can be loaded from the folder's weight files."""
    target = tmp_path_factory.mktemp("configs") / "sdxl"
    shutil.copytree(weights_dir / "sdxl", target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


def assert_same_models(a, b) -> None:
    for component in SDXL_MODELS:
        left, right = getattr(a, component).state_dict(), getattr(b, component).state_dict()
        assert left.keys() == right.keys(), component
        for key, tensor in left.items():
            assert not right[key].is_meta, f"{component}.{key} was not loaded"
            assert tensor.dtype == right[key].dtype, f"{component}.{key}"
            same = torch.equal(tensor, right[key])
            assert same, f"{component}.{key} differs"


def test_checkpoint_is_an_original_sdxl_checkpoint(weights_dir, checkpoint):
    from diffusers.loaders.single_file_utils import (
        infer_diffusers_model_type,
        is_clip_sdxl_model,
        is_open_clip_sdxl_model,
    )

    state = load_file(str(checkpoint))
    assert infer_diffusers_model_type(state) == "xl_base"
    assert is_clip_sdxl_model(state) and is_open_clip_sdxl_model(state)
    by_prefix = {c: {k[len(p):]: v for k, v in state.items() if k.startswith(p)} for c, p in SGM_PREFIXES.items()}
    assert sum(map(len, by_prefix.values())) == len(state)  # nothing outside the four models
    for component, tensors in by_prefix.items():  # every value of the folder, nothing more
        folder = weights_dir / "sdxl" / component
        original = load_file(str(next(folder.glob("*.safetensors"))))
        assert sum(t.numel() for t in tensors.values()) == sum(t.numel() for t in original.values()), component
    unet, vae, clip_l, open_clip = (by_prefix[c] for c in SDXL_MODELS)
    assert not any(word in key for key in unet for word in ("down_blocks", "up_blocks", "resnets", "attentions"))
    assert "input_blocks.0.0.weight" in unet and "label_emb.0.0.weight" in unet and "out.2.bias" in unet
    assert vae["decoder.mid.attn_1.q.weight"].ndim == 4 and "encoder.down.0.block.0.conv1.weight" in vae
    assert all(key.startswith("text_model.") for key in clip_l)
    config = json.loads((weights_dir / "sdxl" / "text_encoder_2" / "config.json").read_text())
    width, layers = config["hidden_size"], config["num_hidden_layers"]
    assert open_clip["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert open_clip["text_projection"].shape == (width, config["projection_dim"])
    assert {k.split(".")[2] for k in open_clip if k.startswith("transformer.resblocks.")} == {str(i) for i in range(layers)}


def test_every_tensor_equals_the_diffusers_folder(pipe, single):
    assert_same_models(pipe.sdxl, single.sdxl)


def in_fresh_memory(pipeline: InstantIDPipeline) -> InstantIDPipeline:
    """Every SDXL weight copied, values unchanged, to freshly allocated memory. CPU kernels
    may round differently depending on where a tensor's data starts, and weights read in
    place from the folder's safetensors files start elsewhere than converted ones: copying
    the folder pipeline's own text_encoder_2 this way moves one pixel of seed 7 by 1."""
    with torch.no_grad():
        for component in SDXL_MODELS:
            model = getattr(pipeline.sdxl, component)
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
    return pipeline


@pytest.mark.parametrize("seed", [7, 11])
def test_same_seed_same_pixels(weights_dir, single, face, seed):
    folder = in_fresh_memory(InstantIDPipeline.from_weights(weights_dir, load_face=False))
    single = in_fresh_memory(single)
    expected = folder(face, "a watercolor portrait", seed=seed, **SMALL).images[0]
    got = single(face, "a watercolor portrait", seed=seed, **SMALL).images[0]
    assert np.array_equal(pixels(expected), pixels(got))


def test_configs_alone_suffice(pipe, weights_dir, checkpoint, configs_only, tmp_path):
    """No weight comes from the config folder: it has none."""
    root = weights_root(tmp_path, checkpoint, weights_dir)
    loaded = InstantIDPipeline.from_weights(root, sdxl_config=str(configs_only), load_face=False)
    assert_same_models(pipe.sdxl, loaded.sdxl)


def test_export_writes_the_same_bytes(weights_dir, checkpoint, tmp_path):
    again = write_sdxl_single_file(weights_dir / "sdxl", tmp_path / "again.safetensors")
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(checkpoint.read_bytes()).digest()


def test_cli_writes_the_single_file(tmp_path, checkpoint, capsys):
    assert main(["fixtures", str(tmp_path / "w"), "--single-file"]) == 0
    assert json.loads(capsys.readouterr().out)["root"] == str(tmp_path / "w")
    written = tmp_path / "w" / SINGLE_FILE_FIXTURE
    assert sorted(p.name for p in written.parent.iterdir()) == [written.name]
    assert written.read_bytes() == checkpoint.read_bytes()  # fixtures are deterministic
    assert main(["fixtures", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / SINGLE_FILE_FIXTURE.parent).exists()


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor distinct, so that a swapped pair of names cannot go unnoticed."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


@pytest.mark.parametrize("shape", ["unet", "vae"])
def test_other_geometries_round_trip(shape, tmp_path):
    """Other levels, layers and block orders than the fixture SDXL (indices come from the
    config), and channel changes inside blocks (skip_connection / nin_shortcut)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    if shape == "unet":
        model = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64, 64, 32), layers_per_block=3,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4, 4, 2), transformer_layers_per_block=(2, 1, 3, 1), cross_attention_dim=24,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=32,
        )
        convert, cls = sgm_unet_state, UNet2DConditionModel
    else:
        model = AutoencoderKL(
            block_out_channels=(8, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8, latent_channels=4,
        )
        convert, cls = sgm_vae_state, AutoencoderKL
    model = _randomised(model)
    model.save_config(tmp_path / shape)
    state = {SGM_PREFIXES[shape] + k: v for k, v in convert(model.state_dict(), dict(model.config)).items()}
    loaded = cls.from_single_file(state, config=str(tmp_path), subfolder=shape)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


MISSING = {
    "unet": "model.diffusion_model.out.2.bias",
    "vae": "first_stage_model.decoder.mid.attn_1.q.weight",
    "clip_l": "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "open_clip_layer": "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight",
    "open_clip_marker": "conditioner.embedders.1.model.positional_embedding",  # no longer recognisable as SDXL
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("missing", sorted(MISSING))
def test_a_missing_tensor_is_one_clear_error(missing, weights_dir, checkpoint, tmp_path):
    state = load_file(str(checkpoint))
    del state[MISSING[missing]]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    root = weights_root(tmp_path / "root", broken, weights_dir)
    with pytest.raises(InvalidWeights, match=r"broken\.safetensors") as raised:
        InstantIDPipeline.from_weights(root, sdxl_config=str(weights_dir / "sdxl"), load_face=False)
    assert raised.value.code == "invalid_weights"
    if missing in ("clip_l", "open_clip_layer"):  # tensors diffusers leaves unloaded are named
        assert "lacks" in str(raised.value)
