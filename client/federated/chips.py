"""Face chips for training: the site's photos through the standard face pipeline.

Chips come from the same pipeline the site enrolls with
(`facefed.models.zoo.default_pipeline`, without liveness: training photos
are not live captures), detector and alignment alike, so the network is
fine-tuned on exactly the chips it sees in service. The quality gate is not
applied on purpose: a site with a poor camera must train and evaluate on
its poor photos, which are the reason it fine-tunes.
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facefed.client.federated.store import CHIP_SIZE, ChipFn
from facefed.core.errors import ImageError

if TYPE_CHECKING:
    from facefed.core.pipeline import FacePipeline

logger = logging.getLogger(__name__)


def pipeline_chip_fn() -> ChipFn:
    """A chip function over the default face pipeline (built once)."""
    import cv2

    pipelines: list[FacePipeline] = []

    def chip_of(photo: Path) -> np.ndarray | None:
        from facefed.core.image import decode_image

        if not pipelines:
            # Built on first use: a store whose chips are all cached never
            # loads the detector.
            from facefed.models.zoo import default_pipeline

            pipelines.append(default_pipeline(liveness=False))
        pipeline = pipelines[0]
        try:
            image = decode_image(photo)
        except ImageError as error:
            logger.debug("Unreadable photo %s: %s", photo.name, error)
            return None
        faces = pipeline.detector.detect(image)
        if not faces:
            return None
        # The largest face, as FacePipeline.embed_one picks it.
        face = max(faces, key=lambda f: (f.width * f.height, f.score))
        aligned = pipeline.align(image, face)
        if aligned is None:
            return None
        chip: np.ndarray = np.asarray(aligned, dtype=np.uint8)
        if chip.shape[:2] != (CHIP_SIZE, CHIP_SIZE):
            chip = cv2.resize(
                chip, (CHIP_SIZE, CHIP_SIZE), interpolation=cv2.INTER_AREA
            )
        return np.ascontiguousarray(chip)

    return chip_of
