"""C2PA provenance (pipeline.provenance): signed PNG, JPEG and WebP files read back valid with
the AI-generation action and the settings that made them, pixels unchanged; tampering with the
pixels or the manifest is caught; identity data and bad credentials are refused. Certificates
are made at run time (make_test_chain); nothing uses the network."""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.provenance import Signing, make_test_chain, read, sign

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
SIZES = [(64, 64), (300, 260), (257, 513)]  # width, height: square, landscape, odd portrait
SERVICE = "instantid-serve"
GENERATION = {
    "models": {"base": "stabilityai/stable-diffusion-xl-base-1.0",
               "identitynet": "InstantX/InstantID"},
    "steps": 30, "guidance": 5.0, "seed": 1234567, "scheduler": "EulerDiscreteScheduler",
    "size": [1024, 1024],  # c2pa's Reader.json() would garble a list of numbers: read() must not
    "prompt": "a watercolor portrait, ünïcode ✓", "negative_prompt": None,
    "identitynet_strength": 0.8, "enhance_face_region": True,
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_test_chain(tmp_path_factory.mktemp("ca-a"))


@pytest.fixture(scope="module")
def other_chain(tmp_path_factory):
    return make_test_chain(tmp_path_factory.mktemp("ca-b"), name="another test")


@pytest.fixture(scope="module")
def signing(chain):
    return Signing.from_files(chain.key, chain.cert)


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A gradient with noise: smooth areas and detail, like a photo."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noise = np.random.default_rng(seed).normal(0, 12, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, mime: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, FORMATS[mime])
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def pixel_data(data: bytes, mime: str) -> tuple[int, int]:
    """Start and end of the compressed pixel data in an encoded file, found by walking the
    file's chunks or segments: a byte search could match inside the manifest before them
    (its certificates and signature are random bytes)."""
    if mime == "image/png":
        at, idat = 8, None  # after the signature: length, type, data, CRC
        while at < len(data):
            length, kind = struct.unpack(">I4s", data[at:at + 8])
            if kind == b"IDAT":
                idat = at + 8, at + 8 + length  # the last one
            at += 12 + length
        assert idat is not None, "no IDAT chunk"
        return idat
    if mime == "image/jpeg":
        at = 2  # after SOI: segments of marker and length, up to the start of scan
        while data[at] == 0xFF and data[at + 1] != 0xDA:
            at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        assert data[at] == 0xFF, f"no JPEG segment at byte {at}"
        return at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0], data.rindex(b"\xff\xd9")
    at = 12  # after RIFF's header: chunks of fourcc, size and data (padded to even)
    while data[at:at + 4] not in (b"VP8 ", b"VP8L"):
        assert at < len(data), "no VP8 or VP8L chunk"
        at += 8 + (struct.unpack("<I", data[at + 4:at + 8])[0] + 1) // 2 * 2
    return at + 8, at + 8 + struct.unpack("<I", data[at + 4:at + 8])[0]


def flip_pixel_byte(data: bytes, mime: str) -> bytes:
    """One bit of the pixel data flipped, mid-stream (in JPEG, away from any 0xFF marker byte)."""
    start, end = pixel_data(data, mime)
    at = (start + end) // 2
    while at < end and not (2 <= data[at] <= 0xFD and data[at - 1] != 0xFF):
        at += 1
    assert at < end, "no byte to flip in the second half of the pixel data"
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mime", FORMATS)
def test_a_signed_image_reads_back_valid_with_settings_and_pixels_unchanged(signing, mime, size):
    original = encode(picture(*size), mime)
    signed = sign(original, mime, signing, service=SERVICE, generation=GENERATION)
    assert signed != original and len(signed) > len(original)
    provenance = read(signed, mime)
    assert provenance is not None
    assert provenance.valid and provenance.errors == []
    assert provenance.trusted is None  # no trust anchors given
    assert provenance.created_by_algorithm
    assert provenance.generation == GENERATION
    assert provenance.generator.split()[0] == SERVICE
    assert "instantid-serve test signer" in provenance.signer
    with Image.open(io.BytesIO(signed)) as image:
        assert (image.format, image.size) == (FORMATS[mime], size)
    assert np.array_equal(pixels(signed), pixels(original))


