"""The ``instantid`` command.

Every failure the user can cause ends with one line on stderr and a non-zero exit:
2 invalid arguments or input, 3 no face detected, 4 missing or unusable weights,
1 anything else. Set ``INSTANTID_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .face import FaceSummary
from .errors import ImageTooLarge, InstantIDError, InvalidImage, InvalidParameter, NoFaceDetected, WeightsNotFound

EXIT_ERROR, EXIT_INVALID, EXIT_NO_FACE, EXIT_WEIGHTS = 1, 2, 3, 4
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _quiet_libraries() -> None:
    """Errors only, no progress bars, from the libraries a command may load. Set through
    the environment, which diffusers and transformers read when first imported (and tqdm
    on each bar): a command that never loads them (``verify``, ``fixtures``, ``serve``'s
    driver) does not import them for this (diffusers alone is 2 s of CPU)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import sys
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):  # loaded before this call
        library = sys.modules.get(name)
        if library is not None:
            library.set_verbosity_error()
            library.disable_progress_bar()


def add_marking_arguments(parser, c2pa_default: str) -> None:
    """How the images of a command are marked: the invisible watermark and the C2PA manifest
    (``instantid generate`` and ``instantid render`` alike)."""
    parser.add_argument("--watermark-service", default="instantid",
                        help="the name the invisible watermark and the C2PA manifest on each image carry "
                             "(`instantid verify --service`)")
    parser.add_argument("--no-watermark", action="store_true", help="leave the images unmarked")
    parser.add_argument("--no-c2pa", action="store_true",
                        help=f"no C2PA manifest (by default each image is {c2pa_default})")


