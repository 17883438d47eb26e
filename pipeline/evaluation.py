"""Identity fidelity, built in: every identity x prompt rendered under each setting, each
output scored (:mod:`pipeline.scoring`), one summary row per setting.

    from pipeline.evaluation import evaluate
    from pipeline.eval_inputs import parse_settings, read_identities
    result = evaluate("W", read_identities("faces/"), ["a watercolor portrait"],
                      parse_settings(["default,fast"], root="W"), seed=0, size=1024, steps=30)
    result.summary_rows()   # one dict per setting (SUMMARY_COLUMNS)
    result.case_rows()      # one dict per image (CASE_COLUMNS)

Per setting: its pipeline is loaded (settings with the same speed settings share one), the
identities are analysed by that pipeline's face stage, one warm-up render (the first case)
is made and discarded, then every case is rendered and timed (the render alone: face
analysis and scoring are outside the clock) and scored. With ``compile`` on, the warm-up
holds the compilation: ``compile_s`` is the warm-up's time beyond a timed render's.
Case ``k`` (identities outer, prompts inner) renders with ``seed + k`` in every setting, so
settings are compared on the same noise; the same seed gives the same numbers.

``instantid eval`` (:mod:`pipeline.cli`) and ``python -m bench quality`` write these rows.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import InvalidParameter
from .eval_inputs import DEFAULT_SIZE, DEFAULT_STEPS, Identity, Setting, check_render_size
from .eval_people import check_people, render_groups
from .optimize import Optimizations
from .scoring import CaseScore, Reference, Scorer

SUMMARY_COLUMNS = ("setting", "people", "optimizations", "scheduler", "steps", "guidance_scale", "size",
                   "identities", "prompts", "images", "face_found", "face_sim_mean", "face_sim_std", "face_sim2_mean",
                   "face_sim2_std", "leak_sim_mean", "leak_sim_std", "clip_score_mean", "clip_score_std",
                   "s_per_image", "warmup_s", "compile_s", "load_s")
# empty when nothing was measured: no face found, no second recogniser, no other person, no CLIP, compile off
SUMMARY_OPTIONAL = ("face_sim_mean", "face_sim_std", "face_sim2_mean", "face_sim2_std", "leak_sim_mean",
                    "leak_sim_std", "clip_score_mean", "clip_score_std", "compile_s")
CASE_COLUMNS = ("setting", "people", "group", "region", "identity", "prompt_index", "prompt", "seed", "face_found",
                "det_score", "face_sim", "face_sim2", "leak_sim", "clip_cosine", "clip_score", "seconds")
CASE_OPTIONAL = ("group", "region", "det_score", "face_sim", "face_sim2", "leak_sim", "clip_cosine", "clip_score")

Loader = Callable[[Optimizations], object]  # speed settings -> an InstantIDPipeline


@dataclass
class Case:
    setting: str
    identity: str
    prompt_index: int
    prompt: str
    seed: int
    score: CaseScore
    seconds: float
    people: int = 1  # several people a picture: this case is one region of it
    group: str | None = None  # the picture's identities, "a+b", in region order
    region: int | None = None
    leak_sim: float | None = None  # the region's highest similarity to another identity of the picture

    def row(self) -> dict:
        s = self.score
        return {"setting": self.setting, "people": self.people, "group": self.group, "region": self.region,
                "identity": self.identity, "prompt_index": self.prompt_index,
                "prompt": self.prompt, "seed": self.seed, "face_found": s.face_found,
                "det_score": _round(s.det_score), "face_sim": _round(s.face_sim), "face_sim2": _round(s.face_sim2),
                "leak_sim": _round(self.leak_sim), "clip_cosine": _round(s.clip_cosine),
                "clip_score": _round(s.clip_score), "seconds": round(self.seconds, 4)}


@dataclass
class SettingResult:
    setting: Setting
    params: dict
    size: int
    identities: int
    prompts: int
    load_s: float
    warmup_s: float
    cases: list[Case] = field(default_factory=list)
    people: int = 0  # several people a picture (pipeline.eval_people): 0 for none
    group_cases: list[Case] = field(default_factory=list)  # one per region
    group_warmup_s: float = 0.0

    def rows(self) -> list[dict]:
        """The one-person row, and the several-people row when there is one."""
        rows = [self.row()]
        if self.group_cases:
            rows.append(self.row(self.group_cases, self.people, self.group_warmup_s))
        return rows

    def row(self, cases: list[Case] | None = None, people: int = 1, warmup_s: float | None = None) -> dict:
        """The setting's summary: face similarity (mean, std) over the faces found, the share
        of faces found, (several people) similarity to the other identities, CLIP score,
        seconds per image."""
        cases = self.cases if cases is None else cases
        warmup_s = self.warmup_s if warmup_s is None else warmup_s
        scores = [c.score for c in cases]
        images = {(c.group, c.prompt_index, c.identity if people == 1 else None): c.seconds for c in cases}
        seconds = float(np.mean(list(images.values())))
        compiled = self.setting.optimizations.compile != "off"
        row = {"setting": self.setting.name, "people": people, "optimizations": self.setting.optimizations.label(),
               "scheduler": self.params["scheduler"], "steps": self.params["num_inference_steps"],
               "guidance_scale": self.params["guidance_scale"], "size": self.size, "identities": self.identities,
               "prompts": self.prompts, "images": len(images),
               "face_found": round(sum(s.face_found for s in scores) / len(scores), 4),
               "s_per_image": round(seconds, 4), "warmup_s": round(warmup_s, 3),
               "compile_s": round(max(warmup_s - seconds, 0.0), 3) if compiled else None,
               "load_s": round(self.load_s, 3) if people == 1 else 0.0}
        for name in ("face_sim", "face_sim2", "clip_score"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([getattr(s, name) for s in scores])
        row["leak_sim_mean"], row["leak_sim_std"] = mean_std([c.leak_sim for c in cases])
        return row


@dataclass
class Evaluation:
    settings: list[SettingResult]
    notes: list[str]

    def summary_rows(self) -> list[dict]:
        return [row for s in self.settings for row in s.rows()]

    def case_rows(self) -> list[dict]:
        return [c.row() for s in self.settings for c in s.cases + s.group_cases]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and (population) standard deviation of the values measured; ``None`` when none
    was (no face found: no similarity, not a similarity of 0)."""
    measured = [float(v) for v in values if v is not None]
    if not measured:
        return None, None
    return round(float(np.mean(measured)), 4), round(float(np.std(measured)), 4)