@pytest.mark.parametrize("mime", FORMATS)
def test_an_unsigned_image_has_no_provenance(mime):
    assert read(encode(picture(64, 64), mime), mime) is None


@pytest.mark.parametrize("mime", FORMATS)
def test_changed_pixels_make_the_manifest_invalid(signing, mime):
    signed = sign(encode(picture(300, 260), mime), mime, signing, service=SERVICE,
                  generation=GENERATION)
    tampered = flip_pixel_byte(signed, mime)
    provenance = read(tampered, mime)
    assert provenance is not None and not provenance.valid
    assert "assertion.dataHash.mismatch" in provenance.errors


@pytest.mark.parametrize("mime", FORMATS)
def test_changed_recorded_settings_make_the_manifest_invalid(signing, mime):
    signed = sign(encode(picture(64, 64), mime), mime, signing, service=SERVICE,
                  generation=GENERATION)
    assert signed.count(b"a watercolor portrait") == 1
    tampered = signed.replace(b"a watercolor portrait", b"a watercolor portraiT")
    provenance = read(tampered, mime)
    assert provenance is not None and not provenance.valid
    assert "assertion.hashedURI.mismatch" in provenance.errors


@pytest.mark.parametrize("mime", FORMATS)
def test_a_manifest_that_cannot_be_parsed_reads_as_invalid(signing, mime):
    signed = sign(encode(picture(64, 64), mime), mime, signing, service=SERVICE, generation={})
    garbled = signed.replace(b"jumb", b"jumx", 1)  # the manifest store's first box header
    provenance = read(garbled, mime)
    assert provenance is not None and not provenance.valid
    assert provenance.errors and "JUMBF" in provenance.errors[0]
    assert provenance.generation is None and not provenance.created_by_algorithm


def test_trust_is_separate_from_validity(chain, other_chain, signing):
    signed = sign(encode(picture(64, 64), "image/png"), "image/png", signing, service=SERVICE,
                  generation={})
    ours = read(signed, "image/png", trust_anchors_pem=chain.ca.read_bytes())
    assert ours.valid and ours.trusted is True
    theirs = read(signed, "image/png", trust_anchors_pem=other_chain.ca.read_bytes())
    assert theirs.valid and theirs.trusted is False and theirs.errors == []
    with pytest.raises(ValueError, match="trust anchors: not readable PEM"):
        read(signed, "image/png", trust_anchors_pem=b"not a certificate")


@pytest.mark.parametrize("key_type, alg", [("ed25519", "ed25519"), ("rsa", "ps256")])
def test_ed25519_and_rsa_keys_sign_with_the_algorithm_they_call_for(tmp_path, key_type, alg):
    chain = make_test_chain(tmp_path, key_type=key_type)
    signing = Signing.from_files(chain.key, chain.cert)
    assert signing.alg == alg
    signed = sign(encode(picture(64, 64), "image/jpeg"), "image/jpeg", signing, service=SERVICE,
                  generation={"seed": 1})
    provenance = read(signed, "image/jpeg", trust_anchors_pem=chain.ca.read_bytes())
    assert provenance.valid and provenance.trusted and provenance.generation == {"seed": 1}


