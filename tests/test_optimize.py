"""Speed settings (pipeline/optimize.py): each one opt-in, checked before loading, applied
in one place; the ones that keep the result keep it within float tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from PIL import Image

from pipeline.adapter import AttnProcessor, IdentityAttnProcessor
from pipeline.errors import InvalidParameter, NoFaceDetected, ProviderUnavailable, WeightsNotFound
from pipeline.face import FaceAnalyzer
from pipeline.optimize import FEW_STEP_PRESETS, Optimizations, check_optimizations, regional_blocks
from pipeline.pipeline import InstantIDPipeline, RenderItem, RenderOptions
from tests.conftest import face_photo, pixels
from tests.test_adapter import make_attention

SMALL = dict(width=64, height=64, num_inference_steps=3)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def load(weights_dir, **optimizations) -> InstantIDPipeline:
    return InstantIDPipeline.from_weights(weights_dir, load_face=False, optimizations=optimizations)


def items_for(pipe, face, options, count=2):
    from pipeline.keypoints import Frame

    kps = Frame(face.image_size, (options.width, options.height)).points(np.asarray(face.kps))
    return [RenderItem(prompt=f"portrait {k}", negative_prompt=None, embedding=face.embedding, kps=kps, seed=10 + k,
                       ip_adapter_scale=0.6 + 0.2 * k) for k in range(count)]


# ----------------------------------------------------------------------------- settings


def test_defaults_are_todays_path(pipe):
    assert Optimizations().enabled() == {} and Optimizations().label() == "default"
    assert pipe.optimizations == Optimizations() and pipe.applied == [] and pipe.param_defaults == {}
    assert not any(getattr(m, "fused_projections", False) for m in pipe.sdxl.unet.modules())


def test_get_pipeline_keeps_one_pipeline_per_setting(weights_dir):
    from pipeline import get_pipeline

    plain = get_pipeline(weights_dir, load_face=False)
    fast = get_pipeline(weights_dir, load_face=False, optimizations="channels_last")
    assert fast is not plain and fast.optimizations.channels_last and not plain.optimizations.channels_last
    assert get_pipeline(weights_dir, load_face=False, optimizations="channels_last") is fast


def test_names_as_the_command_line_gives_them():
    opts = Optimizations.parse("fuse_qkv, channels_last,compile,bf16")
    assert opts.enabled() == {"dtype": "bf16", "fuse_qkv": True, "channels_last": True, "compile": "regional"}
    assert Optimizations.parse(["compile=full", "vae_decode=upcast"]).compile == "full"
    assert Optimizations.parse("fastest").identitynet_cond_only
    few = Optimizations.parse("few_step=lightning:/x/l.safetensors:8").few_step
    assert (few.kind, few.lora, few.steps) == ("lightning", "/x/l.safetensors", 8)
    assert few.param_defaults() == {**FEW_STEP_PRESETS["lightning"], "num_inference_steps": 8}
    for bad, field in (("turbo", "optimize"), ("compile=everything", "optimize.compile"),
                       ("few_step=sd15:/x", "optimize.few_step.kind"), ("fuse_qkv=maybe", "optimize")):
        with pytest.raises(InvalidParameter) as info:
            Optimizations.parse(bad)
        assert info.value.field == field, bad


@pytest.mark.parametrize(
    "settings,field",
    [({"dtype": "fp16"}, "dtype"), ({"compile": "regional", "compile_mode": "reduce-overhead"}, "compile_mode"),
     ({"compile_mode": "max-autotune"}, "compile_mode"), ({"few_step": {"kind": "lcm", "lora": "/no/lora"}},
                                                           "few_step.lora")],
)
def test_bad_combinations_are_refused_before_any_weights_are_read(tmp_path, settings, field):
    with pytest.raises(InvalidParameter) as info:  # the weights root does not even exist
        InstantIDPipeline.from_weights(tmp_path / "nowhere", optimizations=settings)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_contradicting_arguments_and_vae_modes_are_refused(tmp_path):
    with pytest.raises(InvalidParameter, match="contradicts"):
        InstantIDPipeline.from_weights(tmp_path, dtype="fp32", optimizations="bf16")
    with pytest.raises(InvalidParameter, match="not both"):
        InstantIDPipeline.from_weights(tmp_path, providers="CPUExecutionProvider", optimizations="face_providers=cpu")
    gpu, fp16 = torch.device("cuda"), torch.float16  # checked as on a GPU (nothing runs there)
    with pytest.raises(InvalidParameter, match="overflows in fp16") as info:
        check_optimizations(Optimizations(vae_decode="native"), gpu, fp16)
    assert info.value.field == "vae_decode"
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    check_optimizations(Optimizations(vae_decode="native", vae_fp16_fix=str(tmp_path / "vae")), gpu, fp16)
    with pytest.raises(InvalidParameter, match="conflicts with vae_decode=upcast"):
        check_optimizations(Optimizations(vae_decode="upcast", vae_fp16_fix=str(tmp_path / "vae")), gpu, fp16)
    with pytest.raises(WeightsNotFound, match="config.json"):
        check_optimizations(Optimizations(vae_fp16_fix=str(tmp_path)), gpu, fp16)
    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider"):
        InstantIDPipeline.from_weights(tmp_path, optimizations="face_providers=cuda")


# ----------------------------------------------------------------------------- attention


def test_every_attention_layer_runs_through_sdpa(pipe, face, monkeypatch):
    """Text encoders, Resampler, UNet (adapter included), IdentityNet and VAE: one SDPA call
    per attention layer (the negative prompt is empty: SDXL zeroes it without encoding)."""
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)

    def attention_layers(model):
        return [m for m in model.modules() if isinstance(m, Attention)]

    unet, controlnet, vae = pipe.sdxl.unet, pipe.sdxl.controlnet, pipe.sdxl.vae
    cross = [p for p in unet.attn_processors.values() if isinstance(p, IdentityAttnProcessor)]
    assert cross and all(isinstance(p, (AttnProcessor, IdentityAttnProcessor)) for p in unet.attn_processors.values())
    pipe(face, "x", seed=1, width=64, height=64, num_inference_steps=1, guidance_scale=5.0)
    expected = (len(attention_layers(unet)) + len(cross)  # self, text and face attention of the UNet
                + len(attention_layers(controlnet))  # IdentityNet
                + 2 * len(attention_layers(pipe.image_proj))  # the Resampler, face and zero embedding
                + len(attention_layers(vae.decoder))
                + sum(e.config.num_hidden_layers for e in (pipe.sdxl.text_encoder, pipe.sdxl.text_encoder_2)))
    assert len(calls) == expected


@torch.no_grad()
def test_fused_projections_give_the_same_numbers_in_the_processors():
    attn, processor = make_attention()
    self_attn = Attention(query_dim=32, heads=2, dim_head=8)
    hidden, context = torch.randn(3, 10, 32), torch.randn(3, 11, 16)
    scale = torch.tensor([0.0, 0.5, 1.3])
    cross_before = processor(attn, hidden, context, ip_adapter_scale=scale)
    self_before = AttnProcessor()(self_attn, hidden)
    attn.fuse_projections()
    self_attn.fuse_projections()
    processor.fuse()
    for layer in (attn.to_k, attn.to_v, processor.to_k_ip, processor.to_v_ip, self_attn.to_q, self_attn.to_k):
        layer.weight.data.fill_(float("nan"))  # the unfused layers must not be used any more
    assert torch.allclose(processor(attn, hidden, context, ip_adapter_scale=scale), cross_before, atol=1e-5)
    assert torch.allclose(AttnProcessor()(self_attn, hidden), self_before, atol=1e-5)


def test_fused_projections_in_the_pipeline_keep_the_images(pipe, face, weights_dir):
    fused = load(weights_dir, fuse_qkv=True)
    assert [name for name, _ in fused.applied] == ["fuse_qkv"]
    for model in (fused.sdxl.unet, fused.sdxl.controlnet):
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert all(m.fused_projections and (hasattr(m, "to_qkv") or hasattr(m, "to_kv")) for m in layers)
    assert all(isinstance(p, AttnProcessor) for p in fused.sdxl.controlnet.attn_processors.values())
    options = RenderOptions(**SMALL)
    reference, _ = pipe.render(items_for(pipe, face, options), options)
    images, _ = fused.render(items_for(fused, face, options), options)
    assert all(max_diff(a, b) <= 1 for a, b in zip(reference, images))


def test_a_request_lora_on_a_fused_pipeline_uses_the_unfused_projections(pipe, face, weights_dir, tmp_path):
    from tests.test_pipeline import write_lora

    lora = str(write_lora(weights_dir, tmp_path))
    fused = load(weights_dir, fuse_qkv=True)
    plain = load(weights_dir)
    with_lora = dict(seed=4, lora=lora, **SMALL)
    assert max_diff(plain(face, "x", **with_lora).images[0], fused(face, "x", **with_lora).images[0]) <= 1
    assert max_diff(pipe(face, "x", seed=4, **SMALL).images[0], fused(face, "x", seed=4, **SMALL).images[0]) <= 1
    assert all(m.fused_projections for m in fused.sdxl.unet.modules() if hasattr(m, "to_qkv"))  # fused again


def test_channels_last_keeps_the_images(pipe, face, weights_dir):
    fast = load(weights_dir, channels_last=True)
    conv = fast.sdxl.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.sdxl.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert max_diff(pipe(face, "x", seed=2, **SMALL).images[0], fast(face, "x", seed=2, **SMALL).images[0]) <= 1


def test_regional_compile_warms_up_request_shapes_and_keeps_its_fused_state(pipe, face, weights_dir, tmp_path):
    """diffusers' compile_repeated_blocks (UNet) and the same blocks of IdentityNet; a
    warmed-up shape compiles nothing more at the first request; with fuse_qkv the fused
    projections are compiled in, so a request LoRA (which needs them off) is refused."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tests.test_pipeline import write_lora

    torch._dynamo.reset()  # graphs another test compiled (a batch size marked dynamic) must not count here
    compiled = load(weights_dir, compile="regional", compile_backend="aot_eager", fuse_qkv=True)
    blocks = regional_blocks(compiled.sdxl.unet) + regional_blocks(compiled.sdxl.controlnet)
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    seconds = compiled.warmup_shapes([(64, 64, 1)], num_inference_steps=1)
    assert list(seconds) == [(64, 64, 1)] and seconds[64, 64, 1] > 0
    graphs = counters["stats"]["unique_graphs"]
    image = compiled(face, "x", seed=3, **SMALL).images[0]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled at the first request
    assert max_diff(pipe(face, "x", seed=3, **SMALL).images[0], image) <= 1
    lora = str(write_lora(weights_dir, tmp_path))
    with Calls(compiled.sdxl.unet) as unet, pytest.raises(InvalidParameter) as info:
        compiled(face, "x", seed=3, lora=lora, **SMALL)
    assert info.value.field == "lora" and "fuse_qkv" in str(info.value) and not unet.calls
    assert all(m.fused_projections for m in compiled.sdxl.unet.modules() if isinstance(m, Attention))
    compiled(face, "x", seed=3, num_images=2, width=64, height=64, num_inference_steps=1)
    assert counters["stats"]["unique_graphs"] > graphs  # a batch size not warmed up does compile
    extra = regional_blocks(compiled.extra_controlnets.get("canny"))  # a ControlNet loaded later: compiled too
    assert extra and all(block._compiled_call_impl is not None for block in extra)


