import numpy as np
import pytest
import torch

from pipeline import get_pipeline
from pipeline.errors import InvalidParameter
from pipeline.params import MAX_SEED, GenerationParams
from pipeline.pipeline import Cancelled, InstantIDPipeline, RenderItem, RenderOptions, window_keeps
from pipeline.schedulers import SCHEDULERS
from tests.conftest import pixels

SMALL = dict(width=64, height=64, num_inference_steps=3)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def test_fp32_on_cpu_chosen_automatically(pipe):
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32


def test_same_seed_same_pixels_alone_or_in_a_batch(pipe, face):
    alone = pipe(face, "a portrait", seed=7, **SMALL).images[0]
    batch = pipe(face, "a portrait", seed=5, num_images=3, **SMALL)
    assert batch.seeds == [5, 6, 7]
    assert max_diff(alone, batch.images[2]) <= 1
    assert max_diff(batch.images[0], batch.images[1]) > 1  # different seeds, different images


def item(face, options, **overrides):
    from pipeline.keypoints import Frame

    frame = Frame(face.image_size, (options.width, options.height))
    values = dict(prompt="a portrait", negative_prompt=None, embedding=face.embedding,
                  kps=frame.points(np.asarray(face.kps)), seed=11)
    values.update(overrides)
    return RenderItem(**values)


def test_each_item_keeps_its_own_prompt_seed_and_scales_in_a_batch(pipe, face):
    options = RenderOptions(width=64, height=64, num_inference_steps=3)
    items = [
        item(face, options, prompt="a watercolor portrait", seed=1, ip_adapter_scale=0.0, guidance_scale=3.0),
        item(face, options, prompt="film noir", negative_prompt="color", seed=2, controlnet_conditioning_scale=0.2),
        item(face, options, prompt="", seed=3, ip_adapter_scale=1.3, guidance_scale=7.0),
    ]
    batched, _ = pipe.render(items, options)
    for k, single in enumerate(items):
        alone, _ = pipe.render([single], options)
        assert max_diff(alone[0], batched[k]) <= 1, k


