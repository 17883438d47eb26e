"""The application's typed configuration: the arguments of the one app builder
(:func:`deployments.app.build_app`), used by ``serve_config.yaml``, by ``instantid serve``,
by the cluster manifests and by the tests. Plain pydantic (no Ray)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from pipeline.errors import InvalidParameter

if TYPE_CHECKING:
    from pipeline.provenance import ContentCredentials

FACE_IMAGES_CAP = 16  # the most photos of one face any server takes (the API schema's cap)


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disabled: bool = Field(False, description="Serve without API keys. Only for a local, single-user setup.")
    api_key_sha256: list[str] = Field(default_factory=list, description="SHA-256 hex digests of accepted keys.")
    api_keys_env: str = Field("INSTANTID_API_KEY_SHA256", description="Env var with more digests, comma-separated.")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(48 * 1024 * 1024, gt=0)
    max_image_bytes: int = Field(12 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_image_side: int = Field(12_000, gt=0)
    max_face_images: int = Field(4, ge=1, le=FACE_IMAGES_CAP)
    max_num_images: int = Field(4, ge=1)
    max_side: int = Field(1536, ge=64)
    max_steps: int = Field(60, ge=1)


class RateLimits(BaseModel):
    """Per API key, the same across every ingress replica (unset: unlimited)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1, description="API calls per minute (every call under /v1/ "
                                                                     "but signed file links and /v1/options).")
    burst: int | None = Field(None, ge=1, description="Requests allowed at once (default: the per-minute rate).")
    images_per_day: int | None = Field(None, ge=1, description="Images per UTC day.")

    @property
    def enabled(self) -> bool:
        """Whether there is any limit to keep (no limiter is deployed otherwise)."""
        return self.requests_per_minute is not None or self.images_per_day is not None


class Fairness(BaseModel):
    """How one replica (an ingress, a job runner) shares its renders between API keys."""

    model_config = ConfigDict(extra="forbid")

    renders_at_once: int = Field(16, ge=1, description="Renders this replica sends to the Generator at once; "
                                 "the rest wait in one queue per API key, the keys taking turns.")
    waiting_per_key: int = Field(32, ge=0, description="Renders of one API key that may wait on a replica; one "
                                 "more is 503 overloaded, for that key only.")
    event_streams_per_key: int = Field(8, ge=1, description="Event streams one API key may hold open on a "
                                       "replica; one more is 429 rate_limited.")
    jobs_per_key: int = Field(64, ge=1, description="Async jobs of one API key not yet finished (across "
                              "replicas); one more is 429 rate_limited.")


class Retention(BaseModel):
    """How long what the service stores is kept (also set as bucket lifecycle rules)."""

    model_config = ConfigDict(extra="forbid")

    faces_s: int = Field(30 * 24 * 3600, ge=1, description="Registered faces (biometric: embeddings).")
    results_s: int = Field(7 * 24 * 3600, ge=1, description="Generated images, their records and job records.")
    uploads_s: int = Field(24 * 3600, ge=1, description="Photos clients upload to the input buckets (bucket "
                                                          "lifecycle rule only: the service stores no photos).")
    sweep_interval_s: float = Field(3600.0, gt=0, description="How often expired data is deleted.")
    orphans_s: int = Field(3600, ge=60, description="Age after which what a writer that died left is deleted: "
                           "images without their record, claims past their hold, uploads never completed.")


