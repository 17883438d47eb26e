"""``python -m bench COMMAND``: the benchmarks. Each writes ``OUT/NAME.csv`` (one row per
case: every setting, the hardware, the date, the median and spread over timed runs after
warm-up) and ``OUT/NAME.md`` (the same as a table), and prints the table.

    python -m bench cpu                 # overhead, batching, load, cold start, weight loading (CPU, fixture weights)
    python -m bench overhead|batching|load|serving|coldstart|loading   # serving: the first three on one Ray
                                        # coldstart: `instantid serve` from nothing, and scale from zero
    python -m bench fetch               # weights from S3: one stream vs parallel ranged GETs (SeaweedFS)
    python -m bench gpu                 # the published-size architecture on a GPU (see bench/gpu.py)
    python -m bench gpu --tiny          # the same script on CPU at tiny sizes (what the tests run)
    python -m bench quality             # identity fidelity per setting (instantid eval; pipeline/evaluation.py)
    python -m bench report OUT          # every table in OUT

``--smallest`` makes every CPU benchmark as small as it can be (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CPU_BENCHES = ("overhead", "batching", "load", "coldstart", "loading")
SERVING_BENCHES = ("overhead", "batching", "load")  # on one ServeSession


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


COLDSTART_KINDS = ("serve", "zero")


def _kinds(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(kinds) - set(COLDSTART_KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"kinds of cold start are {', '.join(COLDSTART_KINDS)}, not {text!r}")
    return kinds


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 2:
        raise argparse.ArgumentTypeError(f"a fraction of capacity in (0, 2], not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub) -> None:
        sub.add_argument("--out", type=Path, default=Path("out/bench"), help="where the CSV and markdown go")
        sub.add_argument("--repeats", type=int, help="timed runs per case (after warm-up)")
        sub.add_argument("--warmup", type=int, help="untimed runs first")

    for name in (*CPU_BENCHES, "serving", "cpu"):
        sub = commands.add_parser(name, help=f"{name} benchmark" if name in CPU_BENCHES else
                                  ("overhead, batching and load on one Ray" if name == "serving"
                                   else "every CPU benchmark"))
        common(sub)
        sub.add_argument("--weights", help="a weights root (default: fixture weights written to a temp dir)")
        sub.add_argument("--smallest", action="store_true", help="the smallest sizes and fewest runs (tests)")
        sub.add_argument("--size", type=int, help="image side for overhead (default 256) and batching (128)")
        sub.add_argument("--steps", type=int, help="steps for overhead (default 10) and batching (4)")
        sub.add_argument("--concurrency", type=_ints, help="batching: client concurrencies (default 1,4,8)")
        sub.add_argument("--batch-sizes", type=_ints, help="batching: max_batch_images values (default 1,4)")
        sub.add_argument("--requests-per-client", type=int, help="batching: requests per client per round (2)")
        sub.add_argument("--load", type=_fraction, default=0.7, dest="load_fraction",
                         help="load: arrival rate as a fraction of the static path's capacity (default 0.7)")
        sub.add_argument("--load-requests", type=int, help="load: requests per loop (default 60; smallest 6)")
        sub.add_argument("--steps-mix", type=_ints, help="load: step counts drawn per request (default 2,4,8,16)")
        sub.add_argument("--load-size", type=int, help="load: image side (default 128; smallest 64)")
        sub.add_argument("--capacity", type=float, help="load: images/s to take as capacity instead of measuring it")
        sub.add_argument("--seed", type=int, default=0, help="load: the arrival schedule's seed")
        sub.add_argument("--coldstart-repeats", type=int, help="cold starts to time, each kind (default 2)")
        sub.add_argument("--coldstart-kinds", type=_kinds, default=list(COLDSTART_KINDS),
                         help="coldstart: serve (`instantid serve` from nothing), zero (the Generator scaled to zero "
                              "on a running app), or both (default serve,zero)")
        sub.add_argument("--published-size", type=Path, metavar="DIR",
                         help="loading: also time a published-size random-weight tree in DIR (written if missing, "
                              "about 10 GB; never commit it)")
        sub.add_argument("--loading-dtype", default="fp32", help="loading: dtype to load in (fp32 or bf16 on CPU)")
        sub.add_argument("--keep", action="store_true", help="keep the temp dir (logs, storage, weights)")

    fetch = commands.add_parser("fetch", help="weights from S3: one stream per file vs parallel ranged GETs")
    common(fetch)
    fetch.add_argument("--smallest", action="store_true", help="the smallest tree and fewest runs (tests)")
    fetch.add_argument("--total-mib", type=int, help="size of the random weights tree (default 1024; smallest 48)")
    fetch.add_argument("--part-mib", type=int, default=8, help="ranged GET size for single-part objects")
    fetch.add_argument("--workers", type=int, default=8, help="ranged GETs in flight per file")
    fetch.add_argument("--s3-endpoint", help="an S3 endpoint (default: a SeaweedFS started on loopback)")
    fetch.add_argument("--stream-mbps", type=float, default=50.0,
                       help="the per-connection cap of the second measurement, MB/s (a remote store's one stream)")

    gpu = commands.add_parser("gpu", help="published-size architecture: reference vs ladder vs all (GPU)")
    common(gpu)
    gpu.add_argument("--tiny", action="store_true", help="tiny configuration on CPU (or wherever --device says)")
    gpu.add_argument("--size", type=int, help="image side (default 1024; tiny 64)")
    gpu.add_argument("--steps", type=int, help="steps with CFG (default 30; tiny 2)")
    gpu.add_argument("--fast-steps", type=int, help="steps without CFG (default 4; tiny 2)")
    gpu.add_argument("--batches", type=_ints, help="batch sizes for throughput (default 1,2,4; tiny 1,2)")
    gpu.add_argument("--budget-s", type=float, default=360.0,
                     help="start no case after this many seconds (the device allows 10 minutes, start-up included)")
    gpu.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    gpu.add_argument("--compile-mode", default="default",
                     choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    gpu.add_argument("--skip", type=lambda t: tuple(p.strip() for p in t.split(",") if p.strip()), default=(),
                     help="settings to leave out of the ladder, e.g. compile")
    gpu.add_argument("--device", default="auto")

    watermark = commands.add_parser("watermark", help="the invisible watermark: what survives what, PSNR, CPU time")
    common(watermark)
    watermark.add_argument("--smallest", action="store_true", help="one size, two photos (tests)")
    watermark.add_argument("--sizes", type=_ints, help="picture sides (default 512,1024)")
    watermark.add_argument("--ids", type=int, help="generation ids each photo is marked with (default 4)")

    post = commands.add_parser("postprocess", help="the Postprocessor's CPU work per image: safety check, "
                                                   "watermark, encoding, C2PA manifest")
    common(post)
    post.add_argument("--smallest", action="store_true", help="256x256, two images, the fixture checker (tests)")
    post.add_argument("--size", type=int, help="image side (default 1024)")
    post.add_argument("--images", type=int, help="images per batch (default 4)")
    post.add_argument("--weights", help="a weights root with the real safety_checker/ (default: the published "
                                        "architecture with random weights)")

    quality = commands.add_parser("quality", help="identity fidelity per setting: face similarity (two recognisers), "
                                                  "face found share, CLIP score, s/image (instantid eval)")
    quality.add_argument("--out", type=Path, default=Path("out/bench"), help="where the CSV and markdown go")
    quality.add_argument("--weights", help="a weights root (default: fixture weights written to a temp dir)")
    quality.add_argument("--smallest", action="store_true", help="64x64, 1 step, the default setting, one prompt "
                                                                 "(tests)")
    from pipeline.eval_inputs import add_arguments as add_eval_arguments

    add_eval_arguments(quality)

    report = commands.add_parser("report", help="print every markdown table in a results folder")
    report.add_argument("folder", type=Path, nargs="?", default=Path("out/bench"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    if args.command == "report":
        for md in sorted(args.folder.glob("*.md")):
            print(md.read_text())
        return 0
    if args.command == "gpu":
        return _gpu(args)
    if args.command == "watermark":
        from .watermark import PHOTOS, run_watermark

        tables = run_watermark(args.out, sizes=args.sizes or ([256] if args.smallest else [512, 1024]),
                               count=2 if args.smallest else len(PHOTOS),
                               ids=args.ids or (1 if args.smallest else 4))
        print("\n".join(table.markdown() for table in tables))
        return 0
    if args.command == "postprocess":
        from .postprocess import run_postprocess

        weights = args.weights
        if args.smallest and weights is None:
            from pipeline.fixtures import write_safety_checker

            weights = tempfile.mkdtemp(prefix="ib-")
            write_safety_checker(Path(weights))
        print(run_postprocess(args.out, size=args.size or (256 if args.smallest else 1024),
                              images=args.images or (2 if args.smallest else 4),
                              repeats=args.repeats or (1 if args.smallest else 3), weights=weights).markdown())
        if args.smallest and args.weights is None:
            shutil.rmtree(weights, ignore_errors=True)
        return 0
    if args.command == "quality":
        from .quality import run_from_args

        workdir = Path(tempfile.mkdtemp(prefix="ib-"))
        try:
            weights = args.weights or str(_fixture_weights(workdir))
            print(run_from_args(args, weights).markdown())
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    if args.command == "fetch":
        from .fetching import run_fetching

        small = args.smallest
        print(run_fetching(args.out, total_mib=args.total_mib or (48 if small else 1024),
                           repeats=args.repeats or (1 if small else 3), warmup=0 if args.warmup is None else args.warmup,
                           endpoint=args.s3_endpoint, part_mib=args.part_mib, workers=args.workers,
                           stream_mbps=args.stream_mbps).markdown())
        return 0
    return _cpu(args)


def _fixture_weights(folder: Path) -> Path:
    from pipeline.fixtures import write_fixtures

    return write_fixtures(folder / "weights")


def _gpu(args) -> int:
    from .gpu import run_gpu

    tiny = args.tiny
    results, face = run_gpu(
        args.out, tiny=tiny, size=args.size or (64 if tiny else 1024), steps=args.steps or (2 if tiny else 30),
        fast_steps=args.fast_steps or (2 if tiny else 4), batches=args.batches or ([1, 2] if tiny else [1, 2, 4]),
        repeats=args.repeats or (1 if tiny else 3), warmup=1 if args.warmup is None else args.warmup,
        budget_s=args.budget_s, compile_backend=args.compile_backend, compile_mode=args.compile_mode,
        device_name=args.device, skip=args.skip,
    )
    print(results.markdown())
    print(face.markdown())
    return 0


def _cpu(args) -> int:
    from deployments.ray_setup import pin_to_loopback

    pin_to_loopback()  # before Ray is imported: every Ray listener on 127.0.0.1
    os.environ.pop("RAY_ADDRESS", None)  # a benchmark starts Ray clusters of its own, never joins one
    small = args.smallest
    which = CPU_BENCHES if args.command == "cpu" else (
        SERVING_BENCHES if args.command == "serving" else (args.command,))
    workdir = Path(tempfile.mkdtemp(prefix="ib-", dir="/tmp"))
    tables = []
    try:
        weights = args.weights
        if weights is None:
            from pipeline.fixtures import write_fixtures

            weights = str(write_fixtures(workdir / "weights"))
        if set(SERVING_BENCHES) & set(which):
            from .serving import ServeSession, run_batching, run_overhead

            batch_sizes = args.batch_sizes or [1, 4]
            with ServeSession(weights, workdir) as session:
                if "overhead" in which:
                    size, steps = args.size or (64 if small else 256), args.steps or (2 if small else 10)
                    tables.append(run_overhead(
                        session, args.out, width=size, height=size, steps=steps, guidance=5.0,
                        repeats=args.repeats or (3 if small else 10), warmup=1 if args.warmup is None else args.warmup))
                if "batching" in which:
                    size, steps = args.size or (64 if small else 128), args.steps or (2 if small else 4)
                    tables.append(run_batching(
                        session, args.out, width=size, height=size, steps=steps, guidance=5.0,
                        concurrencies=args.concurrency or ([1, 4] if small else [1, 4, 8]),
                        batch_sizes=batch_sizes,
                        requests_per_client=args.requests_per_client or (1 if small else 2),
                        repeats=args.repeats or (1 if small else 3),
                        warmup=(0 if small else 1) if args.warmup is None else args.warmup))
                if "load" in which:
                    from .load import run_load

                    size = args.load_size or (64 if small else 128)
                    tables.append(run_load(
                        session, args.out, width=size, height=size, guidance=5.0,
                        steps_mix=args.steps_mix or ([1, 3] if small else [2, 4, 8, 16]),
                        fraction=args.load_fraction, requests=args.load_requests or (6 if small else 60),
                        max_batch_images=4, capacity_requests=6 if small else 32, seed=args.seed,
                        capacity=args.capacity))
        if "coldstart" in which:
            from .coldstart import run_coldstart, run_scale_from_zero, scale_to_zero

            repeats = args.coldstart_repeats or (1 if small else 2)
            if "serve" in args.coldstart_kinds:
                tables.append(run_coldstart(weights, args.out, width=64, height=64, steps=1 if small else 2,
                                            repeats=repeats))
            if "zero" in args.coldstart_kinds:
                from .serving import ServeSession

                with ServeSession(weights, workdir / "zero") as session:
                    session.deploy_changed(scale_to_zero)
                    tables.append(run_scale_from_zero(session.url, args.out, width=64, height=64,
                                                      steps=1 if small else 2, cycles=repeats))
        if "loading" in which:
            from .loading import run_component_loading, run_loading

            repeats = args.repeats or (1 if small else 5)
            warmup = (0 if small else 1) if args.warmup is None else args.warmup
            trees = [("fixture", Path(weights))]
            if args.published_size is not None:
                unet_config = args.published_size / "sdxl" / "unet" / "config.json"
                if not unet_config.is_file() or json.loads(unet_config.read_text())["cross_attention_dim"] != 2048:
                    from pipeline.fixtures import write_published_size_fixtures

                    write_published_size_fixtures(args.published_size)
                trees.append(("published_size", args.published_size))
            tables.append(run_loading(trees, args.out, dtype=args.loading_dtype, repeats=repeats, warmup=warmup,
                                      dtype_cache=workdir / "dtype-cache"))
            tables.append(run_component_loading(trees, args.out, dtype=args.loading_dtype, repeats=repeats,
                                                dtype_cache=workdir / "dtype-cache"))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for table in tables:
        print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