class Recorder:
    """Counts and records calls of a module (IdentityNet or the UNet)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({"sample": args[0].detach().clone(), **{k: v for k, v in kwargs.items()
                                                                   if isinstance(v, torch.Tensor)}})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_identitynet_gets_face_tokens_only_and_cfg_uses_the_zero_embedding(pipe, face):
    with Recorder(pipe.sdxl.controlnet) as control, Recorder(pipe.sdxl.unet) as unet:
        pipe(face, "a portrait", seed=3, guidance_scale=5.0, **SMALL)
    with torch.no_grad():
        embedding = torch.from_numpy(face.embedding)[None, None]
        cond = pipe.image_proj(embedding)[0]
        uncond = pipe.image_proj(torch.zeros_like(embedding))[0]
    tokens = control.calls[0]["encoder_hidden_states"]
    assert tokens.shape == (2, pipe.num_face_tokens, pipe.sdxl.unet.config.cross_attention_dim)
    assert torch.allclose(tokens[0], uncond, atol=1e-5) and torch.allclose(tokens[1], cond, atol=1e-5)
    unet_tokens = unet.calls[0]["encoder_hidden_states"]
    assert unet_tokens.shape[1] == 77 + pipe.num_face_tokens  # text tokens, then face tokens
    assert torch.allclose(unet_tokens[0, 77:], uncond, atol=1e-5)
    assert torch.allclose(unet_tokens[1, 77:], cond, atol=1e-5)
    assert torch.count_nonzero(unet_tokens[0, :77]) == 0  # no negative prompt: zero text embedding (SDXL)
    assert torch.count_nonzero(unet_tokens[1, :77]) > 0


def test_without_cfg_there_is_no_unconditional_branch(pipe, face):
    with Recorder(pipe.sdxl.controlnet) as control:
        pipe(face, "a portrait", seed=3, guidance_scale=1.0, **SMALL)
    assert control.calls[0]["encoder_hidden_states"].shape[0] == 1


@pytest.mark.parametrize("start,end,expected", [(0.0, 1.0, 8), (0.25, 0.75, 4), (0.0, 0.5, 4), (0.5, 1.0, 4),
                                                (0.3, 0.4, 0)])
def test_identitynet_is_not_called_outside_its_window(pipe, face, start, end, expected):
    with Recorder(pipe.sdxl.controlnet) as control, Recorder(pipe.sdxl.unet) as unet:
        pipe(face, "x", seed=1, width=64, height=64, num_inference_steps=8,
             control_guidance_start=start, control_guidance_end=end)
    assert len(control.calls) == expected == sum(window_keeps(8, start, end))
    assert len(unet.calls) == 8


def test_zero_scales_make_the_face_irrelevant_and_nonzero_scales_matter(pipe, face):
    other = type(face)(face.bbox, face.kps, face.det_score, face.embedding[::-1].copy(), face.image_size)
    off = dict(ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0, seed=5, **SMALL)
    assert max_diff(pipe(face, "x", **off).images[0], pipe(other, "x", **off).images[0]) == 0
    base = pipe(face, "x", seed=5, **SMALL).images[0]
    assert max_diff(base, pipe(face, "x", seed=5, ip_adapter_scale=0.0, **SMALL).images[0]) > 1
    assert max_diff(base, pipe(face, "x", seed=5, controlnet_conditioning_scale=0.0, **SMALL).images[0]) > 1
    assert max_diff(base, pipe(face, "x", seed=5, enhance_face_region=True, **SMALL).images[0]) > 1


def test_empty_prompt_and_every_style(pipe, face):
    from pipeline.styles import style_names

    assert pipe(face, "", seed=1, **SMALL).images[0].size == (64, 64)
    images = [pipe(face, "a man", style=name, seed=1, **SMALL).images[0] for name in style_names()]
    assert len({pixels(i).tobytes() for i in images}) == len(images)
    with pytest.raises(InvalidParameter, match="style"):
        pipe(face, "x", style="Baroque", **SMALL)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs(pipe, face, scheduler):
    result = pipe(face, "a portrait", seed=2, scheduler=scheduler, width=64, height=64, num_inference_steps=2)
    array = pixels(result.images[0])
    assert array.shape == (64, 64, 3) and array.std() > 0


def test_sizes_explicit_and_by_the_reference_rule(pipe, face):
    assert face.image_size == (1024, 1024)
    spec = GenerationParams
    assert pipe.output_size(spec(), face) == (1024, 1024)
    assert pipe.output_size(spec(width=640, height=384), face) == (640, 384)
    assert pipe.output_size(spec(width=512), face) == (512, 512)
    result = pipe(face, "x", width=96, height=64, num_inference_steps=1, seed=0)
    assert result.images[0].size == (96, 64) and (result.width, result.height) == (96, 64)


def test_seeds_use_the_full_63_bit_range(pipe, face):
    result = pipe(face, "x", seed=MAX_SEED, num_images=2, width=64, height=64, num_inference_steps=1)
    assert result.seeds == [MAX_SEED, 0]
    random = GenerationParams(num_images=4).seeds()
    assert all(0 <= s <= MAX_SEED for s in random) and len(set(random)) == 4
    assert max(GenerationParams(num_images=8).seeds() + random) > 2**32  # not 16- or 32-bit seeds


@pytest.mark.parametrize(
    "params,field",
    [(dict(width=100), "width"), (dict(num_inference_steps=0), "num_inference_steps"),
     (dict(control_guidance_start=0.6, control_guidance_end=0.5), "control_guidance_end"),
     (dict(scheduler="heun"), "scheduler"), (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"),
     (dict(num_images=0), "num_images"), (dict(guidance_scale="lots"), "guidance_scale"), (dict(colour=1), "colour")],
)
def test_invalid_parameters_are_refused_before_any_work(pipe, face, params, field):
    with Recorder(pipe.sdxl.unet) as unet, pytest.raises(InvalidParameter) as info:
        pipe(face, "x", **params)
    assert not unet.calls
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_a_step_callback_reports_progress_and_can_cancel(pipe, face):
    seen = []
    pipe(face, "x", seed=1, on_step=lambda i, n: seen.append((i, n)), **SMALL)
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def cancel(i, n):
        if i == 1:
            raise Cancelled("stopped by the user")

    with pytest.raises(Cancelled):
        pipe(face, "x", seed=1, on_step=cancel, **SMALL)
    assert pipe(face, "x", seed=1, **SMALL).images  # the pipeline is usable afterwards


def test_one_pipeline_per_process(weights_dir):
    first = get_pipeline(weights_dir, load_face=False)
    assert get_pipeline(weights_dir, load_face=False) is first
    assert isinstance(first, InstantIDPipeline)


def write_lora(weights_dir, path):
    """A random LoRA for the fixture UNet, saved as diffusers/peft LoRA files are."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(weights_dir / "sdxl" / "unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet))
    return path / "pytorch_lora_weights.safetensors"


