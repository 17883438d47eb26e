"""What an identity-fidelity evaluation renders: identities (face photos) x prompts, under
named settings. Read and checked here, before any model is loaded; every error names the
command-line flag it came from (``--identities``, ``--prompts``, ``--settings``,
``--optimize``).

Identities: a folder of photos (one identity each, named by the file's stem), or a JSON
list / CSV table of ``{name, photo}`` (photo paths relative to the manifest's folder);
default: scikit-image's astronaut photo (a smoke test, not an evaluation).

Prompts: a text file (one prompt a line; blank lines and ``#`` comments skipped) or a JSON
list of strings; default :data:`DEFAULT_PROMPTS`, eight styles.

Settings (``--settings NAME[,NAME...]``; ``A+B`` combines parts into one setting):
``default`` (the faithful path), ``fast`` and ``fastest`` (the bundles of
:mod:`pipeline.optimize`), ``lcm``/``lightning``/``hyper`` (the few-step presets, available
when the weights root holds their LoRA as ``few_step/<kind>.safetensors``),
``scheduler=NAME``, and any single ``--optimize`` name (``bf16``, ``identitynet_cond_only``,
``compile=full``...). ``--optimize SPEC`` (repeatable) adds one setting with exactly
``instantid generate --optimize``'s syntax, commas included.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .errors import InvalidParameter
from .optimize import BUNDLES, FEW_STEP_PRESETS, FewStep, Optimizations, known_names
from .schedulers import SCHEDULERS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEW_STEP_DIR = "few_step"  # few_step/<kind>.safetensors: a step-distilled LoRA for that preset
DEFAULT_SETTINGS = ("default", "fast", "fastest")  # and every few-step preset the root has
DEFAULT_STEPS, DEFAULT_SIZE, DEFAULT_GUIDANCE = 30, 1024, 5.0

# Eight styles, one prompt each (a person in every one: the face must survive the style).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of a person, portrait, natural light, 85mm, high detail",
    "a watercolor painting of a person, loose washes, soft edges, paper texture",
    "an anime illustration of a person, cel shading, clean line art, vibrant colors",
    "an oil painting of a person, classical portrait, visible brush strokes, warm palette",
    "a cyberpunk portrait of a person, neon lights, rain at night, futuristic city",
    "a pencil sketch of a person, graphite, cross-hatching, white paper",
    "a film noir still of a person, black and white, dramatic shadows, 1940s",
    "a 3D render of a person, stylized character, soft studio lighting, octane render",
)


@dataclass(frozen=True)
class Identity:
    name: str
    photo: Any  # a path, or a picture (the built-in default)


@dataclass(frozen=True)
class Setting:
    """One way of rendering: speed settings (one pipeline each) and generation parameters
    (steps, guidance, scheduler) of its own."""

    name: str
    optimizations: Optimizations = field(default_factory=Optimizations)
    params: dict = field(default_factory=dict)

    def render_params(self, steps: int, guidance_scale: float = DEFAULT_GUIDANCE) -> dict:
        """Steps, guidance and scheduler: a few-step preset's own (its step count is kept);
        ``steps``/``guidance_scale`` where the setting has none; the setting's scheduler."""
        base = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "scheduler": "euler"}
        return {**base, **self.optimizations.param_defaults(), **self.params}


# ----------------------------------------------------------------------------- identities


def default_identities() -> list[Identity]:
    from skimage import data

    return [Identity("astronaut", Image.fromarray(data.astronaut()))]


def read_identities(source: str | Path | None, flag: str = "--identities") -> list[Identity]:
    """Identities from a folder of photos, a JSON list or a CSV table of ``{name, photo}``."""
    if source is None:
        return default_identities()
    path = Path(source)
    if path.is_dir():
        photos = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not photos:
            raise InvalidParameter(flag, f"no photos ({', '.join(IMAGE_SUFFIXES)}) in the folder {path}")
        return _unique([Identity(p.stem, p) for p in photos], flag)
    if not path.is_file():
        raise InvalidParameter(flag, f"no such file or folder: {path}")
    try:
        if path.suffix.lower() == ".json":
            entries = json.loads(path.read_text())
        elif path.suffix.lower() == ".csv":
            with open(path, newline="") as handle:
                entries = list(csv.DictReader(handle))
        else:
            raise InvalidParameter(flag, f"{path}: expected a folder of photos, a .json or a .csv manifest")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise InvalidParameter(flag, f"{path}: unreadable manifest ({error})") from None
    if not isinstance(entries, list) or not entries:
        raise InvalidParameter(flag, f"{path}: expected a non-empty list of {{name, photo}}")
    identities = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("photo"):
            raise InvalidParameter(flag, f"{path}: entry {k} has no photo")
        photo = path.parent / str(entry["photo"]).strip()
        if not photo.is_file():
            raise InvalidParameter(flag, f"{path}: entry {k}: no photo at {photo}")
        identities.append(Identity(str(entry.get("name") or photo.stem).strip(), photo))
    return _unique(identities, flag)


def _unique(identities: list[Identity], flag: str) -> list[Identity]:
    names = [i.name for i in identities]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidParameter(flag, f"identity names must be unique: {', '.join(repeated)}")
    return identities