@pytest.mark.parametrize("generation, where", [
    ({"face_embedding": [0.1] * 512}, "generation.face_embedding"),
    ({"ip_adapter": {"embedding": [0.5]}}, "generation.ip_adapter.embedding"),
    ({"ip_adapter_image_embeds": [[0.5]]}, "generation.ip_adapter_image_embeds"),
    ({"inputs": {"face_image": "me.jpg"}}, "generation.inputs.face_image"),
    ({"face_images": []}, "generation.face_images"),
    ({"image": "data:image/png;base64,AAAA"}, "generation.image"),
    ({"vector": [0.25] * 512}, "generation.vector: a list of 512 numbers"),
    ({"faces": [{"scores": [0.1] * 65}]}, r"generation.faces\[0\].scores"),
    ({"raw": b"\x89PNG"}, "generation.raw"),
    ({"kps": np.zeros((5, 2))}, "generation.kps"),
])
def test_identity_data_is_refused(signing, generation, where):
    with pytest.raises(ValueError, match=where):
        sign(encode(picture(64, 64), "image/png"), "image/png", signing, service=SERVICE,
             generation=generation)


def test_short_lists_of_numbers_are_kept(signing):
    generation = {"size": [1024, 1024], "keypoint_weights": [0.5] * 64}
    signed = sign(encode(picture(64, 64), "image/png"), "image/png", signing, service=SERVICE,
                  generation=generation)
    assert read(signed, "image/png").generation == generation


def test_a_key_that_does_not_match_the_certificate_is_refused(chain, other_chain):
    with pytest.raises(ValueError, match="signing key does not match the certificate"):
        Signing.from_files(other_chain.key, chain.cert)


def test_missing_files_are_named(chain, tmp_path):
    with pytest.raises(ValueError, match="signing key: cannot read .*nowhere.key"):
        Signing.from_files(tmp_path / "nowhere.key", chain.cert)
    with pytest.raises(ValueError, match="signing certificate chain: cannot read .*nowhere.pem"):
        Signing.from_files(chain.key, tmp_path / "nowhere.pem")


def test_junk_pem_is_refused(chain, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="signing key: not a readable PEM private key"):
        Signing.from_files(junk, chain.cert)
    with pytest.raises(ValueError, match="signing certificate chain: not readable PEM"):
        Signing.from_files(chain.key, junk)


def test_an_algorithm_that_does_not_fit_the_key_is_refused(chain):
    with pytest.raises(ValueError, match="'ps256' does not fit .*use 'es256'"):
        Signing.from_files(chain.key, chain.cert, alg="ps256")


def test_an_expired_certificate_is_refused_when_configured(tmp_path):
    chain = make_test_chain(tmp_path, days=-1)
    with pytest.raises(ValueError, match="c2pa refuses these signing credentials: .*not valid"):
        Signing.from_files(chain.key, chain.cert)


def test_a_traditional_openssl_ec_key_is_accepted(chain):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(chain.key.read_bytes(), None)
    sec1 = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    assert sec1.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    signing = Signing.from_pem(sec1, chain.cert.read_bytes())
    signed = sign(encode(picture(64, 64), "image/webp"), "image/webp", signing, service=SERVICE,
                  generation={})
    assert read(signed, "image/webp").valid


def test_the_private_key_stays_out_of_the_repr(signing):
    assert b"PRIVATE KEY" in signing.key_pem
    assert "PRIVATE KEY" not in repr(signing)


def test_other_types_and_non_images_are_refused(signing):
    with pytest.raises(ValueError, match="not 'image/gif'"):
        sign(b"GIF89a", "image/gif", signing, service=SERVICE, generation={})
    with pytest.raises(ValueError, match="not 'image/gif'"):
        read(b"GIF89a", "image/gif")
    with pytest.raises(ValueError, match="cannot sign this image/png file"):
        sign(b"not an image", "image/png", signing, service=SERVICE, generation={})
    with pytest.raises(ValueError, match="not a readable image/png file"):
        read(b"not an image", "image/png")


