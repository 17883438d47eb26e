"""The published-size InstantID architecture on one GPU: the reference path against each
speed setting added in turn (a ladder) and against all of them.

Models: the SDXL base UNet (``tests/data/sdxl_unet_config.json``), IdentityNet made from
it, the adapter in the published layout (``tests/data/ip_adapter_layout.json``: Resampler
and 70 face K/V layers, checked key by key) and the SDXL VAE, all with random weights
(seeded: every rung gets the same weights); text embeddings of the right shape (77 x 2048
and a pooled 1280) stand in for the text encoders, which run once per request and are not
what is measured. Everything else is the real pipeline (``InstantIDPipeline.render``).

Rows (``gpu.csv``): seconds per image and per step (the median over timed runs after
warm-up, with min/max), the first call's extra time (compilation, when on), FLOPs per
image counted by ``torch.utils.flop_counter.FlopCounterMode`` on the eager model, the
achieved TFLOP/s and its share of the card's dense bf16 peak (and of a measured bf16
matmul), peak GPU memory, the largest pixel difference from the reference image, and the
speed-up over the reference. Then throughput at batch 1, 2, 4 and the face stage
(``face.csv``: fixture ONNX models, so it measures the stage's own overhead and the
provider, not SCRFD-10G/glintr100).

It keeps to a time budget (``--budget-s``): cases are in priority order and those that
would start after the budget are written as skipped. ``--tiny`` runs the same script on
CPU with a tiny configuration (the test suite does this).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .common import Results, summarize

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; first match wins.
SPEC_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))

GPU_COLUMNS = ("rung", "dtype", "fuse_qkv", "channels_last", "identitynet_cond_only", "compile", "vae_decode_dtype",
               "width", "height", "steps", "cfg", "batch", "note", "first_call_s", "compile_s", "s_per_image_median",
               "s_per_image_min", "s_per_image_max", "s_per_image_spread_pct", "s_per_step", "images_per_s",
               "flops_per_image_t", "achieved_tflops", "peak_bf16_tflops", "share_of_peak_pct", "matmul_tflops",
               "share_of_matmul_pct", "peak_mem_gib", "max_diff_vs_reference", "speedup_vs_reference")
GPU_OPTIONAL = ("note", "s_per_step", "compile_s", "peak_bf16_tflops", "share_of_peak_pct", "peak_mem_gib", "max_diff_vs_reference",
                "speedup_vs_reference", "flops_per_image_t", "achieved_tflops", "share_of_matmul_pct")
GPU_TABLE = ("steps", "cfg", "batch", "s_per_image_median", "s_per_step", "compile_s", "achieved_tflops",
             "share_of_peak_pct", "peak_mem_gib", "max_diff_vs_reference", "speedup_vs_reference")
FACE_COLUMNS = ("method", "providers", "images", "image_size", "ms_per_image_median", "ms_per_image_min",
                "ms_per_image_max", "ms_per_image_spread_pct", "speedup")

# The ladder: each rung adds one setting to the one before.
LADDER: tuple[tuple[str, dict[str, Any]], ...] = (
    ("reference", {"dtype": "fp16"}),
    ("+bf16", {"dtype": "bf16"}),
    ("+fuse_qkv", {"fuse_qkv": True}),
    ("+channels_last", {"channels_last": True}),
    ("+identitynet_cond_only", {"identitynet_cond_only": True}),
    ("+compile", {"compile": "regional"}),
)

# Cases beside the plain render, measured on the reference path and on "all": one extra
# ControlNet (the reference's canny: a full-size SDXL ControlNet, IdentityNet's architecture)
# and img2img at strength 0.6 (the schedule's last 60% of the steps run).
VARIANTS: tuple[tuple[str, str], ...] = (
    ("+canny", "one extra ControlNet (canny, full SDXL size), strength 0.5"),
    ("+img2img", "img2img at strength 0.6: int(steps * 0.6) steps run"),
)
IMG2IMG_STRENGTH = 0.6
CANNY_SCALE = 0.5

TINY_RESAMPLER = dict(embed_dims=512, hidden_dims=128, depth=4, heads=2, num_queries=16, ffn_ratio=4)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


@dataclass
class Arch:
    name: str
    unet: dict
    vae: dict
    resampler: dict
    layout: dict | None = None  # the published key layout to check the adapter against


def published_arch() -> Arch:
    import torch

    from pipeline.adapter import ResamplerConfig
    from pipeline.fixtures import PUBLISHED_VAE

    unet = json.loads((DATA / "sdxl_unet_config.json").read_text())
    layout = json.loads((DATA / "ip_adapter_layout.json").read_text())
    state = {k: torch.empty(v, device="meta") for k, v in layout["image_proj"].items()}
    config = ResamplerConfig.from_state_dict(state)  # every size inferred from the published tensors
    resampler = dict(embed_dims=config.embed_dims, hidden_dims=config.hidden_dims, output_dims=config.output_dims,
                     depth=config.depth, heads=config.heads, num_queries=config.num_queries,
                     ffn_ratio=config.ffn_ratio)
    return Arch("published SDXL + InstantID", unet, dict(PUBLISHED_VAE), resampler, layout)


def tiny_arch() -> Arch:
    """The fixture weights' architecture (SDXL's topology at tiny widths)."""
    from pipeline.fixtures import CROSS_ATTENTION_DIM, FIXTURE_UNET, FIXTURE_VAE

    return Arch("tiny", dict(FIXTURE_UNET), dict(FIXTURE_VAE), dict(TINY_RESAMPLER, output_dims=CROSS_ATTENTION_DIM))


def _embeddings_pipeline_class():
    from pipeline.pipeline import InstantIDPipeline

    class EmbeddingsPipeline(InstantIDPipeline):
        """The pipeline with seeded text embeddings of the right shape in place of the text
        encoders (which run once per request, outside the denoising loop)."""

        def _encode_text(self, items, cfg, lora_scale, *, weighted=False):
            import torch

            if weighted:
                raise ValueError("the GPU benchmark renders plain prompts (77 text rows) only")

            config = self.sdxl.unet.config
            rows = len(items) * (2 if cfg else 1)
            pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            generator = torch.Generator("cpu").manual_seed(1234)
            text = torch.randn(rows, 77, config.cross_attention_dim, generator=generator)
            pooled = torch.randn(rows, pooled_dim, generator=generator)
            return text.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    return EmbeddingsPipeline


def build_pipeline(arch: Arch, device, opts, seed: int = 0):
    """The architecture with random weights (the same for a given seed), assembled and
    ``opts`` applied by ``InstantIDPipeline.from_components``, as ``from_weights`` does; an
    extra ControlNet of IdentityNet's architecture is there as ``canny``."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from pipeline.adapter import cross_attention_layers, image_proj_to_published
    from pipeline.optimize import resolve_load_settings

    dtype, _ = resolve_load_settings(opts, device, "auto", "auto")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(arch.unet)
        controlnet = ControlNetModel.from_unet(unet)
        vae = AutoencoderKL.from_config(arch.vae)
        resampler = IPAdapterPlusImageProjection(dim_head=64, **arch.resampler)
        canny = ControlNetModel.from_unet(unet)
    with torch.no_grad():  # zero-initialised convolutions would make the ControlNets no-ops
        for net in (controlnet, canny):
            for param in net.parameters():
                if param.dim() > 0 and not param.is_meta and not param.any():
                    param.normal_(0.0, 0.02)
    # the adapter file's contents, in the published key scheme (face K/V per cross-attention position)
    ip_adapter = {}
    for position, _name, attn in cross_attention_layers(unet):
        hidden, cross = attn.to_k.out_features, attn.to_k.in_features
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{position}.{kind}.weight"] = torch.randn(hidden, cross, device=device) * cross**-0.5
    adapter = {"image_proj": image_proj_to_published(resampler.state_dict(), arch.resampler["depth"]),
               "ip_adapter": ip_adapter}
    if arch.layout is not None:  # the published key scheme, exactly
        for group in ("image_proj", "ip_adapter"):
            assert {k: tuple(v.shape) for k, v in adapter[group].items()} == {k: tuple(v) for k, v in
                                                                             arch.layout[group].items()}, group
    for module in (unet, controlnet, vae, canny):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    parts = {"unet": unet, "vae": vae, "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER)}
    pipe = _embeddings_pipeline_class().from_components(parts, adapter, controlnet=controlnet, optimizations=opts)
    pipe.extra_controlnets.add("canny", canny)
    return pipe


def make_items(pipe, batch: int, width: int, height: int, guidance: float, variant: str = ""):
    """``batch`` items (seeded); ``variant`` "+canny" gives each a control image for the extra
    ControlNet, "+img2img" a starting picture."""
    from pipeline.pipeline import RenderItem

    rng = np.random.default_rng(7)
    embed = int(pipe.image_proj.proj_in.in_features)
    kps = np.array([[0.4, 0.4], [0.6, 0.4], [0.5, 0.55], [0.42, 0.7], [0.58, 0.7]]) * [width, height]
    items = []
    for k in range(batch):
        picture = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        extra = {"+canny": dict(controls=(picture,), control_scales=(CANNY_SCALE,)),
                 "+img2img": dict(init_image=picture)}.get(variant, {})
        items.append(RenderItem(prompt="bench", negative_prompt=None, embedding=(rng.standard_normal(embed) * 20).astype(
            np.float32), kps=kps, seed=100 + k, guidance_scale=guidance, **extra))
    return items


def make_options(size: int, steps: int, cfg: bool, variant: str = ""):
    from pipeline.pipeline import RenderOptions

    extra = {"+canny": dict(controlnets=(("canny", 0.0, 1.0),)),
             "+img2img": dict(strength=IMG2IMG_STRENGTH)}.get(variant, {})
    return RenderOptions(width=size, height=size, num_inference_steps=steps, do_cfg=cfg, **extra)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_render(pipe, items, options, *, repeats: int, warmup: int) -> dict[str, Any]:
    import torch

    device = pipe.device
    marks: dict[int, float] = {}
    steps = options.num_inference_steps
    if options.strength is not None:  # img2img: only the schedule's tail runs, numbered from 1
        steps = int(steps * options.strength)

    def on_step(step: int, total: int) -> None:
        if step in (1, total):
            synchronize(device)
            marks[step] = time.perf_counter()

    first_calls = []
    for _ in range(warmup):
        synchronize(device)
        started = time.perf_counter()
        pipe.render(items, options)
        synchronize(device)
        first_calls.append(time.perf_counter() - started)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals, per_step, images = [], [], []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        images, _ = pipe.render(items, options, on_step=on_step)
        synchronize(device)
        totals.append(time.perf_counter() - started)
        if steps > 1:
            per_step.append((marks[steps] - marks[1]) / (steps - 1))
    stats = summarize([t / len(items) for t in totals])
    first = first_calls[0] if first_calls else float("nan")
    return {
        "first_call_s": first,
        "compile_s": max(0.0, first - stats["median"] * len(items)) if first_calls else float("nan"),
        "s_per_image_median": stats["median"], "s_per_image_min": stats["min"], "s_per_image_max": stats["max"],
        "s_per_image_spread_pct": stats["spread_pct"],
        "s_per_step": float(np.median(per_step)) if per_step else None,
        "images_per_s": 1.0 / stats["median"],
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "images": images,
    }


def _register_cpu_sdpa_formula() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels; on CPU, SDPA runs as
    ``_scaled_dot_product_flash_attention_for_cpu``, which it does not count. Same formula."""
    import torch
    from torch.utils import flop_counter

    packet = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if packet is None or packet in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(packet)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(pipe, items, options) -> float:
    """FLOPs per image at ``options.num_inference_steps`` steps: counted at 1 and 2 steps
    run (what does not repeat per step, e.g. the VAE decode, cancels out of the difference);
    img2img runs ``int(steps * strength)`` of the steps."""
    import math

    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_formula()

    strength = options.strength or 1.0

    def total(run: int) -> int:  # the schedule length at which `run` steps run
        with FlopCounterMode(display=False) as counter:
            pipe.render(items, replace(options, num_inference_steps=math.ceil(run / strength - 1e-9)))
        return counter.get_total_flops()

    one, two = total(1), total(2)
    runs = int(options.num_inference_steps * strength) if options.strength else options.num_inference_steps
    return (one + (runs - 1) * (two - one)) / len(items)


def matmul_tflops(device) -> float:
    import torch

    n, dtype, runs = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(runs):
        a @ b
    synchronize(device)
    return 2 * n**3 * runs / (time.perf_counter() - started) / 1e12


def spec_peak(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in SPEC_BF16_TFLOPS if key in name), None)


def max_pixel_diff(a, b) -> int | None:
    if a is None or b is None or len(a) != len(b):
        return None
    return int(max(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() for x, y in zip(a, b)))


def free(device) -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_gpu(out: Path, *, tiny: bool, size: int, steps: int, fast_steps: int, batches: list[int], repeats: int,
            warmup: int, budget_s: float, compile_backend: str, compile_mode: str, device_name: str = "auto",
            skip: tuple[str, ...] = ()) -> tuple[Results, Results]:
    from pipeline.optimize import Optimizations
    from pipeline.pipeline import resolve_device

    started_all = time.perf_counter()
    device = resolve_device(device_name)
    ladder = [rung for rung in LADDER if rung[0] == "reference" or rung[0].lstrip("+") not in skip]
    arch = tiny_arch() if tiny else published_arch()
    results = Results(out, "gpu", GPU_COLUMNS, optional=GPU_OPTIONAL, repeats=repeats, warmup=warmup,
                      table=GPU_TABLE, title=f"{arch.name} at {size}x{size}: the reference path, the ladder, all")
    peak = spec_peak(device)
    matmul = matmul_tflops(device)
    flops: dict[tuple, float] = {}
    reference_images: dict[tuple, list] = {}
    reference_time: dict[tuple, float] = {}

    def settings(rung_index: int) -> Optimizations:
        values: dict[str, Any] = {}
        for _, extra in ladder[: rung_index + 1]:
            values.update(extra)
        if device.type != "cuda" and values.get("dtype") == "fp16":
            values["dtype"] = "fp32"  # fp16 needs a GPU (refused on CPU): the CPU run keeps fp32
        if values.get("compile", "off") != "off":
            values.update(compile_backend=compile_backend, compile_mode=compile_mode)
        return Optimizations(**values)

    def over_budget(reserve: float = 0.0) -> bool:
        return time.perf_counter() - started_all + reserve > budget_s

    # compiling SDXL's transformer blocks takes on the order of a minute on a GPU: the
    # compiled rung starts only with that much budget left
    compile_reserve = 90.0 if device.type == "cuda" and compile_backend == "inductor" else 0.0

    def measure(pipe, rung: str, steps_: int, cfg: bool, batch: int, variant: str = "") -> None:
        opts = pipe.optimizations
        case = f"{rung}{variant}@{steps_}steps{'_cfg' if cfg else ''}_b{batch}"
        common = dict(case=case, rung=rung + variant, dtype=str(pipe.dtype).removeprefix("torch."), fuse_qkv=opts.fuse_qkv,
                      channels_last=opts.channels_last, identitynet_cond_only=opts.identitynet_cond_only,
                      compile=opts.compile, width=size, height=size, steps=steps_, cfg=cfg, batch=batch)
        if over_budget():
            results.add(status="skipped: time budget", **common)
            return
        guidance = 5.0 if cfg else 0.0
        items = make_items(pipe, batch, size, size, guidance, variant)
        options = make_options(size, steps_, cfg, variant)
        try:
            timing = time_render(pipe, items, options, repeats=repeats, warmup=warmup)
        except Exception as error:  # e.g. out of memory, a compile failure: recorded, the run goes on
            results.add(status=f"error: {type(error).__name__}: {' '.join(str(error).split())[:200]}", **common)
            free(device)
            return
        key = (steps_, cfg, batch, variant)
        cond_only = cfg and opts.identitynet_cond_only
        flop_key = (steps_, cfg, cond_only, variant)
        if flop_key not in flops and opts.compile == "off":
            flops[flop_key] = count_flops(pipe, items[:1], options)
        images = timing.pop("images")
        if rung == "reference":
            reference_images[key], reference_time[key] = images, timing["s_per_image_median"]
        per_image = flops.get(flop_key)
        achieved = per_image / timing["s_per_image_median"] / 1e12 if per_image else None
        base = reference_time.get((steps_, cfg, 1, variant))  # per image, against the reference at batch 1
        notes = [dict(VARIANTS)[variant]] if variant else []
        if rung == "reference" and device.type != "cuda":
            notes.append("fp16 is GPU-only: fp32 on CPU")
        note = "; ".join(notes) or None
        if opts.compile == "off":
            timing["compile_s"] = None  # nothing compiles: the first call's extra time is in first_call_s
        results.add(
            **common, note=note,
            vae_decode_dtype="float32" if pipe.settings.vae_upcast else str(pipe.sdxl.vae.dtype).removeprefix(
                "torch."),
            **timing, flops_per_image_t=per_image / 1e12 if per_image else None, achieved_tflops=achieved,
            peak_bf16_tflops=peak, share_of_peak_pct=achieved / peak * 100 if achieved and peak else None,
            matmul_tflops=matmul, share_of_matmul_pct=achieved / matmul * 100 if achieved else None,
            max_diff_vs_reference=max_pixel_diff(reference_images.get(key), images),
            speedup_vs_reference=base / timing["s_per_image_median"] if base else None,
        )

    last = len(ladder) - 1
    # 1. the reference path; its eager model also counts the FLOPs of the other configurations
    pipe = build_pipeline(arch, device, settings(0))
    measure(pipe, "reference", steps, True, 1)
    if not over_budget():
        reference_settings = pipe.settings  # the same eager model, IdentityNet on the conditional half
        pipe.settings = replace(reference_settings, identitynet_cond_only=True)
        for variant in ("", *(name for name, _ in VARIANTS)):
            probe = make_items(pipe, 1, size, size, 5.0, variant)
            flops[(steps, True, True, variant)] = count_flops(pipe, probe, make_options(size, steps, True, variant))
        pipe.settings = reference_settings
    measure(pipe, "reference", fast_steps, False, 1)
    for variant, _ in VARIANTS:
        measure(pipe, "reference", steps, True, 1, variant)
    del pipe
    free(device)
    # 2. the ladder, one setting more at each rung; the last rung is "all of them"
    for index in range(1, last + 1):
        rung = ladder[index][0] if index < last else "all"
        compiled = settings(index).compile != "off"
        if over_budget(compile_reserve if compiled else 0.0):
            results.add(case=f"{rung}@{steps}steps_cfg_b1", rung=rung, status="skipped: time budget")
            continue
        pipe = build_pipeline(arch, device, settings(index))
        measure(pipe, rung, steps, True, 1)
        if index == last:
            measure(pipe, rung, fast_steps, False, 1)
            for variant, _ in VARIANTS:
                measure(pipe, rung, steps, True, 1, variant)
            for batch in batches:
                if batch != 1:
                    measure(pipe, rung, steps, True, batch)
        del pipe
        free(device)
    face = run_face(out, device, repeats=1 if tiny else max(repeats, 3), images=2 if tiny else 8,
                    skip=over_budget())
    # 3. lowest priority: the reference's own throughput at larger batches
    extra = [b for b in batches if b != 1]
    if extra and not over_budget():
        pipe = build_pipeline(arch, device, settings(0))
        for batch in extra:
            measure(pipe, "reference", steps, True, batch)
        del pipe
        free(device)
    results.footer = (f"Wall time of the whole run: {time.perf_counter() - started_all:.1f} s (budget {budget_s:.0f} s). "
                      f"Ladder: {' -> '.join(name for name, _ in ladder)}; 'all' is the last rung.")
    results.close()
    return results, face


def run_face(out: Path, device, *, repeats: int, images: int = 8, skip: bool = False) -> Results:
    """ms per photo: analyze() photo by photo vs analyze_batch() (one recognition call)."""
    results = Results(out, "face", FACE_COLUMNS, repeats=repeats, warmup=1, optional=("speedup",),
                      title="Face stage (fixture ONNX models): per photo vs batched recognition")
    if skip:
        results.add(case="face", status="skipped: time budget")
    else:
        # insightface reads the detector file again for each new input size: the folder lives as long as the run
        with tempfile.TemporaryDirectory(prefix="ib-face-") as folder:
            _time_face(results, Path(folder), repeats=repeats, images=images)
    results.close()
    return results


def _time_face(results: Results, folder: Path, *, repeats: int, images: int) -> None:
    try:
        from pipeline.face import FaceAnalyzer
        from pipeline.fixtures import write_detector, write_recognizer

        write_detector(folder / "scrfd_10g_bnkps.onnx")
        write_recognizer(folder / "glintr100.onnx")
        analyzer = FaceAnalyzer(folder, providers="auto")
    except Exception as error:  # e.g. insightface not installed on the device machine
        results.add(case="face", status=f"skipped: {type(error).__name__}: {str(error)[:160]}")
        return
    from .images import synthetic_face

    photos = [synthetic_face((512, 512), centre=(160 + 24 * k, 200 + 16 * k), radius=60 + 4 * k) for k in
              range(images)]
    providers = ",".join(analyzer.active_providers)

    def per_photo() -> None:
        for photo in photos:
            analyzer.analyze(photo)

    def batched() -> None:
        analyzer.analyze_batch(photos)

    timings: dict[str, list[float]] = {}
    for name, fn in (("analyze", per_photo), ("analyze_batch", batched)):
        fn()  # warm-up
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - started) * 1000 / images)
        timings[name] = runs
    base = summarize(timings["analyze"])["median"]
    for name, runs in timings.items():
        stats = summarize(runs)
        results.add(case=f"face_{name}", method=name, providers=providers, images=images, image_size="512x512",
                    ms_per_image_median=stats["median"], ms_per_image_min=stats["min"],
                    ms_per_image_max=stats["max"], ms_per_image_spread_pct=stats["spread_pct"],
                    speedup=base / stats["median"] if stats["median"] else None)
