"""Prompt styles: the reference demo's nine style names, with this project's own templates."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidParameter


@dataclass(frozen=True)
class Style:
    name: str
    positive: str  # "{prompt}" marks where the user's prompt goes
    negative: str


NO_STYLE = "(No style)"

STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style(NO_STYLE, "{prompt}", ""),
        Style(
            "Watercolor",
            "watercolor painting of {prompt}, loose wet-on-wet washes, soft bleeding edges, visible paper grain, "
            "delicate pigment blooms",
            "photograph, photorealistic, 3d render, hard edges, harsh contrast, digital art",
        ),
        Style(
            "Film Noir",
            "film noir still of {prompt}, black and white, high-contrast chiaroscuro lighting, venetian blind "
            "shadows, 1940s crime drama, grainy 35mm film",
            "color, saturated, bright daylight, cheerful, cartoon, anime",
        ),
        Style(
            "Neon",
            "{prompt}, lit by glowing neon signs at night, magenta and cyan rim light, rain-slick reflections, "
            "synthwave city atmosphere",
            "daylight, muted colors, washed out, dull, flat lighting",
        ),
        Style(
            "Jungle",
            "{prompt}, deep in a lush tropical rainforest, dense green foliage, hanging vines, shafts of humid "
            "light, exotic flowers",
            "desert, snow, city, urban, barren, dry",
        ),
        Style(
            "Mars",
            "{prompt}, standing on the surface of Mars, rust-red dunes and rocks, dusty orange sky, distant "
            "habitat domes, science fiction",
            "earth, green vegetation, ocean, blue sky, forest",
        ),
        Style(
            "Vibrant Color",
            "vibrant, colorful portrait of {prompt}, bold saturated palette, playful complementary colors, "
            "crisp studio light, pop art energy",
            "monochrome, black and white, desaturated, dull, grey, muted",
        ),
        Style(
            "Snow",
            "{prompt}, in a snowy winter landscape, falling snowflakes, frosted breath, cold blue light, "
            "knitted winter clothes",
            "summer, beach, desert, heat, tropical, green grass",
        ),
        Style(
            "Line art",
            "clean line art drawing of {prompt}, black ink outlines on white paper, minimal shading, elegant "
            "continuous strokes",
            "color, photograph, photorealistic, painting, heavy shading, 3d render",
        ),
    )
}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


_BY_SLUG = {_slug(name): name for name in STYLES}
_BY_SLUG[""] = NO_STYLE
_BY_SLUG["none"] = NO_STYLE


def style_names() -> list[str]:
    return list(STYLES)


def canonical_style(name: str | None) -> str:
    """The canonical name of a style given by its name or slug ("Film Noir", "film_noir")."""
    if name is None:
        return NO_STYLE
    found = _BY_SLUG.get(_slug(name))
    if found is None:
        raise InvalidParameter("style", f"unknown style {name!r}; choose one of {style_names()}")
    return found


def apply_style(style: str | None, prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
    """Fill ``style``'s template with the prompt and add its negative terms.

    An empty prompt stays allowed: without a style it stays empty (pure identity); with a
    style the template's subject becomes "a person", as the reference demo does. A ``None``
    negative prompt means "no negative prompt at all".
    """
    template = STYLES[canonical_style(style)]
    prompt = (prompt or "").strip()
    if template.name != NO_STYLE and not prompt:
        prompt = "a person"
    positive = template.positive.replace("{prompt}", prompt)
    negatives = [n for n in ((negative_prompt or "").strip(), template.negative) if n]
    return positive, (", ".join(negatives) if negatives else None)
