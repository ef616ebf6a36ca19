"""Margin-based classification heads for training face embeddings.

Each head holds one weight vector per training identity and turns a batch of
embeddings into logits for a softmax cross-entropy loss; the target class's
logit is penalised by a margin so that classes separate by angle:

* ArcFace (Deng et al., CVPR 2019): additive angular margin,
  target logit ``s * cos(theta + m)``.
* CosFace (Wang et al., CVPR 2018, "large margin cosine loss"): additive
  cosine margin, target logit ``s * (cos(theta) - m)``.
* AdaFace (Kim et al., CVPR 2022): the margin adapts to image quality, read
  from the embedding's norm relative to batch statistics.

Non-target logits are ``s * cos(theta)`` for all three. Heads stay on the
site in federated training; only the backbone is shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from facefed.core.errors import ConfigurationError

HeadName = Literal["arcface", "cosface", "adaface"]
_EPS = 1e-6


class _MarginHead(nn.Module):
    """Shared parts: class weights, cosine of every class, validation."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes < 2:
            raise ConfigurationError(
                f"A margin head needs a positive embedding size and at least two "
                f"classes, got {embedding_size} and {num_classes}."
            )
        if scale <= 0:
            raise ConfigurationError(f"The logit scale must be positive, got {scale}.")
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine between each embedding and each class centre, (N, classes)."""
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))
        return cos.clamp(-1.0 + _EPS, 1.0 - _EPS)

    def _one_hot(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if labels.dim() != 1 or labels.shape[0] != like.shape[0]:
            raise ConfigurationError(
                f"Labels must be a 1-d tensor of {like.shape[0]} class indices, "
                f"got shape {tuple(labels.shape)}."
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= like.shape[1]):
            raise ConfigurationError(
                f"Labels must be in 0..{like.shape[1] - 1}, got "
                f"{int(labels.min())}..{int(labels.max())}."
            )
        return F.one_hot(labels.long(), like.shape[1]).to(like.dtype)


class ArcFaceHead(_MarginHead):
    """ArcFace: additive angular margin (Deng et al., CVPR 2019, eq. 3).

    Where ``theta + m`` would pass pi, ``cos(theta + m)`` stops decreasing and
    would reward a worse angle; as in the paper's reference implementation the
    target logit then falls back to ``cos(theta) - m * sin(m)`` (the "th/mm"
    rule: used when ``cos(theta) <= cos(pi - m)``), the first-order size of
    the margin, which keeps the logit decreasing in theta (with a small
    downward step at the switch). With ``easy_margin`` the margin is
    applied only when ``cos(theta) > 0`` (the paper's easy-margin variant).

    Args:
        embedding_size: Length of the embeddings.
        num_classes: Number of training identities.
        scale: Logit scale ``s`` (64 in the paper).
        margin: Angular margin ``m`` in radians (0.5 in the paper).
        easy_margin: Use the easy-margin variant instead of the th/mm rule.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not 0.0 <= margin < math.pi / 2:
            raise ConfigurationError(
                f"The ArcFace margin must be in [0, pi/2) radians, got {margin}."
            )
        self.margin = margin
        self.easy_margin = easy_margin
        self._threshold = math.cos(math.pi - margin)
        self._fallback = math.sin(math.pi - margin) * margin

    def target_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        """Return the margin-penalised cosine of a target class."""
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(0.0))
        with_margin = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        if self.easy_margin:
            return torch.where(cos > 0, with_margin, cos)
        return torch.where(cos > self._threshold, with_margin, cos - self._fallback)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return (N, classes) logits."""
        cos = self.cosine(embeddings)
        one_hot = self._one_hot(labels, cos)
        logits = one_hot * self.target_cosine(cos) + (1.0 - one_hot) * cos
        return self.scale * logits


class CosFaceHead(_MarginHead):
    """CosFace: additive cosine margin (Wang et al., CVPR 2018, eq. 4).

    Args:
        embedding_size: Length of the embeddings.
        num_classes: Number of training identities.
        scale: Logit scale ``s`` (64 in the paper).
        margin: Cosine margin ``m`` (0.35 in the paper).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.35,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not 0.0 <= margin < 1.0:
            raise ConfigurationError(
                f"The CosFace margin must be in [0, 1), got {margin}."
            )
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return (N, classes) logits."""
        cos = self.cosine(embeddings)
        one_hot = self._one_hot(labels, cos)
        return self.scale * (cos - one_hot * self.margin)


class AdaFaceHead(_MarginHead):
    """AdaFace: quality-adaptive margin (Kim et al., CVPR 2022, eqs. 9-12).

    The feature norm ``||z||`` stands for image quality. It is standardised
    with running batch statistics (mean and standard deviation, updated by an
    exponential moving average with momentum ``t_alpha`` in training mode) and
    clipped: ``q = clip((||z|| - mu) / (sigma + eps) * h, -1, 1)``. The target
    logit is then ``s * (cos(theta + g_angle) - g_add)`` with
    ``g_angle = -m q`` and ``g_add = m q + m``: a high-quality sample (q = 1)
    gets ``cos(theta - m) - 2m``, an average one the CosFace margin ``m``, a
    low-quality one (q = -1) the ArcFace-like ``cos(theta + m)``. The angle is
    kept within [eps, pi - eps].

    Args:
        embedding_size: Length of the embeddings.
        num_classes: Number of training identities.
        scale: Logit scale ``s`` (64 in the paper).
        margin: Margin ``m`` (0.4 in the paper).
        h: Concentration of the quality term (0.333 in the paper).
        t_alpha: Momentum of the batch statistics (0.01 in the paper).
    """

    batch_mean: torch.Tensor
    batch_std: torch.Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not 0.0 <= margin < math.pi / 2 or h <= 0 or not 0.0 < t_alpha <= 1.0:
            raise ConfigurationError(
                f"AdaFace needs margin in [0, pi/2), h > 0 and t_alpha in (0, 1]; "
                f"got {margin}, {h}, {t_alpha}."
            )
        self.margin = margin
        self.h = h
        self.t_alpha = t_alpha
        # Initial statistics as in the paper's code: mean 20, std 100.
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def quality(self, norms: torch.Tensor) -> torch.Tensor:
        """Return the clipped, standardised quality ``q`` of each norm."""
        scaled = (norms - self.batch_mean) / (self.batch_std + 1e-3) * self.h
        return scaled.clamp(-1.0, 1.0)

    def _update_statistics(self, norms: torch.Tensor) -> None:
        if not self.training or norms.numel() < 2:
            return
        with torch.no_grad():
            mean, std = norms.mean(), norms.std()
            self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * mean)
            self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return (N, classes) logits; in training mode, update batch statistics."""
        cos = self.cosine(embeddings)
        one_hot = self._one_hot(labels, cos)
        norms = embeddings.detach().norm(dim=1).clamp(1e-3, 100.0)
        self._update_statistics(norms)
        q = self.quality(norms).unsqueeze(1)
        theta = torch.acos(cos)
        theta_m = (theta - one_hot * self.margin * q).clamp(_EPS, math.pi - _EPS)
        logits = torch.cos(theta_m) - one_hot * (self.margin * q + self.margin)
        return self.scale * logits


_HEADS: dict[str, Callable[..., _MarginHead]] = {
    "arcface": ArcFaceHead,
    "cosface": CosFaceHead,
    "adaface": AdaFaceHead,
}


def create_head(
    name: str, embedding_size: int, num_classes: int, **options: float | bool
) -> nn.Module:
    """Create a margin head by name (``arcface``, ``cosface`` or ``adaface``).

    Raises:
        ConfigurationError: Unknown name or invalid options.
    """
    try:
        factory = _HEADS[name]
    except KeyError:
        raise ConfigurationError(
            f"Unknown margin head {name!r}; known: {', '.join(_HEADS)}."
        ) from None
    try:
        return factory(embedding_size, num_classes, **options)
    except TypeError as error:
        raise ConfigurationError(f"Bad options for the {name} head: {error}") from error