def test_extra_controlnets_get_the_speed_settings_and_keep_the_images(pipe, face):
    fast = load(pipe.extra_controlnets.extras.root, fuse_qkv=True, channels_last=True)
    net = fast.extra_controlnets.get("canny")
    layers = [m for m in net.modules() if isinstance(m, Attention)]
    assert layers and all(m.fused_projections and (hasattr(m, "to_qkv") or hasattr(m, "to_kv")) for m in layers)
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and not net.conv_in.weight.is_contiguous()
    scene = face_photo(size=(96, 80), blobs=((48, 40, 20),), color=(220, 200, 90))
    extra = dict(seed=5, controlnets=[{"type": "canny", "image": scene, "scale": 0.9}], **SMALL)
    assert max_diff(pipe(face, "x", **extra).images[0], fast(face, "x", **extra).images[0]) <= 1


def describe(value):
    """The shapes and dtypes of a call's tensors (nested in lists and dicts), not their values."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return tuple(sorted((k, describe(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(describe(v) for v in value)
    return type(value).__name__


def test_warmup_takes_the_path_of_a_request(pipe, face):
    with Calls(pipe.sdxl.unet) as unet, Calls(pipe.sdxl.controlnet) as control:
        pipe.warmup_shapes([(64, 96, 2)], num_inference_steps=2)
    warm = [describe(call) for call in unet.calls + control.calls]
    with Calls(pipe.sdxl.unet) as unet, Calls(pipe.sdxl.controlnet) as control:
        pipe(face, "a portrait", seed=1, num_images=2, width=64, height=96, num_inference_steps=2)
    assert warm == [describe(call) for call in unet.calls + control.calls] and len(control.calls) == 2
    for bad in ([64, 64], (64, 64, 0), (64.0, 64, 1), "64x64x1"):
        with pytest.raises(InvalidParameter) as info:
            pipe.warmup_shapes([(64, 64, 1), bad])
        assert info.value.field == "warmup_shapes[1]"


# ----------------------------------------------------------------------------- IdentityNet


class Calls:
    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: self.calls.append((args, kwargs)), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_identitynet_on_the_conditional_half_only_is_opt_in_and_changes_the_result(pipe, face, weights_dir):
    cond_only = load(weights_dir, identitynet_cond_only=True)
    with Calls(cond_only.sdxl.controlnet) as control, Calls(cond_only.sdxl.unet) as unet:
        image = cond_only(face, "x", seed=6, num_images=2, guidance_scale=5.0, **SMALL).images[0]
    assert control.calls[0][0][0].shape[0] == 2 and unet.calls[0][0][0].shape[0] == 4  # 2 images, CFG doubles
    down = unet.calls[0][1]["down_block_additional_residuals"]
    mid = unet.calls[0][1]["mid_block_additional_residual"]
    assert all(torch.count_nonzero(d[:2]) == 0 and torch.count_nonzero(d[2:]) > 0 for d in down)
    assert torch.count_nonzero(mid[:2]) == 0
    assert max_diff(image, pipe(face, "x", seed=6, num_images=2, guidance_scale=5.0, **SMALL).images[0]) > 1
    # without CFG there is no unconditional half: the same image as the default path
    no_cfg = dict(seed=6, guidance_scale=1.0, **SMALL)
    assert max_diff(cond_only(face, "x", **no_cfg).images[0], pipe(face, "x", **no_cfg).images[0]) == 0
    # and the window still skips IdentityNet outside it
    with Calls(cond_only.sdxl.controlnet) as control:
        cond_only(face, "x", seed=1, width=64, height=64, num_inference_steps=8, control_guidance_end=0.5)
    assert len(control.calls) == 4


# ----------------------------------------------------------------------------- VAE


def test_vae_settings(pipe, face, weights_dir, tmp_path):
    from diffusers import AutoencoderKL

    fixed = AutoencoderKL.from_pretrained(weights_dir / "sdxl" / "vae")
    fixed.register_to_config(force_upcast=False)  # as sdxl-vae-fp16-fix publishes it
    fixed.save_pretrained(tmp_path / "vae-fix")
    swapped = load(weights_dir, vae_fp16_fix=str(tmp_path / "vae-fix"), vae_decode="native")
    assert swapped.sdxl.vae is not pipe.sdxl.vae and not swapped.sdxl.vae.config.force_upcast
    assert max_diff(pipe(face, "x", seed=8, **SMALL).images[0], swapped(face, "x", seed=8, **SMALL).images[0]) <= 1
    tiled = load(weights_dir, vae_tiling=True)
    assert tiled.sdxl.vae.use_tiling
    big = dict(seed=8, width=256, height=256, num_inference_steps=1)  # 32x32 latents: several 16x16 tiles
    image = tiled(face, "x", **big).images[0]
    assert image.size == (256, 256) and pixels(image).std() > 0
    assert np.abs(pixels(image) - pixels(pipe(face, "x", **big).images[0])).mean() < 8  # blended, not identical


# ----------------------------------------------------------------------------- few steps


def test_few_step_preset_fuses_the_lora_and_sets_steps_guidance_and_scheduler(face, weights_dir, tmp_path):
    from tests.test_pipeline import write_lora

    lora = str(write_lora(weights_dir, tmp_path))
    preset = InstantIDPipeline.from_weights(weights_dir, load_face=False,
                                            optimizations={"few_step": {"kind": "lcm", "lora": lora}})
    assert preset.param_defaults == {"num_inference_steps": 5, "guidance_scale": 1.5, "scheduler": "lcm"}
    assert not any("lora" in name for name, _ in preset.sdxl.unet.named_modules())  # merged, no LoRA layers left
    plain = load(weights_dir)
    with Calls(preset.sdxl.unet) as unet:
        fast = preset(face, "x", seed=9, width=64, height=64)
    assert len(unet.calls) == 5
    slow = plain(face, "x", seed=9, width=64, height=64, lora=lora, num_inference_steps=5, guidance_scale=1.5,
                 scheduler="lcm")
    assert max_diff(fast.images[0], slow.images[0]) <= 1
    # explicit parameters win over the preset
    with Calls(preset.sdxl.unet) as unet:
        preset(face, "x", seed=9, width=64, height=64, num_inference_steps=2)
    assert len(unet.calls) == 2


@pytest.mark.parametrize("scheduler", ["euler_trailing", "ddim_trailing"])
def test_trailing_schedulers_for_step_distilled_loras(pipe, face, scheduler):
    from pipeline.schedulers import make_scheduler

    made = make_scheduler(scheduler, pipe.sdxl.scheduler.config)
    made.set_timesteps(4)
    assert int(made.timesteps[0]) == 999  # trailing: the first step starts from pure noise
    assert pixels(pipe(face, "x", seed=1, scheduler=scheduler, guidance_scale=0.0, **SMALL).images[0]).std() > 0


# ----------------------------------------------------------------------------- face stage


@pytest.fixture(scope="module")
def analyzer(weights_dir):
    return FaceAnalyzer(weights_dir / "antelopev2")


def test_analyze_batch_equals_analyze_per_photo_with_one_recognition_call(analyzer, monkeypatch):
    photos = [face_photo(), face_photo(color=(255, 240, 170)), face_photo(size=(640, 320), blobs=((450, 160, 70),)),
              face_photo(size=(300, 300), blobs=((150, 150, 140),))]
    single = [analyzer.analyze(p) for p in photos]
    runs = []
    session = analyzer._recognizer.session
    original = session.run
    monkeypatch.setattr(session, "run", lambda *a, **k: runs.append(a[1]) or original(*a, **k))
    batch = analyzer.analyze_batch(photos)
    assert len(runs) == 1 and next(iter(runs[0].values())).shape[0] == len(photos)
    for one, many in zip(single, batch):
        assert one.bbox == many.bbox and one.kps == many.kps and one.image_size == many.image_size
        assert np.allclose(one.embedding, many.embedding, rtol=1e-5, atol=1e-5)


def test_analyze_batch_reports_each_photo_that_fails(analyzer):
    photos = [face_photo(), Image.new("RGB", (200, 200)), b"not an image"]
    with pytest.raises(NoFaceDetected, match=r"images\[1\]"):
        analyzer.analyze_batch(photos)
    results = analyzer.analyze_batch(photos, fields=["a", "b", "c"], errors="return")
    assert results[0].embedding.shape == (512,)
    assert isinstance(results[1], NoFaceDetected) and results[1].field == "b"
    assert results[2].code == "invalid_image" and results[2].field == "c"


def test_face_batch_setting_gives_the_same_identity(weights_dir, analyzer):
    batched = FaceAnalyzer(weights_dir / "antelopev2", batch_recognition=True)
    photos = [face_photo(), face_photo(color=(255, 240, 170))]
    pose = face_photo(size=(512, 256), blobs=((400, 128, 60),))
    a, b = analyzer.analyze_many(photos, pose=pose), batched.analyze_many(photos, pose=pose)
    assert a.kps == b.kps and np.allclose(a.embedding, b.embedding, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- command line


def test_cli_optimize_flag(weights_dir, tmp_path, capsys):
    from pipeline.cli import EXIT_INVALID, main

    face_photo().save(tmp_path / "face.png")
    base = ["generate", "--weights", str(weights_dir), "--face", str(tmp_path / "face.png"), "--prompt", "x",
            "--width", "64", "--height", "64", "--num-inference-steps", "2", "--seed", "1"]
    assert main([*base, "--out", str(tmp_path / "a.png"), "--optimize", "fp16"]) == EXIT_INVALID
    assert "dtype: fp16 needs a CUDA device" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a.png"), "--optimize", "warp_speed"]) == EXIT_INVALID
    assert "optimize: unknown setting 'warp_speed'" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a.png"), "--optimize", "fuse_qkv,channels_last",
                 "--optimize", "face_batch"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["optimizations"] == {"fuse_qkv": True, "channels_last": True, "face_batch": True}
    assert main([*base, "--out", str(tmp_path / "b.png")]) == 0
    assert "optimizations" not in json.loads(capsys.readouterr().out)
    assert max_diff(Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")) <= 1


def test_published_size_writer_loads(monkeypatch, tmp_path, face):
    """The published-size writer with the sizes swapped for small ones (the real tree is ~9 GB)."""
    from pipeline import fixtures

    monkeypatch.setattr(fixtures, "PUBLISHED_UNET", {**fixtures.PUBLISHED_UNET, "block_out_channels": [32, 64, 64],
                                                     "attention_head_dim": [2, 4, 4],
                                                     "transformer_layers_per_block": [1, 1, 1]})
    monkeypatch.setattr(fixtures, "PUBLISHED_VAE", {**fixtures.PUBLISHED_VAE, "block_out_channels": [32] * 4})
    monkeypatch.setattr(fixtures, "PUBLISHED_TEXT", {
        "text_encoder": {**fixtures.PUBLISHED_TEXT["text_encoder"], "hidden_size": 64, "intermediate_size": 64,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 64},
        "text_encoder_2": {**fixtures.PUBLISHED_TEXT["text_encoder_2"], "hidden_size": 1984,
                           "intermediate_size": 64, "num_hidden_layers": 10, "num_attention_heads": 2,
                           "projection_dim": 1280}})
    monkeypatch.setattr(fixtures, "CLIP_VOCAB", 1000)
    monkeypatch.setattr(fixtures, "PUBLISHED_RESAMPLER", {**fixtures.PUBLISHED_RESAMPLER, "hidden_dims": 128,
                                                          "heads": 2})
    root = fixtures.write_published_size_fixtures(tmp_path / "w")
    unet = json.loads((root / "sdxl" / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 2048 and unet["block_out_channels"] == [32, 64, 64]
    loaded = InstantIDPipeline.from_weights(root, load_face=False)
    assert loaded.sdxl.unet.dtype == torch.float32  # stored in fp16, loaded as asked
    assert loaded(face, "x", seed=1, width=64, height=64, num_inference_steps=1).images[0].size == (64, 64)


def test_served_requests_take_the_few_step_preset_for_what_they_leave_out(tmp_path):
    """The ingress applies the Generator's preset the way the CLI does: explicit fields win."""
    from deployments.api import GenerationRequest

    lora = tmp_path / "lightning.safetensors"
    lora.write_bytes(b"")
    defaults = Optimizations.parse(f"few_step=lightning:{lora}").param_defaults()
    plain = GenerationRequest(face_id="f_" + "a" * 22).with_defaults(defaults)
    assert (plain.num_inference_steps, plain.guidance_scale, plain.scheduler) == (4, 0.0, "euler_trailing")
    chosen = GenerationRequest(face_id="f_" + "a" * 22, num_inference_steps=8).with_defaults(defaults)
    assert (chosen.num_inference_steps, chosen.guidance_scale) == (8, 0.0)
    assert GenerationRequest(face_id="f_" + "a" * 22).with_defaults({}).num_inference_steps == 30


def test_the_served_face_stage_takes_its_speed_settings(weights_dir):
    """The app's `optimizations` reach the FaceEmbedder too (face_batch, face_providers)."""
    from deployments.face import FaceEmbedder

    embedder = FaceEmbedder.func_or_class(str(weights_dir), optimizations="face_batch,face_providers=cpu")
    assert embedder.analyzer.batch_recognition is True
    assert embedder.ready()["providers"] == ["CPUExecutionProvider"]
    with pytest.raises(InvalidParameter, match="face_providers"):
        FaceEmbedder.func_or_class(str(weights_dir), providers="cpu", optimizations="face_providers=cpu")
