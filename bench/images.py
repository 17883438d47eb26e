"""Synthetic inputs: a face photo the face stage finds a face in (a bright disc on a dark
ground, as the repository's fixture detector sees faces; real models see one in any
portrait), and its data: URL for the HTTP API."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw


def synthetic_face(size: tuple[int, int] = (256, 256), centre: tuple[int, int] | None = None, radius: int = 50,
                   color: tuple[int, int, int] = (240, 220, 200)) -> Image.Image:
    width, height = size
    cx, cy = centre or (width // 2, height // 2)
    image = Image.new("RGB", size, (20, 20, 20))
    ImageDraw.Draw(image).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
