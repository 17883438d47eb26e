"""What the Postprocessor spends per image on the CPU besides storing it: the output safety
check, the invisible watermark (mark, and the read-back that records ``watermarked``), the
encoding and the C2PA manifest (signing the encoded file), at the output size (default
1024x1024).

The safety check runs the published architecture (CLIP ViT-L/14 at 224 px, 768-wide
projection, 17 + 3 concepts) with random weights unless ``--weights`` names a root with the
real ``safety_checker/``: its time depends on the architecture, not the weights."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import Results, summarize

COLUMNS = ("size", "images", "step", "ms_per_image_median", "ms_per_image_min", "checker")


def published_size_checker():
    """The Stable Diffusion safety checker's architecture (CompVis/stable-diffusion-safety-
    checker's config), random weights."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from pipeline.safety import SafetyChecker

    config = CLIPConfig(vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
                        projection_dim=768)
    model = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return SafetyChecker(model, processor)


def run_postprocess(out: Path, *, size: int, images: int, repeats: int, weights: str | None) -> Results:
    import io

    from PIL import Image

    from pipeline.safety import SafetyChecker
    from pipeline.watermark import Watermark
    from service.store import encode

    from .watermark import photos

    import tempfile

    from pipeline.provenance import ContentCredentials, Signing, make_test_chain

    with tempfile.TemporaryDirectory() as folder:  # a throwaway CA: signing costs the same with any EC P-256 key
        chain = make_test_chain(folder, name="instantid bench")
        credentials = ContentCredentials(Signing.from_files(chain.key, chain.cert), "instantid")
    settings = {"method": "InstantID", "steps": 30, "guidance_scale": 5.0, "seed": 1, "width": size, "height": size}
    checker = SafetyChecker.from_weights(weights) if weights else published_size_checker()
    which = f"{weights}/safety_checker" if weights else "published size, random weights"
    pictures = (photos(size, min(images, 6)) * images)[:images]
    mark = Watermark()
    results = Results(out, "postprocess", COLUMNS, repeats=repeats, warmup=1,
                      title=f"Postprocessor work per image on the CPU ({size}x{size})")
    checker.flags(pictures[:1])  # warm-up
    def as_the_postprocessor_does():  # check, mark, encode, read the mark back from the file, sign
        flags = checker.flags(pictures)
        for picture, _ in zip(pictures, flags):
            data = encode(mark.mark(picture, "g_" + "a" * 22), "png", 90)
            mark.read(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            credentials.sign(data, "image/png", settings)

    encoded = {fmt: [encode(p, fmt, 90) for p in pictures] for fmt in ("png", "jpeg", "webp")}

    steps = {
        "safety_check": lambda: checker.flags(pictures),
        "watermark_mark": lambda: [mark.mark(p, "g_" + "a" * 22) for p in pictures],
        "watermark_read": lambda: [mark.read(p) for p in pictures],
        "encode_png": lambda: [encode(p, "png", 90) for p in pictures],
        "encode_jpeg_q90": lambda: [encode(p, "jpeg", 90) for p in pictures],
        "encode_webp_q90": lambda: [encode(p, "webp", 90) for p in pictures],
        **{f"c2pa_sign_{fmt}": (lambda fmt=fmt: [credentials.sign(d, f"image/{fmt}", settings)
                                                 for d in encoded[fmt]]) for fmt in encoded},
        "all_png": as_the_postprocessor_does,
    }
    for step, run in steps.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) * 1000 / len(pictures))
        stats = summarize(times)
        results.add(case=step, size=size, images=len(pictures), step=step,
                    ms_per_image_median=round(stats["median"], 1), ms_per_image_min=round(stats["min"], 1),
                    checker=which)
    results.close()
    return results
