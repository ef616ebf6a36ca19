"""ONNX export of embedding networks, with a dynamic batch dimension."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from facefed.core.errors import ModelError

logger = logging.getLogger(__name__)

INPUT_NAME = "chips"
OUTPUT_NAME = "embeddings"
DEFAULT_OPSET = 18


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: int,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export an embedding network to ONNX, batch size left dynamic.

    The file is written to a temporary name in the same folder and renamed,
    so concurrent exporters never expose a half-written model.

    Args:
        model: Takes (N, 3, S, S) float, returns (N, d).
        path: Destination ``.onnx`` file.
        input_size: S, the side of the square input.
        opset: ONNX opset version.

    Returns:
        The path written.

    Raises:
        ModelError: The exporter failed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    model = model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter logs a warning per missing torchvision operator: noise here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(temporary),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=({0: batch},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        temporary.replace(path)
    except Exception as error:  # the exporter raises many unrelated types
        temporary.unlink(missing_ok=True)
        raise ModelError(f"ONNX export to {path} failed: {error}") from error
    finally:
        temporary.with_name(temporary.name + ".data").unlink(missing_ok=True)
    logger.info("Exported %s to %s", type(model).__name__, path)
    return path
