"""C2PA provenance (Content Credentials) for generated images, with c2pa-python.

:func:`sign` embeds a signed C2PA manifest in a PNG, JPEG or WebP file, pixels untouched (the
manifest goes in a chunk/segment of its own). It states that a trained model made the image
(a ``c2pa.actions.v2`` assertion: one ``c2pa.created`` action, IPTC digital source type
``trainedAlgorithmicMedia``, the service as software agent), names the service and this
package's version as claim generator, and carries the caller's generation settings as the
custom assertion ``org.instantid.generation``. Those never hold identity data: :func:`sign`
refuses keys named like embeddings or images, non-JSON values and lists of over 64 numbers.

:func:`read` validates a file's manifest. ``valid``: the claim signature and the hash bindings
(pixels, assertions) check out. Trust is apart: c2pa has no trust anchors by default and
reports any signer outside them as ``signingCredential.untrusted``, which ``read`` turns into
``trusted`` (None unless the caller passes the CAs it trusts), not into ``errors``.

No network use unless a timestamp authority URL is configured: remote manifests and OCSP are
never fetched. Each call makes its own c2pa ``Context``, so no global c2pa state is set. c2pa
and cryptography are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import base64
import datetime
import functools
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

MIME_TYPES = ("image/png", "image/jpeg", "image/webp")
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
GENERATION_LABEL = "org.instantid.generation"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MAX_NUMBERS = 64  # a longer list of numbers in the settings looks like an embedding
_UNTRUSTED, _TRUSTED = "signingCredential.untrusted", "signingCredential.trusted"
_IDENTITY_KEY = re.compile(r"embed|^(?!num_)(\w+_)?images?$")  # face_embedding, image_embeds, face_image(s)
_OFFLINE = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_SIGN_SETTINGS = {**_OFFLINE, "builder": {"thumbnail": {"enabled": False}}}
_PROBE_PNG = base64.b64decode(  # 1x1 black PNG, signed once to check a Signing
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC")


@dataclass(frozen=True)
class Signing:
    """Signing credentials, checked when made (a bad key or chain raises ValueError here,
    never at sign time). ``key_pem`` is kept as unencrypted PKCS#8 PEM (what c2pa reads);
    ``cert_chain_pem`` is the end-entity certificate first, then intermediates."""

    key_pem: bytes = field(repr=False)
    cert_chain_pem: bytes
    alg: str = "es256"
    tsa_url: str | None = None  # RFC 3161 timestamp authority; None: no network use

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_pem", _check_credentials(self))
        import c2pa
        try:  # what c2pa checks itself (certificate profile and validity): once, offline
            _embed(_PROBE_PNG, "image/png", self, _manifest("signing check", {}, "image/png"), None)
        except c2pa.C2paError as e:
            raise ValueError(f"c2pa refuses these signing credentials: {e}") from None

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_chain_pem: bytes, alg: str | None = None,
                 tsa_url: str | None = None) -> Signing:
        """``alg`` None: the one the key calls for (ES256 for a P-256 key, PS256 for RSA)."""
        return cls(key_pem, cert_chain_pem, alg or _alg_for(_load_key(key_pem)), tsa_url)

    @classmethod
    def from_files(cls, key_path: str | Path, cert_path: str | Path, alg: str | None = None,
                   tsa_url: str | None = None) -> Signing:
        return cls.from_pem(_read_file(key_path, "signing key"),
                            _read_file(cert_path, "signing certificate chain"), alg, tsa_url)


@dataclass(frozen=True)
class Provenance:
    valid: bool  # signature and hash bindings validate (trust aside)
    trusted: bool | None  # chain leads to one of trust_anchors_pem; None when none given
    errors: list[str]  # c2pa validation failure codes, the untrusted-signer code aside
    generator: str  # claim generator: "name version"
    created_by_algorithm: bool  # c2pa.created with digitalSourceType trainedAlgorithmicMedia
    generation: dict | None  # the org.instantid.generation assertion
    signer: str | None  # "<subject CN>, issued by <issuer CN>" of the signing certificate


def sign(data: bytes, mime: str, signing: Signing, *, service: str, generation: dict) -> bytes:
    """``data`` (a PNG, JPEG or WebP file) with a signed C2PA manifest embedded. ValueError:
    an unsupported type, identity data in ``generation``, or a file c2pa cannot sign."""
    _check_mime(mime)
    if not isinstance(generation, dict) or not service:
        raise ValueError("sign needs a service name and a generation dict")
    _refuse_identity_data(generation, "generation")
    import c2pa
    try:
        return _embed(data, mime, signing, _manifest(service, generation, mime), signing.tsa_url)
    except c2pa.C2paError as e:
        raise ValueError(f"cannot sign this {mime} file: {e}") from None


def read(data: bytes, mime: str, *, trust_anchors_pem: bytes | None = None) -> Provenance | None:
    """The C2PA manifest of ``data``, validated; None when it has none. ValueError: an
    unsupported type, a file c2pa cannot parse, or unreadable ``trust_anchors_pem``."""
    _check_mime(mime)
    import c2pa
    settings: dict[str, Any] = dict(_OFFLINE)
    if trust_anchors_pem is not None:  # c2pa ignores anchors it cannot read: check them here
        _load_certs(trust_anchors_pem, "trust anchors")
        settings["trust"] = {"trust_anchors": trust_anchors_pem.decode()}
    try:
        with c2pa.Context.from_dict(settings) as context:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
            if reader is None:
                return None
            with reader:
                store, crjson = json.loads(reader.json()), json.loads(reader.crjson())
    except (c2pa.C2paError.Io, c2pa.C2paError.Other, c2pa.C2paError.NotSupported) as e:
        raise ValueError(f"not a readable {mime} file: {e}") from None
    except c2pa.C2paError as e:  # a manifest is there, but it cannot even be parsed
        return Provenance(False, None if trust_anchors_pem is None else False, [str(e)], "",
                          False, None, None)
    label = store.get("active_manifest")
    manifest = store.get("manifests", {}).get(label, {})
    errors = list(dict.fromkeys(s.get("code", "") for s in store.get("validation_status") or []
                                if s.get("code") != _UNTRUSTED))
    success = {s.get("code") for s in
               store.get("validation_results", {}).get("activeManifest", {}).get("success", [])}
    info = (manifest.get("claim_generator_info") or [{}])[0]
    generator = " ".join(str(info[k]) for k in ("name", "version") if info.get(k))
    # Assertions come from crJSON, which decodes their CBOR as stored: Reader.json() shows an
    # array of numbers inside an assertion as base64 bytes, each number cut to 8 bits.
    active = next((m for m in crjson.get("manifests", []) if m.get("label") == label), {})
    assertions = active.get("assertions", {})
    actions = [a for name, value in assertions.items() if name.split("__")[0] in
               ("c2pa.actions", "c2pa.actions.v2") for a in value.get("actions", [])]
    cert = active.get("signature", {}).get("certificateInfo", {})
    signer = ", issued by ".join(cert[k]["CN"] for k in ("subject", "issuer")
                                 if cert.get(k, {}).get("CN"))
    return Provenance(
        valid=not errors and store.get("validation_state") in ("Valid", "Trusted"),
        trusted=None if trust_anchors_pem is None else _TRUSTED in success,
        errors=errors,
        generator=generator or manifest.get("claim_generator", ""),
        created_by_algorithm=any(a.get("action") == "c2pa.created" and
                                 a.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA
                                 for a in actions),
        generation=assertions.get(GENERATION_LABEL),
        signer=signer or None)


@dataclass(frozen=True)
class ContentCredentials:
    """What a service signs its outputs with: its credentials and its name."""

    signing: Signing
    service: str

    def sign(self, data: bytes, mime: str, generation: dict) -> bytes:
        return sign(data, mime, self.signing, service=self.service, generation=generation)

    def trust_anchors(self) -> bytes | None:
        """The chain's self-signed certificates (its root, when the chain includes it): what
        the service's own reader trusts, so that its files read as trusted."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        roots = [c for c in x509.load_pem_x509_certificates(self.signing.cert_chain_pem) if c.subject == c.issuer]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in roots) or None


