"""The invisible watermark: what survives what, and what it costs.

Natural photos (scikit-image's sample pictures, scaled to the output size) are marked as the
Postprocessor marks outputs, each with several generation ids (whether a change spares a
mark depends on its bits too), then changed as a picture is changed after it leaves the
service: the service's own JPEG (4:4:4 at quality 90), JPEG at quality 90/75/50 as Pillow
writes it by default (4:2:0 chroma), resized to 0.75 and 0.5, 10 % cropped off the edges.
One row per change: the share of pictures whose whole payload (the id, its CRC) still reads
back. Plus, per picture size, the mark's pixel cost (PSNR) and its CPU time, and those of
the read."""

from __future__ import annotations

import io
import secrets
import time
from pathlib import Path

import numpy as np

from .common import Results, summarize

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
COLUMNS = ("change", "size", "pictures", "survived", "survival_rate")
COST_COLUMNS = ("size", "pictures", "psnr_db_median", "psnr_db_min", "mark_ms_median", "read_ms_median")


def _jpeg(quality: int, subsampling: int = -1):
    def change(image):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
        return np.asarray(Image.open(buffer).convert("RGB"))
    return change


def _resize(factor: float):
    def change(image):
        from PIL import Image

        height, width = image.shape[:2]
        return np.asarray(Image.fromarray(image).resize((round(width * factor), round(height * factor)),
                                                        Image.BICUBIC))
    return change


def _crop(share: float):
    def change(image):
        height, width = image.shape[:2]
        dy, dx = round(height * share / 2), round(width * share / 2)
        return image[dy:height - dy, dx:width - dx]
    return change


CHANGES = {"none": lambda image: image, "service_jpeg_q90": _jpeg(90, subsampling=0), "jpeg_q90": _jpeg(90),
           "jpeg_q75": _jpeg(75), "jpeg_q50": _jpeg(50), "resize_0.75": _resize(0.75), "resize_0.5": _resize(0.5),
           "crop_10pct": _crop(0.10)}


def photos(size: int, count: int) -> list[np.ndarray]:
    from PIL import Image
    from skimage import data

    return [np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.BICUBIC))
            for name in PHOTOS[:count]]


def run_watermark(out: Path, *, sizes: list[int], count: int, ids: int = 1) -> tuple[Results, Results]:
    """``count`` photos at each size, each marked with ``ids`` different generation ids
    (whether a change spares a mark depends on its bits too)."""
    from pipeline.watermark import Watermark

    mark = Watermark()
    survival = Results(out, "watermark", COLUMNS, title="Invisible watermark: the share of marked pictures whose "
                                                         "payload reads back after a change")
    cost = Results(out, "watermark_cost", COST_COLUMNS, title="Invisible watermark: pixel cost and CPU time")
    for size in sizes:
        marked, psnrs, mark_ms, read_ms = [], [], [], []
        for image in [photo for photo in photos(size, count) for _ in range(ids)]:
            gid = "g_" + secrets.token_urlsafe(16)
            started = time.perf_counter()
            result = mark.mark(image, gid)
            mark_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            mark.read(result)
            read_ms.append((time.perf_counter() - started) * 1000)
            psnrs.append(10 * np.log10(255 ** 2 / np.mean((result.astype(np.float64) - image) ** 2)))
            marked.append((gid, result))
        psnr = summarize(psnrs)
        cost.add(case=f"{size}x{size}", size=size, pictures=len(marked), psnr_db_median=round(psnr["median"], 1),
                 psnr_db_min=round(psnr["min"], 1), mark_ms_median=round(summarize(mark_ms)["median"], 1),
                 read_ms_median=round(summarize(read_ms)["median"], 1))
        for change_name, change in CHANGES.items():
            survived = sum(mark.read(change(image)).names(gid) for gid, image in marked)
            survival.add(case=f"{change_name}_{size}", change=change_name, size=size, pictures=len(marked),
                         survived=survived, survival_rate=round(survived / len(marked), 2))
    survival.close()
    cost.close()
    return survival, cost