def _round(value: float | None, places: int = 6) -> float | None:
    return None if value is None else round(float(value), places)


def default_loader(weights, *, device: str = "auto", providers: str = "auto") -> Loader:
    def load(optimizations: Optimizations):
        from .pipeline import InstantIDPipeline

        return InstantIDPipeline.from_weights(weights, device=device, providers=providers,
                                              optimizations=optimizations)

    return load


def evaluate(
    weights: str | Path,
    identities: Sequence[Identity],
    prompts: Sequence[str],
    settings: Sequence[Setting],
    *,
    seed: int = 0,
    size: int | None = None,
    steps: int | None = None,
    device: str = "auto",
    providers: str = "auto",
    scorer: Scorer | None = None,
    loader: Loader | None = None,
    images_dir: str | Path | None = None,
    on_setting: Callable[[SettingResult], None] | None = None,
    on_case: Callable[[Case], None] | None = None,
    people: int = 0,
) -> Evaluation:
    """Render and score every identity x prompt under each setting (see the module
    docstring). ``weights``: a weights root, where the scoring models are looked for
    (``antelopev2/``; in a local root also ``eval/face/`` and ``eval/clip/``). ``loader``:
    loads a pipeline for speed settings (default: :meth:`InstantIDPipeline.from_weights` of
    ``weights``); ``scorer``: the scoring models (default: :meth:`Scorer.from_root`).
    ``images_dir``: write each output there as ``<setting>/<identity>-<prompt index>.png``.
    ``on_setting``/``on_case``: called as each is done (to write rows as they come).
    ``people``: also render groups of that many identities a picture and score each
    region (:mod:`pipeline.eval_people`), after the one-person cases, seeds going on."""
    size = size or DEFAULT_SIZE
    steps = steps or DEFAULT_STEPS
    check_render_size(size, steps, seed)
    if not identities or not prompts or not settings:
        raise InvalidParameter("evaluate", "needs at least one identity, prompt and setting")
    check_people(people, len(identities))
    from .devices import resolve_device

    device_name = str(resolve_device(device))
    scorer = scorer or Scorer.from_root(weights, providers=providers, device=device_name)
    references: dict[str, Reference] = {i.name: scorer.reference(i.photo, field=f"--identities {i.name}")
                                        for i in identities}
    loader = loader or default_loader(weights, device=device_name, providers=providers)
    cases = [(identity, k, prompt) for identity in identities for k, prompt in enumerate(prompts)]
    results: list[SettingResult] = []
    pipe, pipe_opts = None, None
    for setting in settings:
        load_s = 0.0
        if pipe is None or setting.optimizations != pipe_opts:
            pipe = None  # the previous pipeline goes before the next one loads
            _release()
            started = time.perf_counter()
            pipe, pipe_opts = loader(setting.optimizations), setting.optimizations
            load_s = time.perf_counter() - started
            # the identities as this pipeline's face stage sees them (a setting may change that stage:
            # face_providers, face_batch); a pipeline loaded without one: the scorer's (the same model)
            analyzer = pipe.face or scorer.face
            faces = {i.name: analyzer.analyze_many([i.photo], names=[f"--identities {i.name}"]) for i in identities}
        params = setting.render_params(steps)
        render = _renderer(pipe, params, size)
        identity, _, prompt = cases[0]
        started = time.perf_counter()
        render(faces[identity.name], prompt, seed)  # warm-up (and compilation), discarded
        result = SettingResult(setting, params, size, len(identities), len(prompts), load_s,
                               time.perf_counter() - started)
        for k, (identity, index, prompt) in enumerate(cases):
            started = time.perf_counter()
            image = render(faces[identity.name], prompt, seed + k)
            seconds = time.perf_counter() - started
            if images_dir is not None:
                folder = Path(images_dir) / _file_name(setting.name)
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{_file_name(identity.name)}-{index}.png")
            case = Case(setting.name, identity.name, index, prompt, seed + k,
                        scorer.score(image, references[identity.name], prompt), seconds)
            result.cases.append(case)
            if on_case is not None:
                on_case(case)
        if people:
            def make_case(group, region, index, prompt, case_seed, score, leak, seconds, name=setting.name):
                return Case(name, group[region], index, prompt, case_seed, score, seconds, people=people,
                            group="+".join(group), region=region, leak_sim=leak)

            result.people = people
            result.group_cases, result.group_warmup_s = render_groups(
                pipe, scorer, faces, references, prompts, people, params, size, seed + len(cases), make_case,
                on_case=on_case,
                images_dir=Path(images_dir) / _file_name(setting.name) / "people" if images_dir is not None else None)
        results.append(result)
        if on_setting is not None:
            on_setting(result)
    notes = scorer.notes()
    if people:
        notes.append(f"people={people} rows: {people} identities a picture, each face in its own box; face_found, "
                     "face_sim and face_sim2 per region (the face found in its box against its own identity); "
                     "leak_sim: a region's highest similarity to another identity of the same picture (lower is "
                     "better); s_per_image per picture")
    return Evaluation(results, notes)


