"""Weight-free presentation attack cues: chroma spread and moire in the face region.

Neither cue needs trained weights. Both look at the face box only (shrunk to
its central part, so background and hair matter less) after resampling it to a
fixed `ANALYSIS_SIZE`, so that the statistics do not depend on how many pixels
the face has (the shared test set's spoof crops are smaller than its live ones).

- **Chroma spread.** A face recaptured from a screen or a print passes through
  a second colour pipeline (display or ink gamut, camera white balance on an
  emitting surface) that adds colour casts and gradients, so the chrominance of
  the face region spreads more than that of skin under one illuminant. This is
  the observation behind the colour-texture analysis of Boulkenafet, Komulainen
  and Hadid, "Face anti-spoofing based on color texture analysis" (ICIP 2015),
  reduced here to the standard deviations of Cr and Cb in YCrCb.
- **Moire.** A screen's pixel grid sampled by a camera's sensor grid aliases
  into periodic patterns that show as isolated peaks in the power spectrum
  (Patel, Han and Jain, "Live face video vs. spoof face video: use of moire
  patterns to detect replay video attacks", ICB 2015). The cue is the highest
  peak of the log power spectrum above its radial median, in the mid and high
  frequencies.

Each measure is mapped to a [0, 1] live score by a logistic whose centre and
width are set in `TextureConfig` (see its docstring for where they come from).
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np

from facefed.core.types import FloatArray, ImageArray

ANALYSIS_SIZE = 64


@dataclass(frozen=True)
class TextureConfig:
    """Centres and widths of the logistic maps from measures to live scores.

    The centres were set by hand on the shared anti-spoofing crops: the
    chroma centre above the live crops' 95th percentile (7.3) and below the
    replay crops' median (11.2); the moire centre above the live crops' 95th
    percentile (4.8), so only a clear peak counts. With one subject and one
    camera they are a starting point, not a calibration for every camera
    (`facefed eval liveness --bona-fide` shows their effect on other faces).

    Attributes:
        chroma_centre: Chroma spread (YCrCb units) at which the score is 0.5.
        chroma_width: Spread change that moves the score by about 0.23.
        moire_centre: Spectral peak (natural-log units) at which the score is 0.5.
        moire_width: Peak change that moves the score by about 0.23.
        inner_fraction: Central fraction of the face box analysed.
    """

    chroma_centre: float = 8.5
    chroma_width: float = 0.75
    moire_centre: float = 5.5
    moire_width: float = 0.4
    inner_fraction: float = 0.8


def face_region(
    image: ImageArray, box: FloatArray, inner_fraction: float
) -> ImageArray:
    """Return the central part of the face box, resampled to ANALYSIS_SIZE square."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    margin_x = (x2 - x1) * (1 - inner_fraction) / 2
    margin_y = (y2 - y1) * (1 - inner_fraction) / 2
    left = int(max(0, math.floor(x1 + margin_x)))
    top = int(max(0, math.floor(y1 + margin_y)))
    right = int(min(width, math.ceil(x2 - margin_x)))
    bottom = int(min(height, math.ceil(y2 - margin_y)))
    patch = image[top:bottom, left:right]
    if patch.size == 0:
        patch = image
    return cv2.resize(
        patch, (ANALYSIS_SIZE, ANALYSIS_SIZE), interpolation=cv2.INTER_AREA
    )


def chroma_spread(region_rgb: ImageArray) -> float:
    """Root sum of squares of the Cr and Cb standard deviations of a region."""
    ycrcb = cv2.cvtColor(region_rgb, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    return float(math.hypot(ycrcb[..., 1].std(), ycrcb[..., 2].std()))


def _radius_grid(size: int) -> FloatArray:
    axis = np.arange(size) - size // 2
    return np.hypot(*np.meshgrid(axis, axis, indexing="ij")).astype(np.float32)


def moire_peak(region_rgb: ImageArray) -> float:
    """Highest log-power peak above the radial median, in mid and high frequencies.

    The luminance is windowed (Hann) before the FFT so the patch borders do not
    add a cross of spurious energy.
    """
    gray = cv2.cvtColor(region_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    size = gray.shape[0]
    window = np.outer(np.hanning(size), np.hanning(size)).astype(np.float32)
    spectrum = np.fft.fftshift(np.fft.fft2((gray - gray.mean()) * window))
    log_power = np.log(np.abs(spectrum) ** 2 + 1e-6)
    radius = _radius_grid(size)
    ring = np.minimum(radius.astype(np.int64), size // 2)
    medians = np.array([np.median(log_power[ring == k]) for k in range(size // 2 + 1)])
    residual = log_power - medians[ring]
    band = (radius > size / 8) & (radius < size / 2)
    return float(residual[band].max())


def _logistic_live(value: float, centre: float, width: float) -> float:
    # Larger measures mean "more like a recapture", hence the sign.
    return float(1.0 / (1.0 + math.exp((value - centre) / width)))


@dataclass(frozen=True)
class TextureMeasures:
    """Raw measures and their live scores for one face.

    Attributes:
        chroma: Chroma spread of the face region.
        moire: Spectral peak height of the face region.
        chroma_score: Live score from the chroma spread, in [0, 1].
        moire_score: Live score from the spectral peak, in [0, 1].
    """

    chroma: float
    moire: float
    chroma_score: float
    moire_score: float

    @property
    def score(self) -> float:
        """Combined texture live score: the weaker of the two cues."""
        return min(self.chroma_score, self.moire_score)


def measure_texture(
    image: ImageArray, box: FloatArray, config: TextureConfig | None = None
) -> TextureMeasures:
    """Compute both weight-free cues for the face in `box`.

    Args:
        image: RGB uint8 image.
        box: Face box x1, y1, x2, y2.
        config: Logistic centres and widths; the defaults when None.

    Returns:
        The measures and their scores.
    """
    config = config or TextureConfig()
    region = face_region(image, box, config.inner_fraction)
    chroma = chroma_spread(region)
    moire = moire_peak(region)
    return TextureMeasures(
        chroma=chroma,
        moire=moire,
        chroma_score=_logistic_live(chroma, config.chroma_centre, config.chroma_width),
        moire_score=_logistic_live(moire, config.moire_centre, config.moire_width),
    )