KEY_ENV, CERT_ENV = "INSTANTID_C2PA_KEY", "INSTANTID_C2PA_CERT"


def credentials_from_env(service: str) -> ContentCredentials | None:
    """The credentials in $INSTANTID_C2PA_KEY and $INSTANTID_C2PA_CERT (PEM), None when they
    are not set; ValueError naming the problem when they are set but unusable."""
    import os

    key, cert = os.environ.get(KEY_ENV, "").strip(), os.environ.get(CERT_ENV, "").strip()
    if not key and not cert:
        return None
    if not key or not cert:
        raise ValueError(f"set both {KEY_ENV} and {CERT_ENV} (a C2PA signing key and its certificate chain, PEM)")
    return ContentCredentials(Signing.from_pem(key.encode(), cert.encode()), service)


def settings_of(params, **extra) -> dict:
    """The public generation settings of ``params`` (a :class:`~pipeline.params.GenerationParams`)
    that a manifest states: the method, the sampling settings and the add-ons' names. Never
    the prompts (the file is public; a prompt may name the person) nor any face data."""
    settings = {"method": "InstantID", "models": ["SDXL", "InstantID IdentityNet", "InstantID IP-Adapter",
                                                  "insightface antelopev2"],
                "steps": params.num_inference_steps, "guidance_scale": params.guidance_scale,
                "scheduler": params.scheduler, "ip_adapter_scale": params.ip_adapter_scale,
                "controlnet_conditioning_scale": params.controlnet_conditioning_scale,
                "control_guidance": [params.control_guidance_start, params.control_guidance_end],
                "style": params.style, "lora": Path(params.lora).name if params.lora else None,
                "strength": params.strength, "controlnets": [{"type": c.type, "scale": c.scale} for c in params.controlnets]}
    return {k: v for k, v in {**settings, **extra}.items() if v is not None}


