"""Identity fidelity (`instantid eval`, pipeline/evaluation.py): 2 identities x 2 prompts x 2
settings on fixture weights through the command, one case recomputed with the plain pipeline
and the models run directly (insightface's own detector and alignment, onnxruntime, CLIP),
the same seed giving the same numbers, scores of pictures that do hold faces, a root without
eval/clip, and bad input naming its flag."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.eval_inputs import Identity, Setting, parse_settings, read_identities
from pipeline.evaluation import (CASE_COLUMNS, SUMMARY_COLUMNS, SUMMARY_OPTIONAL, Case, Report, SettingResult,
                                 evaluate)
from pipeline.fixtures import EVAL_RECOGNIZER
from pipeline.scoring import CaseScore, Scorer
from tests.conftest import face_photo

SEED, PROMPTS = 11, ("a photo of a person", "a watercolor portrait")
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-inputs")
    faces = folder / "faces"
    faces.mkdir()
    face_photo().save(faces / "alice.png")
    face_photo(blobs=((110, 140, 60),), color=(250, 200, 160)).save(faces / "bob.png")
    (folder / "prompts.txt").write_text("# two styles\n" + "\n".join(PROMPTS) + "\n\n")
    return folder


@pytest.fixture(scope="module")
def evaluated(weights_dir, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    code = main(["eval", "--weights", str(weights_dir), "--identities", str(inputs / "faces"), "--prompts",
                 str(inputs / "prompts.txt"), "--settings", "default,scheduler=ddim", "--size", "64", "--steps", "1",
                 "--seed", str(SEED), "--save-images", "--out", str(out), "--providers", "CPUExecutionProvider"])
    assert code == 0
    return out


def read_csv(path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


def test_one_row_per_setting_with_every_column_and_one_per_image(evaluated):
    header, rows = read_csv(evaluated / "quality.csv")
    assert header == [*SUMMARY_COLUMNS, "hardware", "device", "date"]
    assert [r["setting"] for r in rows] == ["default", "scheduler=ddim"]
    assert [r["scheduler"] for r in rows] == ["euler", "ddim"]
    for row in rows:
        empty = set(SUMMARY_OPTIONAL) - {"clip_score_mean", "clip_score_std"}  # no face in random renders, no compile
        for column in header:  # every column measured but those: no similarity where no face, not a 0
            assert (row[column] == "") == (column in empty), column
        assert (row["images"], row["identities"], row["prompts"], row["size"], row["steps"]) == ("4", "2", "2",
                                                                                                 "64", "1")
        assert row["face_found"] == "0.0" and float(row["s_per_image"]) > 0 and float(row["warmup_s"]) > 0
        assert 0 <= float(row["clip_score_mean"]) <= 100
    header, cases = read_csv(evaluated / "quality_cases.csv")
    assert header == [*CASE_COLUMNS, "hardware", "device", "date"]
    assert [(c["setting"], c["identity"], c["prompt_index"], c["seed"]) for c in cases] == [
        (s, i, str(p), str(SEED + 2 * n + p)) for s in ("default", "scheduler=ddim") for n, i in
        enumerate(("alice", "bob")) for p in range(2)]
    assert all(c["clip_cosine"] and c["clip_score"] for c in cases)
    table = (evaluated / "quality.md").read_text()
    assert table.count("\n| ") == 3 and "cores" in table
    assert f"face_sim2: {EVAL_RECOGNIZER}" in table and "100 * max(cos, 0)" in table


class Direct:
    """The scores of one image computed without pipeline/ code: insightface's SCRFD and
    alignment, both recognisers through onnxruntime, CLIP through transformers."""

    def __init__(self, weights_dir) -> None:
        import onnxruntime
        from insightface.model_zoo import model_zoo
        from transformers import CLIPModel, CLIPProcessor

        self.detector = model_zoo.get_model(str(weights_dir / "antelopev2" / "scrfd_10g_bnkps.onnx"), providers=CPU)
        self.detector.prepare(ctx_id=-1, input_size=(640, 640), det_thresh=0.5)
        self.recognizers = {key: onnxruntime.InferenceSession(str(path), providers=CPU) for key, path in (
            ("face_sim", weights_dir / "antelopev2" / "glintr100.onnx"),
            ("face_sim2", weights_dir / "eval" / "face" / EVAL_RECOGNIZER))}
        clip = weights_dir / "eval" / "clip"
        self.clip, self.processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)

    def largest_face(self, bgr):
        for side in (640, 512, 384, 320, 256, 160):
            boxes, kpss = self.detector.detect(bgr, input_size=(side, side), max_num=0)
            if len(boxes):
                best = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
                return boxes[best], kpss[best]
        return None, None

    def embed(self, key, bgr, kps):
        from insightface.utils import face_align

        crop = face_align.norm_crop(bgr, landmark=kps, image_size=112)[:, :, ::-1]  # aligned, as RGB
        blob = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        session = self.recognizers[key]
        return session.run(None, {session.get_inputs()[0].name: blob})[0][0]

    def scores(self, image: Image.Image, photo: Image.Image, prompt: str) -> dict:
        import torch

        reference = np.asarray(photo.resize((1024, 1024), Image.Resampling.LANCZOS))[:, :, ::-1].copy()  # 256 px
        output = np.asarray(image)[:, :, ::-1].copy()
        with torch.no_grad():
            out = self.clip(**self.processor(text=[prompt], images=[image], return_tensors="pt", padding=True))
        clip = float((out.image_embeds @ out.text_embeds.T).item())  # both unit length
        scores = {"face_found": False, "clip_cosine": clip, "clip_score": 100 * max(clip, 0)}
        box, kps = self.largest_face(output)
        if box is not None:
            _, ref_kps = self.largest_face(reference)
            for key in self.recognizers:
                a, b = self.embed(key, reference, ref_kps), self.embed(key, output, kps)
                scores[key] = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            scores.update(face_found=True, det_score=float(box[4]))
        return scores


@pytest.fixture(scope="module")
def direct(weights_dir):
    return Direct(weights_dir)


@pytest.fixture(scope="module")
def scorer(weights_dir):
    return Scorer.from_root(weights_dir, providers=CPU)


def test_a_case_recomputed_with_the_plain_pipeline_and_the_models_run_directly(evaluated, inputs, pipe, direct):
    _, cases = read_csv(evaluated / "quality_cases.csv")
    case = next(c for c in cases if (c["setting"], c["identity"], c["prompt_index"]) == ("scheduler=ddim", "bob", "1"))
    photo = Image.open(inputs / "faces" / "bob.png").convert("RGB")
    image = pipe([photo], PROMPTS[1], seed=int(case["seed"]), width=64, height=64, num_inference_steps=1,
                 scheduler="ddim").images[0]
    saved = Image.open(evaluated / "images" / "scheduler_ddim" / "bob-1.png")
    assert np.array_equal(np.asarray(saved), np.asarray(image))  # the evaluation rendered exactly this image
    scores = direct.scores(image, photo, PROMPTS[1])
    assert case["face_found"] == "false" and scores["face_found"] is False
    assert float(case["clip_cosine"]) == pytest.approx(scores["clip_cosine"], abs=1e-5)
    assert float(case["clip_score"]) == pytest.approx(scores["clip_score"], abs=1e-3)


def test_pictures_with_faces_score_as_computed_directly(scorer, direct, inputs, pipe):
    """Random renders hold no face: the scores of found faces are checked on photos, against
    the same direct computation (and the reference is the pipeline's own embedding)."""
    alice = Image.open(inputs / "faces" / "alice.png").convert("RGB")
    bob = Image.open(inputs / "faces" / "bob.png").convert("RGB")
    reference = scorer.reference(alice)
    assert np.array_equal(reference.embedding, pipe.analyze_faces([alice]).embedding)
    for image in (alice, bob, Image.new("RGB", (128, 128))):
        score, expected = scorer.score(image, reference, PROMPTS[0]), direct.scores(image, alice, PROMPTS[0])
        assert score.face_found == expected["face_found"]
        for key in ("face_sim", "face_sim2", "det_score", "clip_cosine", "clip_score"):
            value = getattr(score, key)
            assert (value is None) == (key not in expected), key
            if value is not None:
                assert value == pytest.approx(expected[key], abs=1e-4), key
    same, other = scorer.score(alice, reference, "x"), scorer.score(bob, reference, "x")
    assert same.face_sim > 0.9 and same.face_sim > other.face_sim  # the same face scores higher
    assert same.face_sim2 != pytest.approx(same.face_sim)  # another recogniser, another number


def test_the_same_seed_gives_the_same_numbers(evaluated, inputs, pipe, weights_dir, scorer):
    """One case of the command's run again, alone, through the API (the session's pipeline):
    case k renders with seed + k, so bob's first case is SEED + 2. The same seed gives the
    same numbers."""
    bob = [i for i in read_identities(inputs / "faces") if i.name == "bob"]
    rerun = evaluate(weights_dir, bob, PROMPTS[:1], parse_settings(["scheduler=ddim"]), seed=SEED + 2, size=64,
                     steps=1, scorer=scorer, loader=lambda _: pipe)
    _, cases = read_csv(evaluated / "quality_cases.csv")
    before = [c for c in cases if (c["setting"], c["identity"], c["prompt_index"]) == ("scheduler=ddim", "bob", "0")]
    measured = ("seed", "face_found", "det_score", "face_sim", "face_sim2", "clip_cosine", "clip_score")
    again = [{k: "" if v is None else ("true" if v is True else "false" if v is False else str(v))
              for k, v in row.items()} for row in rerun.case_rows()]
    assert [{k: c[k] for k in measured} for c in again] == [{k: c[k] for k in measured} for c in before]
    assert len({c["clip_cosine"] for c in cases}) > 4  # the cases' own renders, not one number


def test_means_are_over_outputs_with_a_face_and_the_share_is_apart():
    def case(found, sim, clip):
        return Case("s", "a", 0, "p", 0, CaseScore(found, 0.9 if found else None, sim, None, clip / 100, clip), 1.0)

    result = SettingResult(Setting("s"), {"scheduler": "euler", "num_inference_steps": 2, "guidance_scale": 5.0},
                           64, 1, 3, 0.5, 3.0, [case(True, 0.8, 30.0), case(True, 0.6, 20.0), case(False, None, 10.0)])
    row = result.row()
    assert row["face_found"] == pytest.approx(2 / 3, abs=1e-4)
    assert (row["face_sim_mean"], row["face_sim_std"]) == (0.7, 0.1)  # a missing face is not a similarity of 0
    assert (row["face_sim2_mean"], row["face_sim2_std"]) == (None, None)
    assert row["clip_score_mean"] == 20.0 and row["compile_s"] is None and row["s_per_image"] == 1.0


def test_without_eval_clip_the_clip_column_is_empty_and_the_report_says_so(weights_dir, inputs, pipe, scorer,
                                                                          tmp_path):
    root = tmp_path / "weights"
    root.mkdir()
    for entry in weights_dir.iterdir():
        if entry.name != "eval":
            (root / entry.name).symlink_to(entry)
    (root / "eval").mkdir()
    (root / "eval" / "face").symlink_to(weights_dir / "eval" / "face")
    without = Scorer.from_root(root, providers=CPU)
    assert without.clip is None and without.recognizer is not None
    without.face = scorer.face  # the same antelopev2 models, loaded once
    report = Report(tmp_path / "out")
    result = evaluate(root, [Identity("alice", inputs / "faces" / "alice.png")], PROMPTS[:1],
                      parse_settings(["default"]), seed=SEED, size=64, steps=1, scorer=without,
                      loader=lambda _: pipe, on_setting=report.add_setting)
    report.close(result.notes)
    [row] = read_csv(tmp_path / "out" / "quality.csv")[1]
    assert row["clip_score_mean"] == row["clip_score_std"] == "" and row["face_found"] == "0.0"
    assert [c["clip_score"] for c in read_csv(tmp_path / "out" / "quality_cases.csv")[1]] == [""]
    assert "clip_score empty: no CLIP model (eval/clip/" in (tmp_path / "out" / "quality.md").read_text()


@pytest.mark.parametrize("extra, flag", [
    (["--identities", "/nonexistent/faces"], "--identities"),
    (["--identities", "MANIFEST"], "--identities"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts"),
    (["--settings", "default,warp_speed"], "--settings"),
    (["--settings", "scheduler=sideways"], "--settings"),
    (["--settings", "lcm"], "--settings"),  # no few_step/lcm.safetensors in the fixture root
    (["--optimize", "fuse_qkv,bogus"], "--optimize"),
    (["--size", "65"], "--size"),
])
def test_bad_input_exits_2_naming_the_flag(weights_dir, inputs, tmp_path, capsys, extra, flag):
    manifest = tmp_path / "identities.json"
    manifest.write_text(json.dumps([{"name": "carol", "photo": "missing.png"}]))
    extra = [str(manifest) if value == "MANIFEST" else value for value in extra]
    code = main(["eval", "--weights", str(weights_dir), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and flag in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_identity_manifests_and_setting_names(weights_dir, inputs, tmp_path):
    folder = read_identities(inputs / "faces")
    (tmp_path / "ids.json").write_text(json.dumps([{"name": i.name, "photo": str(i.photo)} for i in folder]))
    (tmp_path / "ids.csv").write_text("name,photo\n" + "".join(f"{i.name},{i.photo}\n" for i in folder))
    assert read_identities(tmp_path / "ids.json") == read_identities(tmp_path / "ids.csv") == folder
    assert [s.name for s in parse_settings(None, root=weights_dir)] == ["default", "fast", "fastest"]
    root = tmp_path / "root"
    (root / "few_step").mkdir(parents=True)
    (root / "few_step" / "lcm.safetensors").write_bytes(b"")
    settings = parse_settings(["default", "lcm,fast+scheduler=unipc"], ["fuse_qkv,channels_last"], root=root)
    assert [s.name for s in settings] == ["default", "lcm", "fast+scheduler=unipc", "fuse_qkv,channels_last"]
    assert settings[1].render_params(30) == {"num_inference_steps": 5, "guidance_scale": 1.5, "scheduler": "lcm"}
    assert settings[2].optimizations.compile == "regional" and settings[2].render_params(2)["scheduler"] == "unipc"
    assert settings[3].optimizations.fuse_qkv and settings[3].optimizations.channels_last
    assert [s.name for s in parse_settings(None, root=root)] == ["default", "fast", "fastest", "lcm"]


def test_the_eval_fixture_models_are_another_recogniser_and_a_clip_that_loads_offline(weights_dir):
    import onnxruntime
    from transformers import CLIPModel, CLIPProcessor

    crops = np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32)
    outputs = []
    for path in (weights_dir / "antelopev2" / "glintr100.onnx", weights_dir / "eval" / "face" / EVAL_RECOGNIZER):
        session = onnxruntime.InferenceSession(str(path), providers=CPU)
        outputs.append(session.run(None, {"input.1": crops})[0])
    assert outputs[0].shape == outputs[1].shape == (2, 512) and not np.allclose(outputs[0], outputs[1])
    clip = weights_dir / "eval" / "clip"
    model, processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)
    assert processor(text=["a watercolor portrait"], return_tensors="pt").input_ids.shape[1] > 2
    assert sum(p.numel() for p in model.parameters()) < 200_000  # tiny


def test_several_people_a_picture_get_their_own_row_and_a_region_is_recomputed(weights_dir, inputs, pipe,
                                                                                 tmp_path):
    """``--people 2``: after the one-person cases, each identity with the other in one
    picture (groups alice+bob and bob+alice), each region scored; the row says people=2.
    One picture recomputed with the plain pipeline: the same boxes, the same seed, the same
    pixels."""
    out = tmp_path / "out"
    (tmp_path / "one.txt").write_text(PROMPTS[0] + "\n")
    assert main(["eval", "--weights", str(weights_dir), "--identities", str(inputs / "faces"), "--prompts",
                 str(tmp_path / "one.txt"), "--settings", "default", "--size", "64", "--steps", "1", "--seed",
                 str(SEED), "--people", "2", "--save-images", "--out", str(out), "--providers", "CPUExecutionProvider"]
                ) == 0
    _, rows = read_csv(out / "quality.csv")
    assert [(r["setting"], r["people"], r["images"]) for r in rows] == [("default", "1", "2"), ("default", "2", "2")]
    assert rows[1]["face_found"] == "0.0" and rows[1]["leak_sim_mean"] == ""  # random renders hold no face
    _, cases = read_csv(out / "quality_cases.csv")
    regions = [(c["group"], c["region"], c["identity"], c["seed"]) for c in cases if c["people"] == "2"]
    assert regions == [("alice+bob", "0", "alice", str(SEED + 2)), ("alice+bob", "1", "bob", str(SEED + 2)),
                       ("bob+alice", "0", "bob", str(SEED + 3)), ("bob+alice", "1", "alice", str(SEED + 3))]
    faces = {name: pipe.analyze_faces([Image.open(inputs / "faces" / f"{name}.png").convert("RGB")])
             for name in ("alice", "bob")}
    boxes = [[3, 16, 29, 42], [35, 16, 61, 42]]  # two columns of 32 px, each face box 80% of one, from y = 16
    image = pipe(people=[{"face": faces["bob"], "box": boxes[0]}, {"face": faces["alice"], "box": boxes[1]}],
                 prompt=PROMPTS[0], seed=SEED + 3, width=64, height=64, num_inference_steps=1).images[0]
    saved = Image.open(out / "images" / "default" / "people" / "bob+alice-0.png")
    assert np.array_equal(np.asarray(saved), np.asarray(image))
    assert "leak_sim: a region's highest similarity" in (out / "quality.md").read_text()


def test_regions_score_their_own_identity_and_the_others_as_computed_directly(scorer, direct, inputs):
    """Two photos side by side stand for a picture of two people: each region's face against
    its own identity (face_sim, face_sim2) and against the other (leak_sim), checked against
    the direct computation on the region's crop."""
    alice = Image.open(inputs / "faces" / "alice.png").convert("RGB")
    bob = Image.open(inputs / "faces" / "bob.png").convert("RGB")
    picture = Image.new("RGB", (512, 256))
    picture.paste(alice, (0, 0))
    picture.paste(bob, (256, 0))
    boxes = [(60, 60, 196, 196), (316, 60, 452, 196)]
    references = [scorer.reference(alice), scorer.reference(bob)]
    scores = scorer.score_regions(picture, boxes, references, PROMPTS[0])
    for k, ((score, leak), own, other) in enumerate(zip(scores, (alice, bob), (bob, alice))):
        crop = picture.crop((boxes[k][0] - 34, boxes[k][1] - 34, boxes[k][2] + 34, boxes[k][3] + 34))
        expected, crossed = direct.scores(crop, own, PROMPTS[0]), direct.scores(crop, other, PROMPTS[0])
        assert score.face_found and expected["face_found"]
        assert score.face_sim == pytest.approx(expected["face_sim"], abs=1e-4)
        assert score.face_sim2 == pytest.approx(expected["face_sim2"], abs=1e-4)
        assert leak == pytest.approx(crossed["face_sim"], abs=1e-4)
        assert score.face_sim > leak  # its own identity scores higher than the other's
    empty = scorer.score_regions(Image.new("RGB", (128, 64)), [(0, 0, 60, 60), (64, 0, 128, 60)], references, "x")
    assert [(s.face_found, leak) for s, leak in empty] == [(False, None), (False, None)]