def build_parser():
    """The parser and its sub-command group (which other entry points may extend)."""
    from .eval_inputs import add_arguments as add_eval_arguments
    from .schedulers import SCHEDULERS
    from .styles import style_names

    parser = _Parser(prog="instantid", description="InstantID: identity-preserving SDXL generation from face photos.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fixtures = commands.add_parser("fixtures", help="write tiny random fixture weights in the published layout")
    fixtures.add_argument("dir", type=Path)
    fixtures.add_argument(
        "--single-file", action="store_true",
        help="also write DIR/sdxl-single/sdxl_fixture.safetensors: the SDXL as one original-layout checkpoint",
    )
    fixtures.add_argument(
        "--published-size", action="store_true",
        help="random weights of the published sizes (SDXL base, InstantID, fp16, about 10 GB): for load benchmarks",
    )

    verify = commands.add_parser("verify", help="read the invisible watermark and the C2PA manifest of an image "
                                                "this service made")
    verify.add_argument("image", type=Path, help="a PNG, JPEG or WebP file")
    verify.add_argument("--service", default="instantid", help="the service name the mark and the manifest should "
                                                               "carry (the app's watermark.service)")
    verify.add_argument("--trust-anchors", type=Path, help="PEM certificates of the CAs to trust (the manifest's "
                                                           "`trusted` says whether its signer leads to one)")

    evaluation = commands.add_parser("eval", help="identity fidelity: identities x prompts under named settings; "
                                                  "face similarity, face found share, CLIP score, seconds per image")
    evaluation.add_argument("--weights", required=True, help="weights root (antelopev2/; optional eval/face/*.onnx, "
                                                             "eval/clip/, few_step/<kind>.safetensors)")
    evaluation.add_argument("--out", type=Path, default=Path("out/eval"),
                            help="where quality.csv, quality_cases.csv and quality.md go")
    add_eval_arguments(evaluation)

    gen = commands.add_parser("generate", help="generate images of the person in --face")
    gen.add_argument("--weights", required=True, help="weights root: a folder, s3://bucket/prefix, or 'hub'")
    gen.add_argument("--face", action="append", type=Path, help="a face photo (repeatable)")
    gen.add_argument("--person", action="append", default=[], metavar="PHOTO@X1,Y1,X2,Y2",
                     help="several people instead of --face (repeatable, up to 4): a face photo and the box of the "
                          "output where that face goes, in pixels; needs --width and --height")
    gen.add_argument("--pose", type=Path, help="take the keypoints (head pose) from this photo")
    gen.add_argument("--face-combine", choices=("mean", "norm_mean"), default="mean")
    gen.add_argument("--image", type=Path, help="restyle this picture (img2img; keypoints from its face unless --pose)")
    gen.add_argument("--strength", type=float, help="with --image: how much to repaint, 0-1 (default 0.8; 1.0 with "
                                                   "--mask-image)")
    gen.add_argument("--mask-image", type=Path, help="with --image: repaint only where this mask is white "
                                                     "(inpainting; the rest keeps the picture's pixels)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--prompt-weighting", action="store_true",
                     help="read (word:1.2), (word), [word] as weights and keep prompts past 77 tokens whole "
                          "(the reference's full pipeline)")
    gen.add_argument("--style", help=f"one of: {', '.join(style_names())}")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--num-inference-steps", type=int, help="default 30, or the --optimize few_step preset's")
    gen.add_argument("--guidance-scale", type=float, help="default 5.0, or the --optimize few_step preset's")
    gen.add_argument("--ip-adapter-scale", type=float, default=0.8)
    gen.add_argument("--controlnet-conditioning-scale", type=float, default=0.8)
    gen.add_argument("--controlnet", action="append", default=[], metavar="TYPE:IMAGE[:SCALE]",
                     help="an extra ControlNet (repeatable): controlnets/TYPE/ of the weights root, its control image "
                          "made from IMAGE by its annotator (canny, depth), strength SCALE (default 0.5)")
    gen.add_argument("--controlnet-image", action="append", default=[], metavar="TYPE:IMAGE[:SCALE]",
                     help="as --controlnet, with IMAGE already a control image (e.g. an OpenPose skeleton)")
    gen.add_argument("--control-guidance-start", type=float, default=0.0)
    gen.add_argument("--control-guidance-end", type=float, default=1.0)
    gen.add_argument("--enhance-face-region", action="store_true")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--scheduler", help=f"one of: {', '.join(SCHEDULERS)} (default euler, or the preset's)")
    gen.add_argument("--lora", type=Path, help="a LoRA .safetensors (e.g. LCM-LoRA)")
    gen.add_argument("--lora-scale", type=float, default=1.0)
    gen.add_argument("--out", required=True, type=Path, help="output image path (.png, .jpg, .webp)")
    add_marking_arguments(gen, c2pa_default="signed when $INSTANTID_C2PA_KEY and $INSTANTID_C2PA_CERT hold "
                                            "credentials")
    gen.add_argument("--safety-check", choices=("block", "blur", "flag"),
                     help="screen each image with the weights root's safety_checker/ first: a flagged image is not "
                          "written (block), written blurred (blur) or written as it is (flag); the report says which")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--providers", default="auto", help="onnxruntime providers for the face stage")
    gen.add_argument(
        "--optimize", action="append", default=[], metavar="NAME[,NAME]",
        help="speed settings (repeatable): fuse_qkv, channels_last, compile[=regional|full], bf16, "
             "identitynet_cond_only, vae_tiling, vae_decode=native, vae_fp16_fix=DIR, face_batch, "
             "face_providers=cuda|tensorrt, few_step=lcm|lightning|hyper:LORA[:STEPS]; bundles: fast, fastest",
    )
    return parser, commands


def main(argv: list[str] | None = None, *, extend=None, handlers: dict | None = None) -> int:
    """Run the command line. ``extend(commands)`` may add sub-commands, whose functions
    are given in ``handlers`` (name -> function(args) -> exit code)."""
    _quiet_libraries()
    try:
        parser, commands = build_parser()
        if extend is not None:
            extend(commands)
        args = parser.parse_args(argv)
        run = {"fixtures": _fixtures, "generate": _generate, "verify": _verify, "eval": _eval,
               **(handlers or {})}[args.command]
        return run(args)
    except _UsageError as error:
        return _fail(EXIT_INVALID, str(error))
    except NoFaceDetected as error:
        return _fail(EXIT_NO_FACE, str(error))
    except (InvalidParameter, InvalidImage, ImageTooLarge) as error:
        return _fail(EXIT_INVALID, str(error))
    except WeightsNotFound as error:
        return _fail(EXIT_WEIGHTS, str(error))
    except InstantIDError as error:
        code = EXIT_WEIGHTS if error.code in ("invalid_weights",) else EXIT_ERROR
        return _fail(code, str(error))
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    except Exception as error:  # a bug: still one line, unless debugging
        if os.environ.get("INSTANTID_DEBUG"):
            raise
        return _fail(EXIT_ERROR, f"unexpected {type(error).__name__}: {error}")


def _fail(code: int, message: str) -> int:
    print(f"instantid: error: {' '.join(message.split())}", file=sys.stderr)
    return code


SINGLE_FILE_FIXTURE = Path("sdxl-single") / "sdxl_fixture.safetensors"


def _verify(args) -> int:
    """Print what the image's invisible watermark and C2PA manifest say, as JSON; exit 0
    when it carries this service's mark or a valid manifest naming this service (signed by
    a CA of ``--trust-anchors`` when given), 1 when
    neither (no mark, another service's, a manifest that fails validation)."""
    import numpy as np

    from dataclasses import asdict

    from .images import load_image
    from .provenance import inspect, made_by
    from .watermark import Watermark

    image = load_image(args.image, field="image")
    reading = Watermark(args.service).read(np.asarray(image))
    try:
        anchors = args.trust_anchors.read_bytes() if args.trust_anchors else None
        manifest = inspect(args.image.read_bytes(), trust_anchors_pem=anchors)
    except (OSError, ValueError) as error:  # trust anchors missing or unreadable
        raise InvalidParameter("--trust-anchors", str(error)) from None
    print(json.dumps({"image": str(args.image), "watermark": reading.as_dict(),
                      "c2pa": asdict(manifest) if manifest is not None else None}))
    # a manifest names its generator, which anyone can write: with trust anchors given, its signer must lead to one
    signed = made_by(manifest, args.service) and (anchors is None or manifest.trusted is True)
    return 0 if (reading.found and reading.this_service) or signed else EXIT_ERROR


def _fixtures(args) -> int:
    from .fixtures import fixture_summary, write_fixtures, write_sdxl_single_file

    if args.published_size:
        from .fixtures import write_published_size_fixtures

        root = write_published_size_fixtures(args.dir)
    else:
        root = write_fixtures(args.dir)
    if args.single_file:
        write_sdxl_single_file(root / "sdxl", root / SINGLE_FILE_FIXTURE)
    print(json.dumps(fixture_summary(root)))
    return 0


def _eval(args) -> int:
    """Identity fidelity (:mod:`pipeline.evaluation`): every input is checked before any
    model loads; the table goes to stdout, the files to ``--out``, progress to stderr."""
    from .eval_inputs import check_render_size, parse_settings, read_identities, read_prompts
    from .evaluation import Report, evaluate

    check_render_size(args.size, args.steps, args.seed)
    identities, prompts = read_identities(args.identities), read_prompts(args.prompts)
    settings = parse_settings(args.settings, args.optimize, root=args.weights)
    report = Report(args.out)

    def progress(case) -> None:
        row = case.row()
        where = f"{case.group}[{case.region}]" if case.group else case.identity
        print(f"[eval] {case.setting} {where} #{case.prompt_index}: " + ", ".join(
            f"{k}={row[k]}" for k in ("face_found", "face_sim", "face_sim2", "leak_sim", "clip_score", "seconds")),
              file=sys.stderr)

    result = evaluate(args.weights, identities, prompts, settings, seed=args.seed, size=args.size, steps=args.steps,
                      device=args.device, providers=args.providers, on_setting=report.add_setting, on_case=progress,
                      people=args.people,
                      images_dir=args.out / "images" if args.save_images else None)
    report.close(result.notes)
    print(report.markdown())
    return 0


def _controlnet(value: str, flag: str, preprocessed: bool) -> tuple[dict, tuple[Path, str]]:
    """``TYPE:IMAGE[:SCALE]`` -> the entry's parameters and its image path (which may hold ':')."""
    kind, _, rest = value.partition(":")
    if not kind or not rest:
        raise InvalidParameter(flag, f"expected TYPE:IMAGE[:SCALE], got {value!r}")
    path, _, scale = rest.rpartition(":")
    try:
        strength = float(scale) if path else None
    except ValueError:
        strength = None
    if strength is None:  # no scale given: the whole rest is the path
        path = rest
    entry = {"type": kind, "preprocessed": preprocessed, **({"scale": strength} if strength is not None else {})}
    return entry, (Path(path), flag)


def _params(args, optimizations, chosen: dict, controls: list, people: list):
    from .params import GenerationParams, parse_params

    return parse_params(
        GenerationParams,
        **{**optimizations.param_defaults(), **{k: v for k, v in chosen.items() if v is not None}},
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        prompt_weighting=args.prompt_weighting,
        style=args.style,
        width=args.width,
        height=args.height,
        ip_adapter_scale=args.ip_adapter_scale,
        controlnet_conditioning_scale=args.controlnet_conditioning_scale,
        control_guidance_start=args.control_guidance_start,
        control_guidance_end=args.control_guidance_end,
        enhance_face_region=args.enhance_face_region,
        seed=args.seed,
        num_images=args.num_images,
        lora=str(args.lora) if args.lora else None,
        lora_scale=args.lora_scale,
        strength=args.strength,
        controlnets=[entry for entry, _ in controls],
        people=[{"box": box} for _, box in people],
    )


def _person(value: str) -> tuple[Path, list[int]]:
    """``PHOTO@X1,Y1,X2,Y2`` -> the photo and its box (the photo's path may hold '@')."""
    path, _, box = value.rpartition("@")
    try:
        numbers = [int(v) for v in box.split(",")]
    except ValueError:
        numbers = []
    if not path or len(numbers) != 4:
        raise InvalidParameter("--person", f"expected PHOTO@X1,Y1,X2,Y2 (whole pixels), got {value!r}")
    return Path(path), numbers


def _generate(args) -> int:
    from .controlnets import available_controlnets
    from .images import load_image
    from .optimize import Optimizations
    from .weights import resolve_weights

    started = time.perf_counter()
    # 1. everything the user typed is checked before any model is loaded
    optimizations = Optimizations.parse(args.optimize)
    controls = [_controlnet(value, flag, preprocessed) for flag, preprocessed in
                (("--controlnet", False), ("--controlnet-image", True)) for value in getattr(args, flag[2:]
                                                                                                 .replace("-", "_"))]
    chosen = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
              "scheduler": args.scheduler}
    people = [_person(value) for value in args.person]
    if bool(args.face) == bool(people):
        raise InvalidParameter("--person" if people else "--face", "give faces either with --face or with --person"
                               if people else "needs a face photo (--face PHOTO, or --person PHOTO@X1,Y1,X2,Y2)")
    if people and args.pose is not None:
        raise InvalidParameter("--pose", "with --person, each person's box places their face")
    try:
        params = _params(args, optimizations, chosen, controls, people)
    except InvalidParameter as error:  # people[k].box -> the flag the user typed
        if error.field.startswith("people[") and people:
            index = int(error.field[len("people["):].split("]")[0])
            raise InvalidParameter(f"--person {args.person[index]}", error.reason) from None
        if error.field == "people":
            raise InvalidParameter("--person", error.reason) from None
        raise
    for flag, value in (("--strength", args.strength), ("--mask-image", args.mask_image)):
        if value is not None and args.image is None:
            raise InvalidParameter(flag, "needs --image (the picture to start from)")
    if args.lora is not None and not args.lora.exists():
        raise InvalidParameter("--lora", f"no such file: {args.lora}")
    out_format = OUTPUT_FORMATS.get(args.out.suffix.lower())
    if out_format is None:
        raise InvalidParameter("--out", f"unknown image extension {args.out.suffix!r}; use one of {sorted(OUTPUT_FORMATS)}")
    if args.out.parent and not args.out.parent.exists():
        raise InvalidParameter("--out", f"folder {args.out.parent} does not exist")
    from .provenance import credentials_from_env

    try:  # the C2PA credentials in the env, checked before any render
        credentials = None if args.no_c2pa else credentials_from_env(args.watermark_service)
    except ValueError as error:
        raise InvalidParameter("--no-c2pa", f"{error} (or pass --no-c2pa)") from None
    faces = [load_image(p, field=f"--face {p}") for p in args.face or ()]
    person_photos = [load_image(path, field=f"--person {value}") for (path, _), value in zip(people, args.person)]
    pose = load_image(args.pose, field=f"--pose {args.pose}") if args.pose else None
    picture = load_image(args.image, field=f"--image {args.image}") if args.image else None
    mask = load_image(args.mask_image, field=f"--mask-image {args.mask_image}") if args.mask_image else None
    control_images = [load_image(path, field=f"{flag} {path}") for _, (path, flag) in controls]
    paths = resolve_weights(args.weights)
    offered = available_controlnets(paths.extras)
    for entry, (_, flag) in controls:
        if entry["type"] not in offered:
            raise InvalidParameter(flag, f"no ControlNet {entry['type']!r}: the weights root has no "
                                         f"controlnets/{entry['type']}/ (there: {', '.join(offered) or 'none'})")

    checker = None
    if args.safety_check:  # its classifier is looked for before anything is rendered
        from .safety import SafetyChecker

        checker = SafetyChecker.from_weights(args.weights)

    # 2. load, analyse, render
    from .pipeline import InstantIDPipeline

    pipe = InstantIDPipeline.from_weights(paths, device=args.device, dtype=args.dtype, providers=args.providers,
                                          optimizations=optimizations)
    load_ms = (time.perf_counter() - started) * 1000
    clock = time.perf_counter()
    layout, layout_name = (pose, f"--pose {args.pose}") if pose is not None else (picture, f"--image {args.image}")
    person_faces = [pipe.face.analyze_many([photo], names=[f"--person {value}"])
                    for photo, value in zip(person_photos, args.person)]
    face = person_faces[0] if person_faces else pipe.face.analyze_many(
        faces, pose=layout, combine=args.face_combine, names=[f"--face {p}" for p in args.face], pose_name=layout_name
    )
    face_ms = (time.perf_counter() - clock) * 1000
    options = params.model_dump(exclude={"controlnets", "people"})
    placed = [{"face": info, "box": box} for info, (_, box) in zip(person_faces, people)]
    result = pipe(None if placed else face, image=picture, mask_image=mask, **options, people=placed or None,
                  controlnets=[{**entry, "image": image} for (entry, _), image in zip(controls, control_images)])
    result.timings_ms["face"] = face_ms

    # 3. mark (each image large enough carries the invisible watermark naming this run), sign
    #    (a C2PA manifest, when the env holds credentials) and write
    import io
    import secrets

    import numpy as np
    from PIL import Image

    from .provenance import settings_of
    from .watermark import Watermark

    generation_id = "g_" + secrets.token_urlsafe(16)
    watermark = None if args.no_watermark else Watermark(args.watermark_service)
    mime = f"image/{out_format.lower()}"
    pictures = [np.asarray(image) for image in result.images]
    verdicts = [None] * len(pictures)
    if checker is not None:
        from .safety import apply_policy

        kept = apply_policy(pictures, checker.flags(pictures), args.safety_check)
        pictures, verdicts = [p for p, _ in kept], [v.as_dict() for _, v in kept]
    # JPEG in full-resolution colour (4:4:4) at quality 95: halved chroma would erase the mark
    options = {"quality": 95, "subsampling": 0} if out_format == "JPEG" else {}
    outputs = []
    for k, (picture, seed, verdict) in enumerate(zip(pictures, result.seeds, verdicts)):
        safety = {"safety": verdict} if verdict is not None else {}
        if picture is None:  # blocked by the safety check: not written
            outputs.append({"path": None, "seed": seed, "watermarked": False, "c2pa": False, **safety})
            continue
        path = args.out if len(pictures) == 1 else args.out.with_name(f"{args.out.stem}-{k}{args.out.suffix}")
        marked = watermark.mark(picture, generation_id) if watermark is not None else None
        buffer = io.BytesIO()
        Image.fromarray(picture if marked is None else marked).save(buffer, format=out_format, **options)
        kept = marked is not None and watermark.read(np.asarray(Image.open(buffer).convert("RGB"))).names(generation_id)
        data = buffer.getvalue()
        if credentials is not None:  # the manifest binds the final (marked) pixels
            data = credentials.sign(data, mime, settings_of(params, generation_id=generation_id, width=result.width,
                                                            height=result.height, index=k, seed=seed))
        path.write_bytes(data)
        outputs.append({"path": str(path), "seed": seed, "watermarked": kept, "c2pa": credentials is not None,
                        **safety})
    report = {
        "id": generation_id,
        "images": outputs,
        "width": result.width,
        "height": result.height,
        "face": FaceSummary.of(face).model_dump(),
        **({"people": [{"box": box, "face": FaceSummary.of(info).model_dump()}
                       for info, (_, box) in zip(person_faces, people)]} if people else {}),
        "timings_ms": {"load": round(load_ms, 1), **{k: round(v, 1) for k, v in result.timings_ms.items()}},
    }
    if optimizations.enabled():
        report["optimizations"] = optimizations.enabled()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
