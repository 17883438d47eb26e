"""The ``instantid`` console command: the pipeline's commands (``fixtures``, ``generate``)
plus the serving ones (``serve``, ``hash-key``)."""

from __future__ import annotations

import json
import sys

from pipeline import cli as pipeline_cli


def _extend(commands) -> None:
    serve = commands.add_parser("serve", help="run the HTTP API on a local Ray (the production app, on one machine)")
    serve.add_argument("--weights", required=True, help="weights root: a folder, s3://bucket/prefix, or 'hub'")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    serve.add_argument("--storage", default="out/storage", help="a folder or s3://bucket/prefix for outputs")
    serve.add_argument("--config", help="Serve config to take the deployments' settings from")
    serve.add_argument("--api-key-sha256", action="append", default=[], help="turn auth on with this key digest")
    serve.add_argument("--max-replicas", type=int, default=1, help="autoscaling cap per deployment")
    serve.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    commands.add_parser("hash-key", help="make a new API key and print it with the digest to configure")


def _serve(args) -> int:
    from .ray_setup import pin_to_loopback

    pin_to_loopback()  # before Ray is imported: a local Ray listens on loopback only
    from .local import serve_locally

    def ready(url: str) -> None:
        print(json.dumps({"url": url, "docs": f"{url}/docs", "health": f"{url}/healthz"}), flush=True)
        print(f"serving on {url} (Ctrl-C stops)", file=sys.stderr, flush=True)

    serve_locally(weights=args.weights, storage=args.storage, port=args.port, host=args.host,
                  config_path=args.config, api_key_sha256=args.api_key_sha256, max_replicas=args.max_replicas,
                  s3_endpoint=args.s3_endpoint, on_ready=ready)
    return 0


def _hash_key(args) -> int:
    from .auth import new_key

    key, digest = new_key()
    print(json.dumps({"api_key": key, "sha256": digest}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return pipeline_cli.main(argv, extend=_extend, handlers={"serve": _serve, "hash-key": _hash_key})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
