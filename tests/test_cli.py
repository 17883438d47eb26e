import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import EXIT_INVALID, EXIT_NO_FACE, EXIT_WEIGHTS, main
from tests.conftest import face_photo

INSTANTID = str(Path(sys.executable).parent / "instantid")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    face_photo().save(folder / "face.png")
    face_photo(size=(320, 200), blobs=((100, 100, 40),)).save(folder / "pose.jpg")
    Image.new("RGB", (128, 128)).save(folder / "black.png")
    (folder / "notes.png").write_text("not an image")
    return folder


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([INSTANTID, *args], capture_output=True, text=True, timeout=300)


def test_done_means_same_bytes_for_the_same_seed(weights_dir, photos, tmp_path):
    """The issue's acceptance run, through the installed console script: two processes at
    once, the same seed, the same bytes."""
    outputs = [tmp_path / name for name in ("o.png", "o2.png")]
    procs = [subprocess.Popen([INSTANTID, "generate", "--weights", str(weights_dir), "--face", str(photos / "face.png"),
                               "--prompt", "a watercolor portrait", "--width", "96", "--height", "64",
                               "--num-inference-steps", "2", "--seed", "7", "--out", str(out), "--no-c2pa"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outputs]
    for proc, out in zip(procs, outputs):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        report = json.loads(stdout.strip().splitlines()[-1])
        # (too small to carry the invisible watermark, and unsigned: the same pixels, the same bytes)
        assert report["images"] == [{"path": str(out), "seed": 7, "watermarked": False, "c2pa": False}]
        assert (report["width"], report["height"]) == (96, 64) and report["id"].startswith("g_")
        assert set(report["face"]) >= {"bbox", "kps", "det_score"} and "denoise" in report["timings_ms"]
        assert Image.open(out).size == (96, 64) and Image.open(out).format == "PNG"
    assert hashlib.sha256(outputs[0].read_bytes()).hexdigest() == hashlib.sha256(outputs[1].read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["out.png", "out.jpg"])
def test_generated_images_carry_the_watermark_naming_the_run_and_verify_reads_it(weights_dir, photos, tmp_path,
                                                                                name, capsys):
    out = tmp_path / name
    args = ["generate", "--weights", str(weights_dir), "--face", str(photos / "face.png"), "--prompt", "x",
            "--out", str(out), "--width", "256", "--height", "256", "--num-inference-steps", "1", "--seed", "3"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # marked, and signed with the credentials in the env (the suite's test CA)
    assert report["images"] == [{"path": str(out), "seed": 3, "watermarked": True, "c2pa": True}]
    assert main(["verify", str(out)]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["watermark"]["generation_id"] == report["id"]
    manifest = verified["c2pa"]
    assert manifest["valid"] and manifest["created_by_algorithm"] and manifest["generator"].startswith("instantid ")
    assert {k: manifest["generation"][k] for k in ("generation_id", "seed", "steps", "width", "index")} == {
        "generation_id": report["id"], "seed": 3, "steps": 1, "width": 256, "index": 0}
    assert "prompt" not in manifest["generation"]  # the file is public; the prompt may name the person
    assert main([*args, "--no-watermark"]) == 0  # signed only: verify still knows it
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"][0]["watermarked"] is False
    assert main(["verify", str(out)]) == 0 and json.loads(capsys.readouterr().out)["watermark"]["found"] is False
    assert main([*args, "--no-watermark", "--no-c2pa"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"][0]["c2pa"] is False
    assert main(["verify", str(out)]) == 1 and json.loads(capsys.readouterr().out)["c2pa"] is None


def test_generate_refuses_half_given_c2pa_credentials_before_rendering(weights_dir, photos, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("INSTANTID_C2PA_CERT", "")
    args = ["generate", "--weights", str(weights_dir), "--face", str(photos / "face.png"), "--prompt", "x",
            "--out", str(tmp_path / "o.png")]
    assert main(args) == 2
    assert "--no-c2pa: set both INSTANTID_C2PA_KEY and INSTANTID_C2PA_CERT" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_fixtures_command_writes_the_tree(tmp_path):
    proc = run("fixtures", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"] >= 19
    assert (tmp_path / "w" / "instantid" / "ip-adapter.bin").is_file()


def generate(weights_dir, photos, tmp_path, *extra, face="face.png"):
    return main(["generate", "--weights", str(weights_dir), "--face", str(photos / face), "--prompt", "x",
                 "--out", str(tmp_path / "out.png"), "--width", "64", "--height", "64",
                 "--num-inference-steps", "1", *extra])


@pytest.mark.parametrize(
    "extra,face,code,needle",
    [
        ((), "black.png", EXIT_NO_FACE, "black.png: no face was detected"),
        ((), "notes.png", EXIT_INVALID, "notes.png: is not an image in a format this service reads"),
        ((), "nowhere.png", EXIT_INVALID, "nowhere.png: file not found"),
        (("--width", "100"), "face.png", EXIT_INVALID, "width: must be a multiple of 8"),
        (("--style", "Baroque"), "face.png", EXIT_INVALID, "style: unknown style 'Baroque'"),
        (("--scheduler", "heun"), "face.png", EXIT_INVALID, "scheduler:"),
        (("--seed", "abc"), "face.png", EXIT_INVALID, "argument --seed: invalid int value"),
        (("--num-images", "0"), "face.png", EXIT_INVALID, "num_images:"),
        (("--pose", "/nowhere/pose.png"), "face.png", EXIT_INVALID, "pose.png: file not found"),
        (("--lora", "/nowhere/lora.safetensors"), "face.png", EXIT_INVALID, "--lora: no such file"),
        (("--prompt-weighting", "--prompt", "a (face:1.2.3)"), "face.png", EXIT_INVALID,
         "prompt: the weight '1.2.3'"),
        (("--strength", "0.5"), "face.png", EXIT_INVALID, "--strength: needs --image"),
        (("--image", "/nowhere/scene.png"), "face.png", EXIT_INVALID, "scene.png: file not found"),
        (("--image", "{photos}/black.png"), "face.png", EXIT_NO_FACE, "--image {photos}/black.png: no face"),
        (("--image", "{photos}/pose.jpg", "--mask-image", "{photos}/face.png"), "face.png", EXIT_INVALID,
         "mask_image: must be the size of image (320x200), got 256x256"),
        (("--image", "{photos}/pose.jpg", "--strength", "1.5"), "face.png", EXIT_INVALID, "strength:"),
        (("--controlnet", "canny"), "face.png", EXIT_INVALID, "--controlnet: expected TYPE:IMAGE[:SCALE]"),
        (("--controlnet", "sketch:{photos}/pose.jpg"), "face.png", EXIT_INVALID, "no controlnets/sketch/"),
        (("--controlnet", "canny:/nowhere/edges.png"), "face.png", EXIT_INVALID, "edges.png: file not found"),
        (("--controlnet", "canny:{photos}/pose.jpg:7"), "face.png", EXIT_INVALID, "controlnets[0].scale"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(weights_dir, photos, tmp_path, capsys, extra, face, code, needle):
    extra, needle = [e.format(photos=photos) for e in extra], needle.format(photos=photos)
    assert generate(weights_dir, photos, tmp_path, *extra, face=face) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instantid: error: ") and needle in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out.png").exists()


def test_missing_weights_and_bad_output_path(weights_dir, photos, tmp_path, capsys):
    code = main(["generate", "--weights", str(tmp_path / "none"), "--face", str(photos / "face.png"),
                 "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert code == EXIT_WEIGHTS and "missing weights: sdxl/" in capsys.readouterr().err
    code = main(["generate", "--weights", str(weights_dir), "--face", str(photos / "face.png"), "--prompt", "x",
                 "--out", str(tmp_path / "o.gif")])
    assert code == EXIT_INVALID and "--out: unknown image extension" in capsys.readouterr().err


def test_several_faces_a_pose_and_several_images(weights_dir, photos, tmp_path, capsys):
    code = main(["generate", "--weights", str(weights_dir), "--face", str(photos / "face.png"), "--face",
                 str(photos / "face.png"), "--pose", str(photos / "pose.jpg"), "--prompt", "", "--style", "Neon",
                 "--num-images", "2", "--seed", "1", "--width", "64", "--height", "64",
                 "--num-inference-steps", "1", "--out", str(tmp_path / "out.webp")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [i["seed"] for i in report["images"]] == [1, 2]
    assert [Path(i["path"]).name for i in report["images"]] == ["out-0.webp", "out-1.webp"]
    assert all(Image.open(i["path"]).format == "WEBP" for i in report["images"])
    assert report["face"]["image_size"] == [1280, 768]  # the pose photo's frame (320x200 by the reference rule)


def test_serve_listens_on_loopback_and_turns_auth_on_with_a_key_digest():
    """`instantid serve`'s defaults (its end-to-end run is `make demo`, test_demo.py)."""
    from deployments.cli import _extend
    from deployments.local import application_config, load_serve_config, local_args
    from pipeline.cli import build_parser

    parser, commands = build_parser()
    _extend(commands)
    args = parser.parse_args(["serve", "--weights", "W", "--api-key-sha256", "d" * 64])
    assert args.host == "127.0.0.1" and args.api_key_sha256 == ["d" * 64]
    app_args = local_args(application_config(load_serve_config()), weights="W", storage="S",
                          auth={"disabled": False, "api_key_sha256": args.api_key_sha256, "api_keys_env": ""})
    assert not app_args.auth.disabled and app_args.auth.api_key_sha256 == ["d" * 64]


def test_inpainting_a_face_into_a_photo(weights_dir, photos, tmp_path, capsys):
    """--image with --mask-image: the keypoints from the photo's face, the photo's own pixels
    outside the mask."""
    mask = Image.new("L", (320, 200), 0)
    mask.paste(255, (40, 40, 160, 160))
    mask.save(tmp_path / "mask.png")
    code = main(["generate", "--weights", str(weights_dir), "--face", str(photos / "face.png"), "--image",
                 str(photos / "pose.jpg"), "--mask-image", str(tmp_path / "mask.png"), "--prompt", "a portrait",
                 "--seed", "3", "--width", "160", "--num-inference-steps", "2", "--out", str(tmp_path / "out.png")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["width"], report["height"]) == (160, 96)  # the photo's frame (1280x768) at width 160
    assert report["face"]["image_size"] == [1280, 768]  # keypoints from the photo's face
    out = Image.open(tmp_path / "out.png")
    assert out.size == (160, 96)


def test_extra_controlnets_from_the_command_line(weights_dir, photos, tmp_path, capsys):
    """A Canny ControlNet from a photo (its annotator) and a ready-made pose image; the
    strength after the last ':'."""
    def run_with(*extra):
        out = tmp_path / f"out{len(extra)}.png"
        code = main(["generate", "--weights", str(weights_dir), "--face", str(photos / "face.png"), "--prompt", "x",
                     "--seed", "2", "--width", "64", "--height", "64", "--num-inference-steps", "2", "--out", str(out),
                     *extra])
        assert code == 0, capsys.readouterr().err
        return Image.open(out).tobytes()

    plain = run_with()
    both = run_with("--controlnet", f"canny:{photos / 'pose.jpg'}:0.9", "--controlnet-image",
                    f"pose:{photos / 'pose.jpg'}")
    assert both != plain


def test_safety_check_in_the_cli_reports_each_image_and_blocks_what_it_flags(flagging_weights_dir, weights_dir,
                                                                            photos, tmp_path, capsys):
    out = tmp_path / "out.png"
    args = ["generate", "--face", str(photos / "face.png"), "--prompt", "x", "--out", str(out), "--width", "64",
            "--height", "64", "--num-inference-steps", "1", "--num-images", "2", "--seed", "4"]
    assert main([*args, "--weights", str(weights_dir), "--safety-check", "block"]) == 0  # flags nothing
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [i["safety"] for i in report["images"]] == [{"flagged": False, "action": "none"}] * 2
    assert all(Path(i["path"]).is_file() for i in report["images"])
    for path in tmp_path.iterdir():
        path.unlink()
    assert main([*args, "--weights", str(flagging_weights_dir), "--safety-check", "block"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(i["path"], i["safety"]) for i in report["images"]] == [(None, {"flagged": True, "action": "blocked"})] * 2
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert main([*args, "--weights", str(flagging_weights_dir), "--safety-check", "blur"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [i["safety"]["action"] for i in report["images"]] == ["blurred"] * 2
    assert all(Path(i["path"]).is_file() for i in report["images"])
    without = tmp_path.parent / "without-checker"  # the models, no safety_checker/
    without.mkdir()
    for name in ("sdxl", "instantid", "antelopev2"):
        (without / name).symlink_to(weights_dir / name)
    assert main([*args, "--weights", str(without), "--safety-check", "flag"]) == EXIT_WEIGHTS
    assert "missing weights: safety_checker/ and feature_extractor/" in capsys.readouterr().err
