"""The identity-fidelity evaluation with several people in one picture (``--people N``).

Groups: with identities ``I_0..I_{n-1}`` and N people a picture, group ``g`` is
``I_g, I_{g+1}, ..., I_{g+N-1}`` (indices mod n), so each identity stands in every
position once; each group is rendered with every prompt. The picture is cut in N columns and
each person's face goes into a box in their column (:func:`layout`).

Each region is scored apart (:meth:`~pipeline.scoring.Scorer.score_regions`): the face found
in it (the box grown by a quarter of its size on each side) against its own identity
(``face_sim``, ``face_sim2``), and against each other identity of the picture: ``leak_sim``
is the highest of those similarities, how much of another person's identity the region took
on. CLIP scores the whole picture against its prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import InvalidParameter
from .people import MAX_PEOPLE

Box = tuple[int, int, int, int]


def check_people(people: int, identities: int) -> None:
    if people and not 2 <= people <= MAX_PEOPLE:
        raise InvalidParameter("--people", f"must be 2 to {MAX_PEOPLE} (0: one person a picture only), got {people}")
    if people > identities:
        raise InvalidParameter("--people", f"{people} people a picture needs at least {people} identities, "
                                           f"got {identities}")


def layout(people: int, width: int, height: int) -> list[Box]:
    """A face box per person: the picture in ``people`` columns, each box 80% of its
    column's width (as tall, at most 60% of the picture), from a quarter of the height down."""
    column = width / people
    side = min(0.8 * column, 0.6 * height)
    top = 0.25 * height
    boxes = []
    for k in range(people):
        centre = (k + 0.5) * column
        boxes.append((int(round(centre - side / 2)), int(round(top)), int(round(centre + side / 2)),
                      int(round(top + side))))
    return boxes


def groups(names: Sequence[str], people: int) -> list[list[str]]:
    """Group ``g``: ``people`` identities from the g-th on (see the module docstring)."""
    return [[names[(g + k) % len(names)] for k in range(people)] for g in range(len(names))]


def render_groups(pipe, scorer, faces: dict, references: dict, prompts: Sequence[str], people: int, params: dict,
                  size: int, first_seed: int, make_case: Callable, *,
                  images_dir: str | Path | None = None, on_case: Callable | None = None) -> tuple[list, float]:
    """Every group x prompt rendered and each region scored; case ``k`` (groups outer,
    prompts inner) renders with ``first_seed + k``. Returns the cases (one per region,
    built by ``make_case(group, region, prompt_index, prompt, seed, score, leak, seconds)``)
    and the warm-up's seconds (one render of the first case, discarded)."""
    boxes = layout(people, size, size)
    names = list(faces)

    def render(group: list[str], prompt: str, seed: int):
        entries = [{"face": faces[name], "box": list(box)} for name, box in zip(group, boxes)]
        return pipe(people=entries, prompt=prompt, seed=seed, width=size, height=size, num_images=1,
                    **params).images[0]

    all_groups = groups(names, people)
    started = time.perf_counter()
    render(all_groups[0], prompts[0], first_seed)
    warmup_s = time.perf_counter() - started
    cases = []
    work = [(group, index, prompt) for group in all_groups for index, prompt in enumerate(prompts)]
    for k, (group, index, prompt) in enumerate(work):
        started = time.perf_counter()
        image = render(group, prompt, first_seed + k)
        seconds = time.perf_counter() - started
        if images_dir is not None:
            folder = Path(images_dir)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{'+'.join(group)}-{index}.png")
        scores = scorer.score_regions(image, boxes, [references[name] for name in group], prompt)
        for region, (score, leak) in enumerate(scores):
            case = make_case(group, region, index, prompt, first_seed + k, score, leak, seconds)
            cases.append(case)
            if on_case is not None:
                on_case(case)
    return cases, warmup_s