def read_prompts(source: str | Path | None, flag: str = "--prompts") -> list[str]:
    if source is None:
        return list(DEFAULT_PROMPTS)
    path = Path(source)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidParameter(flag, f"cannot read {path}: {error}") from None
    if path.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidParameter(flag, f"{path}: not JSON ({error})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise InvalidParameter(flag, f"{path}: expected a JSON list of strings")
    else:
        prompts = [line for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise InvalidParameter(flag, f"{path}: no prompts")
    return prompts


# ----------------------------------------------------------------------------- settings


def available_presets(root: str | Path | None) -> dict[str, Path]:
    """The few-step presets a local weights root holds a LoRA for: ``few_step/<kind>.safetensors``."""
    if root is None or not Path(root).is_dir():
        return {}
    folder = Path(root) / FEW_STEP_DIR
    return {kind: folder / f"{kind}.safetensors" for kind in FEW_STEP_PRESETS
            if (folder / f"{kind}.safetensors").is_file()}


def known_settings(root: str | Path | None) -> str:
    presets = available_presets(root)
    names = ["default", *BUNDLES, *(f"{k} (needs {FEW_STEP_DIR}/{k}.safetensors)" if k not in presets else k
                                    for k in FEW_STEP_PRESETS), f"scheduler={{{'|'.join(SCHEDULERS)}}}"]
    others = [n for n in known_names() if n not in BUNDLES]
    return f"{', '.join(names)}, or an --optimize name ({', '.join(others)})"


def parse_settings(settings: Sequence[str] | None = None, optimize: Sequence[str] = (), *,
                   root: str | Path | None = None) -> list[Setting]:
    """Settings from ``--settings`` values (each a comma list of names; ``A+B`` combines)
    and ``--optimize`` specs (one setting each). Nothing given: ``default``, ``fast``,
    ``fastest`` and every few-step preset the root holds."""
    presets = available_presets(root)
    names = [n.strip() for text in (settings or ()) for n in text.split(",") if n.strip()]
    if not names and not optimize:
        names = [*DEFAULT_SETTINGS, *presets]
    out = [_setting(name, presets, root) for name in names]
    for spec in optimize:
        try:
            out.append(Setting(spec.strip(), Optimizations.parse(spec)))
        except InvalidParameter as error:
            raise InvalidParameter("--optimize", f"{spec!r}: {error.reason}") from None
    if not out:
        raise InvalidParameter("--settings", "no settings to evaluate")
    repeated = sorted({s.name for s in out if [t.name for t in out].count(s.name) > 1})
    if repeated:
        raise InvalidParameter("--settings", f"a setting is named twice: {', '.join(repeated)}")
    return out


def _setting(name: str, presets: dict[str, Path], root) -> Setting:
    tokens: list[str] = []
    params: dict[str, Any] = {}
    few_step = None
    for part in (p.strip() for p in name.split("+")):
        key, has_value, value = part.partition("=")
        if part == "default":
            continue
        if key == "scheduler" and has_value:
            if value not in SCHEDULERS:
                raise InvalidParameter("--settings", f"{name!r}: unknown scheduler {value!r}; one of "
                                                     f"{', '.join(SCHEDULERS)}")
            params["scheduler"] = value
        elif part in FEW_STEP_PRESETS:
            if part not in presets:
                raise InvalidParameter("--settings", f"{name!r}: the few-step preset {part} needs its LoRA at "
                                                     f"{FEW_STEP_DIR}/{part}.safetensors in the weights root")
            few_step = FewStep(kind=part, lora=str(presets[part]))
        else:
            tokens.append(part)
    try:
        opts = Optimizations.parse(tokens)
    except InvalidParameter as error:
        if error.reason.startswith("unknown setting"):
            raise InvalidParameter("--settings", f"unknown setting {name!r}; known: {known_settings(root)}") from None
        raise InvalidParameter("--settings", f"{name!r}: {error.message}") from None
    if few_step is not None:
        opts = Optimizations.parse({**opts.model_dump(), "few_step": few_step.model_dump()})
    return Setting(name, opts, params)


def check_render_size(size: int | None, steps: int | None, seed: int) -> None:
    if size is not None and (size < 8 or size % 8):
        raise InvalidParameter("--size", f"must be a positive multiple of 8, got {size}")
    if steps is not None and steps < 1:
        raise InvalidParameter("--steps", f"must be at least 1, got {steps}")
    if not 0 <= seed < 2**63:
        raise InvalidParameter("--seed", "must be in [0, 2**63)")


def add_arguments(parser) -> None:
    """The evaluation's flags (``instantid eval`` and ``python -m bench quality`` take the same)."""
    parser.add_argument("--identities", help="a folder of face photos (one identity each), or a JSON list / CSV "
                                             "table of {name, photo} (default: scikit-image's astronaut)")
    parser.add_argument("--prompts", help="a text file, one prompt a line, or a JSON list (default: 8 styles)")
    parser.add_argument("--settings", action="append", metavar="NAME[,NAME]",
                        help="default, fast, fastest, lcm|lightning|hyper (with few_step/<kind>.safetensors in the "
                             "weights root), scheduler=NAME, any --optimize name; A+B combines (repeatable; default: "
                             "default,fast,fastest and the presets the root has)")
    parser.add_argument("--optimize", action="append", default=[], metavar="SPEC",
                        help="one more setting, as instantid generate --optimize takes it (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="case k renders with seed + k, the same in every setting")
    parser.add_argument("--size", type=int, help=f"image side (default {DEFAULT_SIZE})")
    parser.add_argument("--steps", type=int, help=f"steps of settings without their own (default {DEFAULT_STEPS}; "
                                                  "few-step presets keep theirs)")
    parser.add_argument("--people", type=int, default=0, metavar="N",
                        help="also render every identity with others, N (2-4) a picture, each in a box, and score "
                             "each region: its own identity and the others' (leak_sim)")
    parser.add_argument("--save-images", action="store_true", help="also keep every output image (under OUT)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--providers", default="auto", help="onnxruntime providers for the face models")