def mime_of(data: bytes) -> str | None:
    """The type of a PNG, JPEG or WebP file, from its first bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def inspect(data: bytes, *, trust_anchors_pem: bytes | None = None) -> Provenance | None:
    """:func:`read` for a file of any type: None when it is not a PNG, JPEG or WebP file
    or has no manifest; a manifest c2pa cannot make sense of reads as not valid."""
    mime = mime_of(data)
    if mime is None:
        return None
    try:
        return read(data, mime, trust_anchors_pem=trust_anchors_pem)
    except ValueError as error:  # the picture's own bytes are broken (decoding it says how)
        return Provenance(False, None, [str(error)], "", False, None, None)


def made_by(provenance: Provenance | None, service: str) -> bool:
    """A valid manifest whose claim generator is ``service``."""
    return (provenance is not None and provenance.valid
            and (provenance.generator == service or provenance.generator.startswith(service + " ")))


class ChainFiles(NamedTuple):  # key and cert for Signing.from_files, ca for read()
    key: Path
    cert: Path
    ca: Path


def make_test_chain(directory: str | Path, *, name: str = "instantid-serve test", days: int = 30,
                    key_type: str = "ec") -> ChainFiles:
    """For tests: a throwaway root CA and a signing certificate it issued for an EC P-256,
    "ed25519" or "rsa" key, as c2pa wants a signer's: not a CA, key usage digitalSignature,
    extended key usage emailProtection, key identifiers; valid from a day ago for ``days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "encipher_only", "decipher_only"), False)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = {"ec": lambda: ec.generate_private_key(ec.SECP256R1()),
           "ed25519": ed25519.Ed25519PrivateKey.generate,
           "rsa": lambda: rsa.generate_private_key(65537, 2048)}[key_type]()

    def issue(subject: str, public_key, ca: bool, *extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().issuer_name(names["root CA"])
                   .subject_name(names[subject]).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca, 0 if ca else None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca,
                                                crl_sign=ca, **usage), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), False))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    names = {role: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {role}"),
                              x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
             for role in ("root CA", "signer")}
    ca = issue("root CA", ca_key.public_key(), True).public_bytes(serialization.Encoding.PEM)
    ee = issue("signer", key.public_key(), False,
               x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]))
    Path(directory).mkdir(parents=True, exist_ok=True)
    paths = ChainFiles(*(Path(directory) / f for f in ("signer.key", "chain.pem", "ca.pem")))
    paths.key.write_bytes(_pkcs8(key))
    paths.cert.write_bytes(ee.public_bytes(serialization.Encoding.PEM) + ca)
    paths.ca.write_bytes(ca)
    return paths