def test_lora_loads_applies_scales_and_switches_off(weights_dir, tmp_path, face):
    lora = write_lora(weights_dir, tmp_path)
    own = InstantIDPipeline.from_weights(weights_dir, load_face=False)
    plain = own(face, "x", seed=4, **SMALL).images[0]
    with_lora = own(face, "x", seed=4, lora=str(lora), **SMALL).images[0]
    assert max_diff(plain, with_lora) > 1
    assert max_diff(plain, own(face, "x", seed=4, lora=str(lora), lora_scale=0.0, **SMALL).images[0]) <= 1
    assert max_diff(plain, own(face, "x", seed=4, **SMALL).images[0]) == 0
    with pytest.raises(InvalidParameter, match="lora"):
        own(face, "x", lora=str(tmp_path / "missing.safetensors"), **SMALL)


class CrossAttentionCalls:
    """Each UNet cross-attention call (its module, inputs and keyword arguments) with the
    real token grid of its layer (the spatial shape entering its Transformer2DModel)."""

    def __init__(self, unet):
        self.calls, self.grids, self.handles = [], {}, []
        for name, module in unet.named_modules():
            if type(module).__name__ == "Transformer2DModel":
                self.handles.append(module.register_forward_pre_hook(self._grid(name)))
            if name.endswith("attn2"):
                self.handles.append(module.register_forward_pre_hook(self._call(name), with_kwargs=True))

    def _grid(self, name):
        def hook(module, args):
            self.grids[name] = tuple(args[0].shape[-2:])
        return hook

    def _call(self, name):
        def hook(module, args, kwargs):
            owner = name.split(".transformer_blocks.")[0]
            self.calls.append((module, args[0].clone(), dict(kwargs), self.grids[owner]))
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


# square; landscape and portrait; latent sides odd at the first level (33, 7, 9) and at the
# second (17: 384x264 has token grids 33x48, 17x24, 9x12)
@pytest.mark.parametrize("width,height", [(64, 64), (96, 64), (64, 96), (384, 264), (264, 384), (72, 56)])
def test_face_region_mask_follows_the_real_token_grid_of_every_level(pipe, face, width, height):
    options = RenderOptions(width=width, height=height, num_inference_steps=1, enhance_face_region=True)
    box = (0.15 * width, 0.15 * height, 0.45 * width, 0.5 * height)
    with CrossAttentionCalls(pipe.sdxl.unet) as recorded:
        images, _ = pipe.render([item(face, options, face_box=box)], options)
    assert images[0].size == (width, height)
    grids = {grid for *_, grid in recorded.calls}
    assert len(grids) == 2  # the cross-attention levels of SDXL's UNet (1 and 2)
    x1, y1, x2, y2 = box
    checked = 0
    for attn, hidden, kwargs, (rows, cols) in recorded.calls:
        assert hidden.shape[1] == rows * cols
        with torch.no_grad():  # the face-attention part of this layer's output, per token
            face_part = attn(hidden, **kwargs) - attn(hidden, **{**kwargs, "ip_adapter_scale": 0.0})
        face_part = face_part.abs().amax(-1).view(-1, rows, cols)
        cell_w, cell_h = width / cols, height / rows
        x = (torch.arange(cols) + 0.5) * cell_w
        y = (torch.arange(rows) + 0.5) * cell_h
        outside = ((x < x1 - cell_w) | (x > x2 + cell_w))[None, :] | ((y < y1 - cell_h) | (y > y2 + cell_h))[:, None]
        assert torch.all(face_part[:, outside] == 0), (rows, cols)  # cells a cell or more away from the box
        checked += int(outside.sum())
        centre = int((y1 + y2) / 2 / cell_h), int((x1 + x2) / 2 / cell_w)
        assert torch.all(face_part[:, centre[0], centre[1]] > 0), (rows, cols)
    assert checked > 0