def _renderer(pipe, params: dict, size: int):
    def render(face, prompt: str, seed: int):
        return pipe(face, prompt, seed=seed, width=size, height=size, num_images=1, **params).images[0]

    return render


def _release() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - a broken driver
        pass


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


# ----------------------------------------------------------------------------- the report


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Report:
    """``instantid eval``'s files: ``quality.csv`` (one row per setting, written as each
    setting ends), ``quality_cases.csv`` (one per image) and ``quality.md`` (the table, the
    machine, the notes). ``python -m bench quality`` writes the same columns through the
    benchmarks' writer."""

    def __init__(self, out: str | Path, *, title: str = "Identity fidelity") -> None:
        from .devices import hardware

        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = {**hardware(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.title, self.rows, self.notes = title, [], []
        for name, columns in (("quality", SUMMARY_COLUMNS), ("quality_cases", CASE_COLUMNS)):
            with open(self.out / f"{name}.csv", "w", newline="") as handle:
                csv.writer(handle).writerow([*columns, "hardware", "device", "date"])

    def add_setting(self, result: SettingResult) -> None:
        rows = result.rows()
        self.rows.extend(rows)
        self._append("quality", SUMMARY_COLUMNS, rows)
        self._append("quality_cases", CASE_COLUMNS, [c.row() for c in result.cases + result.group_cases])

    def _append(self, name: str, columns: Sequence[str], rows: list[dict]) -> None:
        with open(self.out / f"{name}.csv", "a", newline="") as handle:
            writer = csv.writer(handle)
            for row in rows:
                writer.writerow([_cell(row[c]) for c in columns] + [self.base[c] for c in ("hardware", "device",
                                                                                           "date")])

    def markdown(self) -> str:
        columns = [c for c in SUMMARY_COLUMNS if c != "setting"]
        lines = [f"### {self.title}", "", f"{self.base['hardware']}; device {self.base['device']}; {self.base['date']}",
                 "", "| setting | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {row['setting']} | " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def close(self, notes: Sequence[str]) -> Path:
        self.notes = list(notes)
        path = self.out / "quality.md"
        path.write_text(self.markdown())
        return path