def _manifest(service: str, generation: dict, mime: str) -> dict:
    agent = {"name": service, "version": _version()}
    return {"claim_generator_info": [agent], "title": f"{service} image.{mime.split('/')[1]}",
            "format": mime, "assertions": [
                {"label": "c2pa.actions.v2", "data": {"actions": [{
                    "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": agent}]}},
                {"label": GENERATION_LABEL, "data": generation}]}


def _embed(data: bytes, mime: str, s: Signing, manifest: dict, tsa_url: str | None) -> bytes:
    import c2pa
    out = io.BytesIO()
    info = c2pa.C2paSignerInfo(s.alg.encode(), s.cert_chain_pem, s.key_pem, tsa_url)
    with c2pa.Context.from_dict(_SIGN_SETTINGS) as context, c2pa.Signer.from_info(info) as signer:
        c2pa.Builder(manifest, context=context).sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


def _check_credentials(s: Signing) -> bytes:
    """The key as PKCS#8 PEM (what c2pa reads), once it fits the chain and the algorithm."""
    from cryptography.hazmat.primitives import serialization
    key, certs = _load_key(s.key_pem), _load_certs(s.cert_chain_pem, "signing certificate chain")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
        raise ValueError("signing key does not match the certificate (the chain's first, "
                         f"{certs[0].subject.rfc4514_string()})")
    wanted = _alg_for(key)
    if s.alg not in ALGORITHMS or (s.alg != wanted and not wanted[:2] == s.alg[:2] == "ps"):
        raise ValueError(f"signing algorithm {s.alg!r} does not fit this {type(key).__name__} key"
                         f" (use {wanted!r}; c2pa signs with {', '.join(ALGORITHMS)})")
    return _pkcs8(key)


def _pkcs8(key) -> bytes:
    from cryptography.hazmat.primitives import serialization as s
    return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())


def _alg_for(key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    curve = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else None
    alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(curve) or (
        "ps256" if isinstance(key, rsa.RSAPrivateKey) else
        "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else None)
    if alg:
        return alg
    raise ValueError(f"signing key: a {type(key).__name__} key, which C2PA cannot sign with "
                     "(use EC P-256/P-384/P-521, Ed25519 or RSA)")


def _load_key(pem: bytes):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        return load_pem_private_key(pem, password=None)
    except TypeError:  # a password is needed
        raise ValueError("signing key: encrypted; give an unencrypted PEM private key") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"signing key: not a readable PEM private key ({e})") from None


def _load_certs(pem: bytes, what: str) -> list:
    from cryptography import x509
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ValueError(f"{what}: not readable PEM certificates ({e})") from None


def _read_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {str(path)!r} ({e.strerror or e})") from None


def _check_mime(mime: str) -> None:
    if mime not in MIME_TYPES:
        raise ValueError(f"C2PA provenance is written for {', '.join(MIME_TYPES)}, not {mime!r}")


def _refuse_identity_data(value: Any, path: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: keys must be strings, not {k!r}")
            if _IDENTITY_KEY.search(k.lower()):
                raise ValueError(f"{path}.{k}: identity data (a face embedding or an image) is "
                                 "never written into provenance")
            _refuse_identity_data(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        numbers = sum(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
        if numbers > MAX_NUMBERS:
            raise ValueError(f"{path}: a list of {numbers} numbers looks like an embedding; "
                             "identity data is never written into provenance")
        for i, x in enumerate(value):
            _refuse_identity_data(x, f"{path}[{i}]")
    elif not (value is None or isinstance(value, (str, int, bool)) or
              isinstance(value, float) and math.isfinite(value)):
        raise ValueError(f"{path}: {value!r:.40} is not JSON data (raw bytes and arrays are "
                         "refused: they could hold images or embeddings)")


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("instantid-serve")
    except PackageNotFoundError:
        return "0"
