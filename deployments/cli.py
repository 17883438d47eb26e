"""The ``instantid`` console command: the pipeline's commands (``fixtures``, ``generate``)
plus the serving ones (``serve``, ``hash-key``)."""

from __future__ import annotations

import json
import os
import sys

from pipeline import cli as pipeline_cli


def _extend(commands) -> None:
    serve = commands.add_parser("serve", help="run the HTTP API on a local Ray (the production app, on one machine)")
    serve.add_argument("--weights", required=True, help="weights root: a folder, s3://bucket/prefix, or 'hub'")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only; any other "
                                                          "needs API keys)")
    serve.add_argument("--allowed-host", action="append", default=[],
                       help="a name clients reach the server by (the Host header); repeatable. On loopback the "
                            "default is 127.0.0.1, localhost and ::1 only, which stops DNS-rebinding pages")
    serve.add_argument("--storage", default="out/storage", help="a folder or s3://bucket/prefix for outputs")
    serve.add_argument("--config", help="Serve config to take the deployments' settings from")
    serve.add_argument("--api-key-sha256", action="append", default=[],
                       help="turn auth on with this key digest (also: $INSTANTID_API_KEY_SHA256, comma-separated)")
    serve.add_argument("--max-replicas", type=int, default=1, help="autoscaling cap per deployment")
    serve.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    serve.add_argument("--safety-policy", choices=("block", "blur", "flag", "off"),
                       help="what happens to an output the safety classifier flags (default: the config's, block)")
    commands.add_parser("hash-key", help="make a new API key and print it with the digest to configure")

    render = commands.add_parser("render", help="render a manifest offline on Ray Data (resumable)")
    render.add_argument("manifest", help="JSONL, CSV or Parquet; a path or s3://bucket/key")
    render.add_argument("--weights", required=True)
    render.add_argument("--out", required=True, help="a folder or s3://bucket/prefix")
    render.add_argument("--face-store", help="the service's storage, for rows that give a face_id")
    render.add_argument("--api-key-sha256", help="with --face-store: the key (digest) the faces were registered "
                                                 "with; only its own, unexpired faces are used, as by the API")
    render.add_argument("--face-actors", default="1-1", help="face actor pool size, MIN-MAX")
    render.add_argument("--diffusion-actors", default="1-1", help="diffusion actor pool size, MIN-MAX")
    render.add_argument("--batch-images", type=int, default=4, help="rows per diffusion batch")
    render.add_argument("--face-gpus", default="auto", help="GPUs per face actor (auto: 0.25 when the cluster has GPUs)")
    render.add_argument("--diffusion-gpus", default="auto", help="GPUs per diffusion actor (auto: 1 with GPUs)")
    render.add_argument("--face-accelerator", help="e.g. L4")
    render.add_argument("--diffusion-accelerator", help="e.g. H100")
    render.add_argument("--no-progress", action="store_true")
    pipeline_cli.add_marking_arguments(render, c2pa_default="signed with the credentials in $INSTANTID_C2PA_KEY and "
                                                "$INSTANTID_C2PA_CERT, as the service's are; without them the "
                                                "command refuses to start")


def _serve(args) -> int:
    from .ray_setup import pin_to_loopback

    pin_to_loopback()  # before Ray is imported: a local Ray listens on loopback only
    from .local import serve_locally

    def ready(url: str) -> None:
        print(json.dumps({"url": url, "docs": f"{url}/docs", "health": f"{url}/healthz"}), flush=True)
        print(f"serving on {url} (Ctrl-C stops)", file=sys.stderr, flush=True)

    serve_locally(weights=args.weights, storage=args.storage, port=args.port, host=args.host,
                  config_path=args.config, api_key_sha256=args.api_key_sha256, max_replicas=args.max_replicas,
                  s3_endpoint=args.s3_endpoint, allowed_hosts=args.allowed_host, on_ready=ready,
                  safety_policy=args.safety_policy)
    return 0


def _pool(text: str, flag: str) -> tuple[int, int]:
    from pipeline.errors import InvalidParameter

    low, _, high = text.partition("-")
    try:
        pool = (int(low), int(high or low))
    except ValueError:
        raise InvalidParameter(flag, f"expected MIN-MAX, got {text!r}") from None
    if not 1 <= pool[0] <= pool[1]:
        raise InvalidParameter(flag, f"expected 1 <= MIN <= MAX, got {text!r}")
    return pool


def _render(args) -> int:
    from .ray_setup import pin_to_loopback

    if not os.environ.get("RAY_ADDRESS"):
        pin_to_loopback()  # a local Ray listens on loopback only
    from pipeline.errors import InvalidParameter

    face_actors, diffusion_actors = _pool(args.face_actors, "--face-actors"), _pool(args.diffusion_actors,
                                                                                   "--diffusion-actors")
    if args.batch_images < 1:
        raise InvalidParameter("--batch-images", "must be at least 1")
    if not args.no_c2pa:  # before Ray starts: missing or bad credentials are a quick, clear refusal
        from service.config import ProvenanceConfig

        try:
            ProvenanceConfig().credentials(args.watermark_service)
        except InvalidParameter as error:
            raise InvalidParameter("--no-c2pa", error.reason.replace("set provenance.enabled: false",
                                                                     "pass --no-c2pa")) from None
    import ray

    from cluster.render import run

    from .auth import owner_of
    from .ray_setup import init_loopback_ray, runtime_env

    if os.environ.get("RAY_ADDRESS"):  # the cluster the job was submitted to (`ray job submit` sets it)
        ray.init(runtime_env=runtime_env(), log_to_driver=False)
    else:  # a local Ray pinned to loopback
        init_loopback_ray(num_cpus=max(os.cpu_count() or 1, 4))
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        face_gpus = (0.25 if has_gpus else 0.0) if args.face_gpus == "auto" else float(args.face_gpus)
        diffusion_gpus = (1.0 if has_gpus else 0.0) if args.diffusion_gpus == "auto" else float(args.diffusion_gpus)
        owner = owner_of(args.api_key_sha256.strip().lower()) if args.api_key_sha256 else None
        summary = run(args.manifest, args.weights, args.out, face_store=args.face_store, face_owner=owner,
                      face_gpus=face_gpus,
                      diffusion_gpus=diffusion_gpus, face_accelerator=args.face_accelerator,
                      diffusion_accelerator=args.diffusion_accelerator, face_actors=face_actors,
                      diffusion_actors=diffusion_actors, batch_images=args.batch_images,
                      progress=not args.no_progress,
                      watermark_service=None if args.no_watermark else args.watermark_service,
                      c2pa_service=None if args.no_c2pa else args.watermark_service)
    finally:
        ray.shutdown()
    print(json.dumps(summary))
    return 0


def _hash_key(args) -> int:
    from .auth import new_key

    key, digest = new_key()
    print(json.dumps({"api_key": key, "sha256": digest}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return pipeline_cli.main(argv, extend=_extend,
                             handlers={"serve": _serve, "hash-key": _hash_key, "render": _render})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
