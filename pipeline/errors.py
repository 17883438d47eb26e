"""Typed errors of the InstantID pipeline.

Every error carries a stable machine-readable ``code`` and a human message. They are
plain picklable exceptions, so they cross process and actor boundaries unchanged;
callers (the CLI, the HTTP ingress) decide how to present them.
"""

from __future__ import annotations


class InstantIDError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep subclasses' extra fields through pickling
        return (_rebuild, (type(self), self.__dict__.copy()))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[InstantIDError], state: dict) -> InstantIDError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class InvalidParameter(InstantIDError):
    """A request or call parameter has a value the pipeline cannot use."""

    code = "invalid_parameter"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class InvalidImage(InstantIDError):
    """Bytes that are not a decodable image (or an image we cannot use)."""

    code = "invalid_image"

    def __init__(self, message: str, field: str = "image") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ImageTooLarge(InstantIDError):
    """An image whose bytes or pixel count exceed the configured limits."""

    code = "image_too_large"

    def __init__(self, message: str, field: str = "image") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NoFaceDetected(InstantIDError):
    """The face detector found no face in an image."""

    code = "no_face"

    def __init__(self, message: str = "no face was detected", field: str = "image") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class WeightsNotFound(InstantIDError):
    """A weight file or folder the pipeline needs is missing."""

    code = "weights_not_found"

    def __init__(self, missing: str, looked_in: str, hint: str = "") -> None:
        message = f"missing weights: {missing} (looked in {looked_in})"
        if hint:
            message += f"; {hint}"
        super().__init__(message)
        self.missing = missing
        self.looked_in = looked_in


class InvalidWeights(InstantIDError):
    """A weight file that exists but cannot be loaded into the model (missing tensors,
    wrong shapes, an unrecognised checkpoint)."""

    code = "invalid_weights"


class ProviderUnavailable(InstantIDError):
    """An execution provider or device that was asked for explicitly is not usable."""

    code = "provider_unavailable"