def test_importing_the_module_loads_neither_c2pa_nor_the_model_stack():
    code = ("import sys, pipeline.provenance; "
            "print(sorted({'c2pa', 'torch', 'ray', 'diffusers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_the_settings_a_manifest_states_are_public_ones_only(signing):
    """settings_of keeps the sampling settings and add-on names (a LoRA's file name, not its
    path) and never the prompts; ``num_images`` is a setting, not image data."""
    from pipeline.params import GenerationParams
    from pipeline.provenance import settings_of

    params = GenerationParams(prompt="a portrait of Jane Doe", negative_prompt="blurry", num_inference_steps=4,
                              guidance_scale=1.5, lora="/srv/loras/lcm-lora-sdxl.safetensors", num_images=2)
    settings = settings_of(params, generation_id="g_x", num_images=params.num_images)
    assert "Jane" not in repr(settings) and "blurry" not in repr(settings)
    assert settings["lora"] == "lcm-lora-sdxl.safetensors" and "/srv" not in repr(settings)
    assert (settings["steps"], settings["guidance_scale"], settings["num_images"]) == (4, 1.5, 2)
    signed = sign(encode(picture(64, 64), "image/png"), "image/png", signing, service=SERVICE, generation=settings)
    assert read(signed, "image/png").generation == settings


def test_a_service_trusts_its_own_chain_and_verify_tells_its_files_from_others(chain, other_chain):
    from pipeline.provenance import ContentCredentials, inspect, made_by

    ours = ContentCredentials(Signing.from_files(chain.key, chain.cert), "instantid")
    theirs = ContentCredentials(Signing.from_files(other_chain.key, other_chain.cert), "elsewhere")
    assert ours.trust_anchors() == chain.ca.read_bytes()  # the root the chain ends with
    data = encode(picture(300, 260), "image/jpeg")
    mine, other = ours.sign(data, "image/jpeg", {"steps": 1}), theirs.sign(data, "image/jpeg", {"steps": 1})
    read_mine = inspect(mine, trust_anchors_pem=ours.trust_anchors())
    read_other = inspect(other, trust_anchors_pem=ours.trust_anchors())
    assert read_mine.valid and read_mine.trusted and made_by(read_mine, "instantid")
    assert read_other.valid and read_other.trusted is False and not made_by(read_other, "instantid")
    assert made_by(read_other, "elsewhere") and not made_by(read_other, "elsew")
    assert inspect(data) is None and inspect(b"GIF89a not ours") is None


def test_verify_command_reads_and_validates_the_manifest(signing, chain, other_chain, tmp_path, capsys):
    """A picture too small for the watermark: the manifest alone says who made it."""
    import json

    from pipeline.cli import main

    signed = sign(encode(picture(64, 64), "image/png"), "image/png", signing, service="instantid",
                  generation={"steps": 2})
    path, tampered = tmp_path / "signed.png", tmp_path / "tampered.jpg"
    path.write_bytes(signed)
    jpeg = sign(encode(picture(64, 64), "image/jpeg"), "image/jpeg", signing, service="instantid",
                generation={"steps": 2})
    tampered.write_bytes(flip_pixel_byte(jpeg, "image/jpeg"))  # still decodes (a PNG's CRC would not let it)
    assert main(["verify", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["watermark"]["found"] is False
    assert report["c2pa"]["valid"] and report["c2pa"]["trusted"] is None and report["c2pa"]["generation"] == {
        "steps": 2}
    assert main(["verify", str(path), "--trust-anchors", str(chain.ca)]) == 0
    assert json.loads(capsys.readouterr().out)["c2pa"]["trusted"] is True
    # valid, but its signer leads to none of the CAs given: not taken for this service's
    assert main(["verify", str(path), "--trust-anchors", str(other_chain.ca)]) == 1
    assert json.loads(capsys.readouterr().out)["c2pa"]["trusted"] is False
    assert main(["verify", str(path), "--service", "elsewhere"]) == 1
    capsys.readouterr()
    assert main(["verify", str(tampered)]) == 1
    changed = json.loads(capsys.readouterr().out)["c2pa"]
    assert changed["valid"] is False and "assertion.dataHash.mismatch" in changed["errors"]
    assert main(["verify", str(path), "--trust-anchors", str(tmp_path / "none.pem")]) == 2
    assert "--trust-anchors" in capsys.readouterr().err