class WatermarkConfig(BaseModel):
    """The invisible watermark on every output (:mod:`pipeline.watermark`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Mark every output of at least 256x256 pixels in area.")
    service: str = Field("instantid", min_length=1, max_length=128,
                         description="The name whose tag the mark carries (`instantid verify --service` reads it).")


class ProvenanceConfig(BaseModel):
    """The signed C2PA manifest every PNG/JPEG/WebP output carries (:mod:`pipeline.provenance`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Sign every output; the app refuses to start without credentials.")
    key_env: str = Field("INSTANTID_C2PA_KEY", description="The env var holding the signing key (PEM), the same "
                         "secret on every node.")
    cert_env: str = Field("INSTANTID_C2PA_CERT", description="The env var holding its certificate chain (PEM, the "
                          "signing certificate first).")
    key_pem: SecretStr | None = Field(None, description="The key itself, when not in the env (local runs).")
    cert_pem: str | None = Field(None, description="The chain itself, when not in the env (local runs).")
    tsa_url: str | None = Field(None, description="An RFC 3161 timestamp authority (the only network use).")

    def credentials(self, service: str) -> "ContentCredentials | None":
        """The credentials (None when off), checked: InvalidParameter ``provenance`` names the
        env var to set, or what is wrong with what it holds."""
        if not self.enabled:
            return None
        from pipeline.provenance import ContentCredentials, Signing

        key = os.environ.get(self.key_env) or (self.key_pem.get_secret_value() if self.key_pem else "")
        cert = os.environ.get(self.cert_env) or self.cert_pem or ""
        if not key.strip() or not cert.strip():
            raise InvalidParameter("provenance", f"set the env vars {self.key_env} and {self.cert_env} to a C2PA "
                                                 "signing key and its certificate chain (PEM; the same on every "
                                                 "node), or set provenance.enabled: false")
        try:
            return ContentCredentials(Signing.from_pem(key.encode(), cert.encode(), tsa_url=self.tsa_url), service)
        except ValueError as error:
            raise InvalidParameter("provenance", str(error)) from None


class SafetyConfig(BaseModel):
    """The output safety check (:mod:`pipeline.safety`), in the Postprocessor."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["block", "blur", "flag", "off"] = Field(
        "block", description="What happens to an output the classifier flags: block (not stored; the response says "
                             "so), blur, flag (stored as it is, marked). 'off' runs no check. The classifier is "
                             "safety_checker/ + feature_extractor/ in the weights root.")


class AppArgs(BaseModel):
    """Arguments of :func:`deployments.app.app_builder`."""

    model_config = ConfigDict(extra="forbid")

    weights: str = Field(description="Weights root: a folder, s3://bucket/prefix, or 'hub'.")
    weights_cache: str | None = Field(None, description="Local cache (per node) for remote weights, and for model "
                                                       "folders converted to the dtype the Generator loads.")
    storage: str = Field("out/storage", description="Outputs and records: a folder or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (default: AWS / AWS_ENDPOINT_URL).")
    presign_endpoint_url: str | None = Field(None, description="Endpoint clients use for presigned URLs.")
    url_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    public_url: str | None = Field(None, description="Base URL clients reach the API at (for links in webhooks).")
    url_signing_key_env: str = Field("INSTANTID_URL_SIGNING_KEY", description="Env var holding the HMAC key of "
                                     "local-storage links (the same on every replica, kept across redeploys).")
    url_signing_key: SecretStr | None = Field(None, description="The key itself instead of the env var (a local, "
                                              "single-machine setup: `instantid serve` makes one).")
    input_buckets: list[str] = Field(default_factory=list, description="Buckets s3:// image references may name.")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names (the Host header, without port) "
                                     "the API answers to; empty: any. `instantid serve` on loopback sets the "
                                     "loopback names, which stops DNS-rebinding pages.")
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: Limits = Field(default_factory=Limits)
    request_timeout_s: float = Field(300.0, gt=0)
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503 when overloaded.")
    device: str = "auto"
    dtype: str = "auto"
    face_providers: str = "auto"
    optimizations: str | None = Field(None, description="Generator speed settings, as `instantid generate --optimize` "
                                                         "takes them (e.g. 'fast' or 'bf16,fuse_qkv'); default: "
                                                         "the faithful path.")
    loras: dict[str, str] = Field(default_factory=dict, description="LoRA name (API) -> file path on the nodes.")
    retention: Retention = Field(default_factory=Retention)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    fairness: Fairness = Field(default_factory=Fairness)
    job_lease_s: float = Field(30.0, ge=1, description="A job runner renews its lease on a job this often (x3); "
                                                         "a job whose lease expired is taken over by another.")
    warmup_shapes: list[tuple[int, int, int]] = Field(
        default_factory=lambda: [(1024, 1024, 1)],
        description="(width, height, batch) the Generator renders once before it takes traffic when `compile` is "
                    "on, so no request pays for compiling.")
    webhook_signing_key_env: str = Field("INSTANTID_WEBHOOK_SIGNING_KEY", description="Env var holding the master "
                                         "key the per-API-key webhook secrets derive from.")
    webhook_signing_key: SecretStr | None = Field(None, description="The key itself instead of the env var.")
    webhook_allowlist: list[str] = Field(default_factory=list, description="Webhook hosts ('api.example.com', "
                                                                           "'*.example.com').")
    webhook_allow_private: bool = Field(False, description="Allow http and private/loopback targets (tests only).")
    webhook_max_attempts: int = Field(5, ge=1, le=20)
    webhook_backoff_s: float = Field(1.0, gt=0)
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    provenance: ProvenanceConfig = Field(default_factory=ProvenanceConfig)

    @model_validator(mode="after")
    def _auth_is_explicit(self) -> "AppArgs":
        if not self.auth.disabled and not self.auth.api_key_sha256 and not self.auth.api_keys_env:
            raise ValueError("auth: give api_key_sha256 or api_keys_env, or set auth.disabled explicitly")
        return self

    @model_validator(mode="after")
    def _orphans_outlive_requests(self) -> "AppArgs":
        if self.retention.orphans_s < self.request_timeout_s:  # a render still storing is not an orphan
            raise ValueError(f"retention.orphans_s ({self.retention.orphans_s}) must be at least request_timeout_s "
                             f"({self.request_timeout_s})")
        return self

    def signing_keys(self) -> "SigningKeys":
        """The URL and webhook signing keys: from their env vars, or given in the args.
        There is no random default: every replica, now and after a redeploy, must sign
        with the same keys, or links and webhook secrets would break."""
        keys = []
        for name, env, given in (("url_signing_key", self.url_signing_key_env, self.url_signing_key),
                                 ("webhook_signing_key", self.webhook_signing_key_env, self.webhook_signing_key)):
            value = os.environ.get(env) or (given.get_secret_value() if given is not None else "")
            if len(value) < 16:
                raise InvalidParameter(name, f"set the env var {env} to a secret of at least 16 characters (the "
                                             "same on every node; e.g. `openssl rand -hex 32`)")
            keys.append(value)
        return SigningKeys(url=keys[0], webhook=keys[1])


class SigningKeys(BaseModel):
    url: str
    webhook: str
