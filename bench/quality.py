"""Identity fidelity per setting (``python -m bench quality``; the same evaluation as
``instantid eval``, :mod:`pipeline.evaluation`): face similarity with antelopev2 and, when
the weights root has one, a second recogniser (``eval/face/``); the share of outputs with a
face; CLIP score (``eval/clip/``); seconds per image after a warm-up render. One row per
setting in ``quality.csv``, one per image in ``quality_cases.csv``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from pipeline.eval_inputs import Identity, Setting
from pipeline.evaluation import CASE_COLUMNS, CASE_OPTIONAL, SUMMARY_COLUMNS, SUMMARY_OPTIONAL, evaluate

from .common import Results


def run_quality(out: Path, weights: str | Path, identities: Sequence[Identity], prompts: Sequence[str],
                settings: Sequence[Setting], *, seed: int, size: int | None, steps: int | None, device: str = "auto",
                providers: str = "auto", save_images: bool = False, people: int = 0) -> tuple[Results, Results]:
    images = len(identities) * len(prompts)
    summary = Results(out, "quality", SUMMARY_COLUMNS, optional=SUMMARY_OPTIONAL, repeats=images, warmup=1,
                      table=[c for c in SUMMARY_COLUMNS if c != "setting"],
                      title=f"Identity fidelity: {len(identities)} identities x {len(prompts)} prompts, each setting")
    cases = Results(out, "quality_cases", CASE_COLUMNS, optional=CASE_OPTIONAL, repeats=1, warmup=0,
                    table=["face_found", "face_sim", "face_sim2", "leak_sim", "clip_score", "seconds"],
                    title="Identity fidelity per image")

    def add_setting(result) -> None:
        for row in result.rows():
            summary.add(case=result.setting.name + (f" ({row['people']} people)" if row["people"] > 1 else ""), **row)
        for case in result.cases + result.group_cases:
            where = f"{case.group}[{case.region}]" if case.group else case.identity
            cases.add(case=f"{case.setting}/{where}/{case.prompt_index}", **case.row())

    evaluation = evaluate(weights, identities, prompts, settings, seed=seed, size=size, steps=steps, device=device,
                          providers=providers, on_setting=add_setting, people=people,
                          images_dir=Path(out) / "quality_images" if save_images else None)
    summary.footer = cases.footer = "\n".join(f"- {note}" for note in evaluation.notes)
    summary.close()
    cases.close()
    return summary, cases


def run_from_args(args, weights: str | Path) -> Results:
    """``python -m bench quality``: the evaluation's flags as ``instantid eval`` takes them;
    ``--smallest``: 64x64, 1 step, the ``default`` setting, one prompt (unless given)."""
    from pipeline.errors import InstantIDError
    from pipeline.eval_inputs import DEFAULT_PROMPTS, parse_settings, read_identities, read_prompts

    small = args.smallest
    try:
        identities = read_identities(args.identities)
        prompts = read_prompts(args.prompts) if args.prompts or not small else list(DEFAULT_PROMPTS[:1])
        settings = parse_settings(args.settings or (["default"] if small and not args.optimize else None),
                                  args.optimize, root=weights)
        summary, _ = run_quality(args.out, weights, identities, prompts, settings, seed=args.seed,
                                 size=args.size or (64 if small else None), steps=args.steps or (1 if small else None),
                                 device=args.device, providers=args.providers, save_images=args.save_images,
                                 people=args.people)
    except InstantIDError as error:
        print(f"bench quality: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return summary
