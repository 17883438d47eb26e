"""`make demo`: fixture weights, then one real generation from a photo shipped with
scikit-image (the astronaut), printing where the image is."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import main as cli

OUT = Path("out")


def main() -> int:
    weights = OUT / "demo-weights"
    if not (weights / "instantid" / "ip-adapter.bin").is_file():
        if cli(["fixtures", str(weights)]) != 0:
            return 1
    from skimage import data
    from PIL import Image

    photo = OUT / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    return cli([
        "generate", "--weights", str(weights), "--face", str(photo),
        "--prompt", "a portrait of an astronaut", "--style", "Watercolor",
        "--width", "512", "--height", "512", "--num-inference-steps", "20", "--seed", "42",
        "--out", str(OUT / "demo.png"),
    ])


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    sys.exit(main())
