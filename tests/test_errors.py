import pickle

import pytest

from pipeline.errors import (
    ImageTooLarge,
    InstantIDError,
    InvalidImage,
    InvalidParameter,
    NoFaceDetected,
    ProviderUnavailable,
    WeightsNotFound,
)

CASES = [
    InvalidParameter("width", "must be a multiple of 8, got 100"),
    InvalidImage("is empty", "face_images[0]"),
    ImageTooLarge("is 9000x9000", "pose_image"),
    NoFaceDetected(field="face_images[1]"),
    WeightsNotFound("antelopev2/glintr100.onnx", "/weights/antelopev2", "a hint"),
    ProviderUnavailable("CUDAExecutionProvider was asked for"),
]


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_errors_survive_pickling_with_their_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.code == error.code
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__
    assert isinstance(copy, InstantIDError)


def test_codes_are_stable_and_distinct():
    codes = [type(e).code for e in CASES]
    assert codes == ["invalid_parameter", "invalid_image", "image_too_large", "no_face", "weights_not_found",
                     "provider_unavailable"]


def test_messages_name_the_field():
    assert str(InvalidParameter("height", "must be positive")) == "height: must be positive"
    assert "antelopev2/glintr100.onnx" in str(CASES[4]) and "/weights/antelopev2" in str(CASES[4])


def test_every_error_has_one_public_form():
    from pipeline.pipeline import Cancelled
    from service.errors import Overloaded, RateLimited, Reported, public_error

    assert public_error(InvalidParameter("width", "bad")) == ("invalid_parameter", "width: bad", "width", None)
    assert public_error(RateLimited("quota_exceeded", "used up", 60)) == ("quota_exceeded", "used up", None, 60)
    assert public_error(Overloaded("busy", 7)).retry_after_s == 7
    assert public_error(Cancelled("stopped")).code == "canceled"  # a clear code, never a 500
    assert public_error(Reported("no_face", "face_images[0]: no face", "face_images[0]")).field == "face_images[0]"
    for unexpected in (ValueError("secret detail"), WeightsNotFound("x", "/y"), KeyError("k")):
        assert public_error(unexpected) == ("internal_error", "internal error", None, None)  # says no more
    for error in (RateLimited("rate_limited", "slow down", 3), Reported("timeout", "late")):
        copy = pickle.loads(pickle.dumps(error))  # crosses actor boundaries with its code
        assert copy.code == error.code and copy.__dict__ == error.__dict__
