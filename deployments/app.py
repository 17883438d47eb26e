"""The one application builder, used by ``serve_config.yaml`` (``import_path:
deployments.app:app_builder``), by ``instantid serve`` and by the tests."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from pipeline.errors import InvalidParameter
from pipeline.weights import HUB_ROOTS
from service.config import AppArgs

from .face import FaceEmbedder
from .generator import Generator
from .ingress import Ingress
from .janitor import Janitor
from .postprocess import Postprocessor
from .ratelimit import RateLimiter
from .runner import JobRunner

DEPLOYMENTS = ("Ingress", "FaceEmbedder", "Generator", "Postprocessor", "JobRunner", "RateLimiter", "Janitor")


def _check_safety_checker(args: AppArgs) -> None:
    """A local weights root without the classifier the safety policy needs is refused here,
    at once (a remote root is checked by the Postprocessor as it loads)."""
    from pipeline.safety import CHECKER_DIR, EXTRACTOR_DIR, has_checker

    root = args.weights
    if args.safety.policy == "off" or "://" in root or root in HUB_ROOTS:  # s3:// and the hub: loaded remotely
        return
    if not has_checker(root):
        raise InvalidParameter("safety.policy", f"is {args.safety.policy!r}, but the weights root {root} has no "
                                                f"{CHECKER_DIR}/ and {EXTRACTOR_DIR}/ (the Stable Diffusion safety "
                                                "checker in diffusers layout): add them, or set the policy to 'off'")


def build_app(args: AppArgs | dict[str, Any], deployment_options: dict[str, dict] | None = None) -> Application:
    """Bind the deployments. ``deployment_options`` (by deployment name) are
    ``.options()`` overrides, in the shape of a Serve config's ``deployments`` entries."""
    args = AppArgs.model_validate(args)
    args.signing_keys()  # refused here, at once, rather than in every replica
    args.provenance.credentials(args.watermark.service)  # (so are C2PA credentials that are missing or bad)
    _check_safety_checker(args)
    options = deployment_options or {}
    unknown = set(options) - set(DEPLOYMENTS)
    if unknown:
        raise ValueError(f"unknown deployments {sorted(unknown)}; the app has {list(DEPLOYMENTS)}")
    limits = args.limits

    def deployment(cls):
        return cls.options(**options.get(cls.name, {}))

    face = deployment(FaceEmbedder).bind(
        args.weights, args.face_providers, args.weights_cache, args.s3_endpoint_url,
        {"max_bytes": limits.max_image_bytes, "max_pixels": limits.max_image_pixels,
         "max_side": limits.max_image_side}, args.optimizations,
    )
    postprocessor = deployment(Postprocessor).bind(args.storage, args.s3_endpoint_url,
                                                   args.watermark.service if args.watermark.enabled else None,
                                                   args.safety.policy, args.weights, args.weights_cache,
                                                   args.provenance, args.watermark.service)
    generator = deployment(Generator).bind(
        postprocessor, args.weights, args.device, args.dtype, args.weights_cache, args.s3_endpoint_url,
        limits.max_num_images, args.optimizations, args.warmup_shapes,
    )
    config = args.model_dump()
    runner = deployment(JobRunner).bind(face, generator, config)
    limiter = deployment(RateLimiter).bind(  # only when there are limits to keep
        args.rate_limits.requests_per_minute, args.rate_limits.burst, args.rate_limits.images_per_day
    ) if args.rate_limits.enabled else None
    janitor = deployment(Janitor).bind(args.storage, args.retention.sweep_interval_s, args.s3_endpoint_url,
                                       args.retention.orphans_s)
    return deployment(Ingress).bind(face, generator, runner, limiter, janitor, config)


def app_builder(args: AppArgs) -> Application:
    """Entry point for Serve configs; Serve validates ``args`` into :class:`AppArgs`."""
    return build_app(args)
