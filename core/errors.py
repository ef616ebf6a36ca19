"""The one exception tree of facefed; every error a user can cause is a subclass."""


class FacefedError(Exception):
    """Base class of every error facefed raises on purpose.

    Attributes:
        exit_code: The process exit code the CLI uses for this kind of error.
    """

    exit_code: int = 1


class ConfigurationError(FacefedError):
    """Raised when a setting, option or registry name is invalid."""

    exit_code = 2


class ImageError(FacefedError):
    """Raised when an input cannot be used as an image."""

    exit_code = 3


class EmptyImageError(ImageError):
    """Raised when the input holds no bytes at all."""


class UnsupportedImageError(ImageError):
    """Raised when the input is not an image in a supported format."""


class CorruptImageError(ImageError):
    """Raised when the input looks like an image but cannot be decoded."""


class TruncatedImageError(CorruptImageError):
    """Raised when the image data ends before the image does."""


class ImageTooLargeError(ImageError):
    """Raised, before decoding, when an image has more pixels than allowed."""


class FaceError(FacefedError):
    """Raised when an image cannot give the face an operation needs."""

    exit_code = 4


class NoFaceError(FaceError):
    """Raised when no face is found where one is required."""


class QualityError(FaceError):
    """Raised when a face fails the quality gate; `reasons` says why."""

    def __init__(self, message: str, reasons: list[str]) -> None:
        super().__init__(message)
        self.reasons = reasons


class SpoofError(FaceError):
    """Raised when a presentation attack is detected; `reasons` says why."""

    def __init__(self, message: str, reasons: list[str]) -> None:
        super().__init__(message)
        self.reasons = reasons


class ModelError(FacefedError):
    """Raised when a model is unknown, corrupt, or used with the wrong input."""

    exit_code = 5


class TemplateError(FacefedError):
    """Raised when a template is malformed or does not fit the gallery."""

    exit_code = 6


class ProtectionError(FacefedError):
    """Raised for an unknown protection scheme or key version."""

    exit_code = 6


class PrivacyBudgetExceededError(FacefedError):
    """Raised when training would spend more privacy budget than a site has."""

    exit_code = 7


class NotFoundError(FacefedError):
    """Raised when a referenced object (subject, key, run, model) does not exist."""

    exit_code = 8


class GoneError(NotFoundError):
    """Raised when a referenced object existed but was erased."""


class PermissionDeniedError(FacefedError):
    """Raised when a caller acts beyond its rights."""

    exit_code = 9


class ConflictError(FacefedError):
    """Raised when a request conflicts with the current state."""

    exit_code = 10


class ServiceError(FacefedError):
    """Raised when a remote facefed service fails or cannot be reached."""

    exit_code = 11