@pytest.fixture(scope="module")
def distilled(weights_dir, tmp_path_factory):
    """The fixture pipeline with a guidance-distilled UNet (``time_cond_proj_dim`` set, as
    LCM-distilled SDXL UNets publish it): the same weights plus a guidance projection."""
    import shutil

    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("distilled")
    shutil.copytree(weights_dir / "sdxl", root / "sdxl")
    for name in ("instantid", "antelopev2"):
        (root / name).symlink_to(weights_dir / name, target_is_directory=True)
    plain = UNet2DConditionModel.from_pretrained(weights_dir / "sdxl" / "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**plain.config, "time_cond_proj_dim": 32})
    missing, unexpected = unet.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("time_embedding.cond_proj") for k in missing)
    unet.save_pretrained(root / "sdxl" / "unet")
    return InstantIDPipeline.from_weights(root, load_face=False)


def test_a_guidance_distilled_unet_gets_each_images_guidance_as_an_embedding(distilled, face):
    """As diffusers' SDXL pipelines do: the guidance goes in as an embedding (guidance - 1)
    and there is no unconditional branch; every image keeps its own guidance in a batch."""
    options = RenderOptions(width=64, height=64, num_inference_steps=2, do_cfg=True)
    items = [item(face, options, seed=1, guidance_scale=5.0), item(face, options, seed=2, guidance_scale=3.0)]
    with Recorder(distilled.sdxl.unet) as unet:
        batched, _ = distilled.render(items, options)
    call = unet.calls[0]
    assert call["sample"].shape[0] == call["timestep_cond"].shape[0] == len(items)
    expected = distilled.sdxl.get_guidance_scale_embedding(torch.tensor([4.0, 2.0]), embedding_dim=32)
    assert torch.allclose(call["timestep_cond"], expected)
    for k, single in enumerate(items):
        alone, _ = distilled.render([single], options)
        assert max_diff(alone[0], batched[k]) <= 1, k
    other, _ = distilled.render([item(face, options, seed=1, guidance_scale=3.0)], options)
    assert max_diff(other[0], batched[0]) > 1  # the guidance reaches the UNet


def test_from_components_is_the_one_assembly(weights_dir, face, pipe):
    """Loaded parts (an SDXL pipeline, the IdentityNet, the adapter file's contents) give
    the pipeline from_weights gives; what is missing or contradicts is named."""
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    from pipeline.adapter import AdapterWeightsError, read_adapter_file

    sdxl = StableDiffusionXLPipeline.from_pretrained(weights_dir / "sdxl")
    controlnet = ControlNetModel.from_pretrained(weights_dir / "instantid" / "ControlNetModel")
    adapter = read_adapter_file(weights_dir / "instantid" / "ip-adapter.bin")
    for kwargs, field in ((dict(), "controlnet"), (dict(controlnet=controlnet, optimizations="bf16"), "dtype")):
        with pytest.raises(InvalidParameter) as info:
            InstantIDPipeline.from_components(sdxl, adapter, **kwargs)
        assert info.value.field == field
    with pytest.raises(AdapterWeightsError, match="ip_adapter"):
        InstantIDPipeline.from_components(sdxl, {"image_proj": adapter["image_proj"]}, controlnet=controlnet)
    assembled = InstantIDPipeline.from_components(sdxl, adapter, controlnet=controlnet)
    assert assembled.sdxl.controlnet is controlnet and assembled.face is None
    assert max_diff(assembled(face, "x", seed=5, **SMALL).images[0], pipe(face, "x", seed=5, **SMALL).images[0]) <= 1
