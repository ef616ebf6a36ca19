"""Camera profiles: documented degradations that simulate a site's capture conditions.

Each profile turns a clean RGB photo into what a given camera would have taken:

- ``low_light``: exposure cut to about a quarter with a gamma of 1.8, then
  Poisson shot noise and Gaussian read noise (sigma 6 grey levels), the two
  dominant sensor noise sources in low light (Foi et al., 2008).
- ``motion_blur_jpeg``: a 9-pixel linear motion blur at a random angle
  followed by JPEG compression at quality 20 (blocking and ringing).
- ``lowres_gray``: grayscale, downsampled to 48 pixels on the long side and
  upsampled back with bilinear interpolation (a far, cheap CCTV camera).

Randomness is passed in as a numpy Generator so a profile is reproducible.
"""

from collections.abc import Callable
from typing import Literal, get_args

import cv2
import numpy as np

from facefed.core.errors import ConfigurationError

CameraProfile = Literal["clean", "low_light", "motion_blur_jpeg", "lowres_gray"]
Degrade = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _clean(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image.copy()


def _low_light(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    scaled = 255.0 * (image.astype(np.float64) / 255.0) ** 1.8 * 0.25
    # Shot noise: photon counts are Poisson; 0.5 photons per grey level.
    photons = rng.poisson(np.maximum(scaled, 0.0) * 0.5) / 0.5
    noisy = photons + rng.normal(0.0, 6.0, size=image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _motion_blur_jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    length = 9
    kernel: np.ndarray = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    angle = float(rng.uniform(0.0, 180.0))
    rotation = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1)
    rotated = np.asarray(cv2.warpAffine(kernel, rotation, (length, length)), np.float32)
    kernel = rotated / max(float(rotated.sum()), 1e-6)
    blurred = cv2.filter2D(image, -1, kernel)
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(blurred, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 20]
    )
    if not ok:
        raise ConfigurationError("JPEG encoding failed while degrading a photo.")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ConfigurationError("JPEG decoding failed while degrading a photo.")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _lowres_gray(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    height, width = gray.shape
    factor = 48.0 / max(height, width)
    small = cv2.resize(
        gray,
        (max(1, round(width * factor)), max(1, round(height * factor))),
        interpolation=cv2.INTER_AREA,
    )
    restored = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.repeat(restored[:, :, None], 3, axis=2)


_PROFILES: dict[str, Degrade] = {
    "clean": _clean,
    "low_light": _low_light,
    "motion_blur_jpeg": _motion_blur_jpeg,
    "lowres_gray": _lowres_gray,
}


def known_profiles() -> tuple[str, ...]:
    """Names of the camera profiles, in a stable order."""
    return get_args(CameraProfile)


def degrade(image: np.ndarray, profile: str, *, rng: np.random.Generator) -> np.ndarray:
    """Apply a camera profile to an RGB uint8 photo.

    Args:
        image: RGB uint8 array (H, W, 3).
        profile: One of `known_profiles()`.
        rng: Source of the profile's noise and blur angle.

    Returns:
        A new RGB uint8 array of the same shape.

    Raises:
        ConfigurationError: The profile is unknown or the image is not RGB uint8.
    """
    if profile not in _PROFILES:
        raise ConfigurationError(
            f"Unknown camera profile {profile!r}; known: {', '.join(known_profiles())}."
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ConfigurationError(
            f"A camera profile needs an RGB uint8 (H, W, 3) image, got "
            f"{image.dtype} {image.shape}."
        )
    return _PROFILES[profile](image, rng)
