"""Local DP-SGD fine-tuning of the shared layers with a site-local ArcFace head.

The frozen lower layers of the embedding network have no trainable
parameters, so their output is a fixed function of each sample: the site
computes those features once and DP-SGD trains only the shared top and the
margin head on them. Per-sample clipping and noise are applied to every
trained parameter, the head included, because the head feeds the shared
layers' gradients in later steps (Abadi et al., 2016, "Deep Learning with
Differential Privacy"). Opacus draws batches by Poisson sampling, which the
privacy amplification of the accountant assumes, and adds the noise.

Clipping takes one of two paths. The default shared top, the final
projection alone, gets every per-sample gradient norm and the clipped sum
from a single backward pass (`fast_clipping`); deeper tops use Opacus' ghost
clipping, which runs the backward pass twice. Both give the sum of clipped
per-sample gradients to the same Opacus optimiser.

The margin is applied outside the module Opacus wraps: the wrapped head only
computes cosine logits (one input, one output, as Opacus' per-sample gradient
machinery needs) and `arcface_loss` adds the angular margin to the target
logit (Deng et al., 2019, "ArcFace: Additive Angular Margin Loss").
"""

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from facefed.client.federated.config import TrainingConfig
from facefed.core.errors import ConfigurationError

Reduction = Literal["mean", "none"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTrainResult:
    """What one site's local round did.

    Attributes:
        num_examples: Training samples at the site.
        steps: Optimiser steps taken.
        mean_loss: Mean training loss over the steps.
        noise_multiplier: Gaussian noise multiplier sigma used.
        sample_rate: Poisson sampling rate q = batch_size / num_examples.
    """

    num_examples: int
    steps: int
    mean_loss: float
    noise_multiplier: float
    sample_rate: float


class CosineClassifier(nn.Module):
    """Cosine similarities between L2-normalised embeddings and class centres.

    Args:
        embedding_size: Size of the embeddings.
        num_classes: Identities at the site.
        generator: Source of the initial class centres.
    """

    def __init__(
        self, embedding_size: int, num_classes: int, *, generator: torch.Generator
    ) -> None:
        super().__init__()
        weight = torch.randn(num_classes, embedding_size, generator=generator)
        self.weight = nn.Parameter(weight / math.sqrt(embedding_size))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine logits (N, num_classes) of embeddings (N, d)."""
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))


def arcface_loss(
    cosine: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float,
    margin: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """ArcFace loss: cross-entropy of s*cos(theta + m) on the target class.

    Args:
        cosine: Cosine logits (N, C) from a `CosineClassifier`.
        labels: Class index of each row (N,).
        scale: Feature scale s.
        margin: Additive angular margin m in radians.
        reduction: "mean" over the batch, or "none" for each sample's loss.

    Returns:
        The mean loss over the batch (a scalar; zero for an empty batch), or
        the (N,) per-sample losses.
    """
    if cosine.shape[0] == 0:
        return cosine.sum() * 0.0 if reduction == "mean" else cosine.sum(dim=1)
    target = cosine.gather(1, labels[:, None]).clamp(-1 + 1e-6, 1 - 1e-6)
    theta = torch.acos(target)
    # Past pi - m, cos(theta + m) stops decreasing; use the linear fallback of
    # the ArcFace paper so the target logit stays monotonic in theta.
    with_margin = torch.where(
        theta + margin < math.pi,
        torch.cos(theta + margin),
        target - margin * math.sin(margin),
    )
    logits = cosine.scatter(1, labels[:, None], with_margin)
    return F.cross_entropy(scale * logits, labels, reduction=reduction)


class SiteLoss(nn.Module):
    """The site's loss, per sample or averaged, as Opacus' ghost clipping needs it.

    Opacus' fast gradient clipping (``grad_sample_mode="ghost"``) calls the
    criterion with ``reduction = "none"`` to get each sample's loss, backpropagates
    once for the per-sample gradient norms, then a second time with each
    sample's loss scaled by its clipping factor (Li et al., 2022, "Large
    Language Models Can Be Strong Differentially Private Learners").

    Args:
        config: The run's configuration (ArcFace scale and margin, compat term).
    """

    def __init__(self, config: TrainingConfig) -> None:
        super().__init__()
        self.config = config
        self.reduction: Reduction = "mean"

    def forward(
        self,
        embeddings: torch.Tensor,
        cosine: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """ArcFace loss plus, with ``compat="l2"``, the compatibility term."""
        losses = self.per_sample(embeddings, cosine, labels, targets)
        return losses.mean() if self.reduction == "mean" else losses

    def per_sample(
        self,
        embeddings: torch.Tensor,
        cosine: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Each sample's loss (N,), whatever `reduction` says."""
        losses = arcface_loss(
            cosine,
            labels,
            scale=self.config.arcface_scale,
            margin=self.config.arcface_margin,
            reduction="none",
        )
        if self.config.compat == "l2" and labels.numel():
            losses = losses + self.config.compat_weight * compatibility_loss(
                embeddings, targets, reduction="none"
            )
        return losses


class _TopWithHead(nn.Module):
    """The trained part: shared top layers, then the site's cosine head."""

    def __init__(self, top: nn.Module, head: CosineClassifier) -> None:
        super().__init__()
        self.top = top
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.top(features)
        return embeddings, self.head(embeddings)


def noise_multiplier_for(
    *, config: TrainingConfig, num_examples: int
) -> tuple[float, float, int]:
    """Calibrate sigma so the whole run reaches the target epsilon at delta.

    Every round of the run uses the same sigma, calibrated for all the run's
    steps at this site's sampling rate; the ledger then composes the rounds
    actually trained, so the budget holds even if the run is cut short.

    Returns:
        Noise multiplier, sample rate, and steps per round.
    """
    from opacus.accountants.utils import get_noise_multiplier

    # Opacus' DPDataLoader samples each example with probability
    # q = 1 / len(loader), len(loader) = ceil(N / batch size), and takes that
    # many steps per epoch: account exactly those, not a rounded N / B.
    batches = math.ceil(num_examples / min(config.batch_size, num_examples))
    sample_rate = 1.0 / batches
    steps_per_round = config.local_epochs * batches
    sigma = get_noise_multiplier(
        target_epsilon=config.target_epsilon,
        target_delta=config.target_delta,
        sample_rate=sample_rate,
        steps=steps_per_round * config.num_rounds,
        accountant=config.accountant,
    )
    return float(sigma), sample_rate, steps_per_round


def warn_insecure_rng() -> None:
    """Log, every time training starts, that Opacus' noise is not from a CSPRNG."""
    logger.warning(
        "DP-SGD noise comes from torch's default pseudo-random generator, not a "
        "cryptographically secure one: Opacus' secure_mode needs torchcsprng, "
        "which is not on PyPI. The epsilon reported assumes ideal Gaussian noise."
    )


def dp_train(
    top: nn.Module,
    head: CosineClassifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: TrainingConfig,
    noise_multiplier: float,
    generator: torch.Generator,
    compat_targets: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> LocalTrainResult:
    """Run one round of local DP-SGD on precomputed frozen-trunk features.

    Args:
        top: The shared layers (trained in place; their parameters must be
            the only trainable ones in `top`).
        head: The site's cosine head (trained in place, never shared).
        features: Frozen-trunk outputs of the training chips (N, ...).
        labels: Class index of each sample (N,).
        config: The run's training configuration.
        noise_multiplier: Gaussian noise multiplier sigma (from
            `noise_multiplier_for`, checked against the budget by the caller).
        generator: Source of Poisson sampling and DP noise.
        compat_targets: Parent-model embeddings of the same samples (N, d);
            with `config.compat == "l2"`, adds the compatibility term.
        on_step: Called with (step, loss) after each step.

    Returns:
        The round's figures.

    Raises:
        ConfigurationError: The inputs do not line up.
    """
    from facefed.client.federated.fast_clipping import projection_of

    num_examples = int(labels.shape[0])
    if features.shape[0] != num_examples or num_examples == 0:
        raise ConfigurationError(
            f"features ({features.shape[0]}) and labels ({num_examples}) must be "
            "non-empty and of equal length."
        )
    if config.compat != "none" and compat_targets is None:
        raise ConfigurationError(
            f"compat={config.compat!r} needs the parent model's embeddings."
        )
    targets = (
        compat_targets if compat_targets is not None else torch.zeros(num_examples, 1)
    )
    dataset = TensorDataset(features, labels, targets)
    loader = DataLoader(
        dataset, batch_size=min(config.batch_size, num_examples), generator=generator
    )
    model = _TopWithHead(top, head).train()
    optimizer = torch.optim.SGD(
        [
            {"params": [p for p in top.parameters() if p.requires_grad]},
            {
                "params": list(head.parameters()),
                "lr": config.learning_rate * config.head_lr_scale,
            },
        ],
        lr=config.learning_rate,
        momentum=0.9,
    )

    warn_insecure_rng()
    with warnings.catch_warnings():
        # Opacus warns about secure_mode on every call; said once above.
        warnings.simplefilter("ignore", UserWarning)
        if projection_of(top) is not None:
            step, private_loader, release = _one_backward_dp(
                top, head, optimizer, loader, config, noise_multiplier, generator
            )
        else:
            step, private_loader, release = _ghost_dp(
                model, optimizer, loader, config, noise_multiplier, generator
            )

    steps, total_loss = 0, 0.0
    with warnings.catch_warnings():
        # The trunk features need no gradient, so torch notes that Opacus'
        # backward hooks fire on module outputs only: expected here.
        warnings.filterwarnings("ignore", message="Full backward hook")
        for _ in range(config.local_epochs):
            for batch_features, batch_labels, batch_targets in private_loader:
                value = step(batch_features, batch_labels, batch_targets)
                steps += 1
                total_loss += value
                if on_step is not None:
                    on_step(steps, value)

    release()
    return LocalTrainResult(
        num_examples=num_examples,
        steps=steps,
        mean_loss=total_loss / max(steps, 1),
        noise_multiplier=noise_multiplier,
        # Opacus' DPDataLoader samples each example with q = 1 / len(loader).
        sample_rate=1.0 / len(loader),
    )


# One DP-SGD step on a batch (features, labels, compat targets): its mean loss.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]


def _one_backward_dp(
    top: nn.Module,
    head: CosineClassifier,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    config: TrainingConfig,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[Step, DataLoader, Callable[[], None]]:
    """DP-SGD for a lone projection: clipping in one backward pass (`fast_clipping`).

    Poisson sampling, noise and averaging are Opacus' own, set up as its
    `make_private` does for ghost clipping.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from facefed.client.federated.fast_clipping import clip_projection_and_head

    private_loader = DPDataLoader.from_data_loader(loader, generator=generator)
    expected_batch_size = int(len(loader.dataset) * private_loader.sample_rate)  # type: ignore[arg-type]
    private_optimizer = DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=False,
    )
    criterion = SiteLoss(config)

    def step(
        features: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
    ) -> float:
        private_optimizer.zero_grad(set_to_none=True)
        losses = clip_projection_and_head(
            top,
            head,
            criterion,
            features,
            labels,
            targets,
            max_grad_norm=config.max_grad_norm,
        )
        private_optimizer.step()
        # Poisson sampling can draw an empty batch: the step still adds the
        # noise (the accountant counts it), and its loss counts as 0.
        return float(losses.mean()) if labels.numel() else 0.0

    def release() -> None:
        for parameter in [*top.parameters(), *head.parameters()]:
            _drop_opacus_state(parameter)

    return step, private_loader, release


def _ghost_dp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    config: TrainingConfig,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[Step, DataLoader, Callable[[], None]]:
    """DP-SGD for deeper tops: Opacus' ghost clipping (two backward passes).

    Per-sample gradient norms come in closed form (Opacus' for linear
    layers, `grad_samplers` for the head, stage5's convolutions and dlib's
    affine layers), never the per-sample gradients themselves, whose size
    is batch x parameters.
    """
    from opacus import PrivacyEngine

    # Registers closed-form per-sample gradients of the affine layers and head.
    from facefed.client.federated import grad_samplers  # noqa: F401

    engine = PrivacyEngine(accountant=config.accountant, secure_mode=False)
    private_model, private_optimizer, criterion, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=SiteLoss(config),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=True,
        noise_generator=generator,
        grad_sample_mode="ghost",
    )

    def step(
        features: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
    ) -> float:
        private_optimizer.zero_grad(set_to_none=True)
        embeddings, cosine = private_model(features)
        loss = criterion(embeddings, cosine, labels, targets)
        loss.backward()
        private_optimizer.step()
        return float(loss.detach()) if labels.numel() else 0.0

    return step, private_loader, lambda: _unwrap(private_model)


def compatibility_loss(
    new: torch.Tensor, old: torch.Tensor, *, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Cosine distance between new embeddings and the parent model's (mean or each).

    This is the L2 form (on unit vectors, |a - b|^2 = 2 - 2 cos) of the
    backward-compatible training idea of Shen et al., 2020 ("Towards
    Backward-Compatible Representation Learning", CVPR): keep the new
    embedding of a sample near where the old model put it, so probes from the
    new model still match templates enrolled with the old one.
    """
    distances = 1.0 - F.cosine_similarity(new, old, dim=1)
    return distances.mean() if reduction == "mean" else distances


def _unwrap(private_model: nn.Module) -> None:
    # Opacus leaves hooks and per-sample gradient buffers on the wrapped
    # modules; remove them so the layers can be exported and reused.
    remove = getattr(private_model, "_close", None)
    if callable(remove):
        remove()
    for parameter in private_model.parameters():
        _drop_opacus_state(parameter)


def _drop_opacus_state(parameter: nn.Parameter) -> None:
    for name in ("grad_sample", "_forward_counter", "summed_grad"):
        if hasattr(parameter, name):
            delattr(parameter, name)
    parameter.grad = None
