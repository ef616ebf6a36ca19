"""Per-sample clipping in one backward pass for the default shared top, the projection.

With ``trainable-blocks = 1`` the shared top is dlib's final 256-to-128
projection, a bias-free linear layer on the average-pooled trunk features,
and the site's cosine head sits on top of it. For such a model every
per-sample gradient has a closed form in quantities one backward pass
already gives (the "book-keeping" idea of Bu et al., 2023, "Differentially
Private Optimization on Large Model at Small Cost"):

- the projection's per-sample gradient is the outer product d_i x_i^T of the
  gradient d_i of sample i's loss with respect to its embedding and its
  pooled input x_i, so its norm is |d_i| |x_i| and the clipped sum is one
  matrix product, (c * D)^T X;
- the head's per-sample gradient norm comes from the gradient of the loss
  with respect to the cosine logits (`grad_samplers.cosine_norm_sample`),
  and its clipped sum is one more backward pass through the head alone,
  with each row of those logit gradients scaled by its clipping factor.

Opacus' ghost clipping (used for deeper tops) runs the whole backward pass
twice instead. Noise, the averaging over the expected batch size, Poisson
sampling and accounting stay Opacus' (`DPOptimizerFastGradientClipping`,
`DPDataLoader`): this module only fills each parameter's ``.grad`` with the
sum of the clipped per-sample gradients, which is what that optimiser
expects. `tests/federated/test_federated_training.py` checks the result
against clipping each sample's gradient by hand.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from facefed.client.federated.grad_samplers import cosine_norm_sample
from facefed.client.federated.training import CosineClassifier, SiteLoss
from facefed.models.dlib_resnet import EmbeddingHead

# Opacus' clipping factor is C / (norm + 1e-6), capped at 1: keep the same.
NORM_EPSILON = 1e-6


def projection_of(
    top: nn.Module,
) -> tuple[nn.Linear, Callable[[torch.Tensor], torch.Tensor]] | None:
    """The top's linear layer and what it is applied to, if the top is only that.

    Returns:
        ``(layer, inputs_of)`` where ``inputs_of(features)`` gives the layer's
        input, for a bias-free `nn.Linear` or a stage list holding only dlib's
        `EmbeddingHead` (average pooling then the projection); None for any
        other top, which then needs Opacus' ghost clipping.
    """
    if isinstance(top, nn.Linear) and top.bias is None:
        return top, lambda features: features
    stages = getattr(top, "order", None)
    if stages == ["embedding"] and isinstance(top.embedding, EmbeddingHead):
        return top.embedding.fc, lambda features: features.mean(dim=(2, 3))
    return None


def clip_projection_and_head(
    top: nn.Module,
    head: CosineClassifier,
    criterion: SiteLoss,
    features: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    *,
    max_grad_norm: float,
) -> torch.Tensor:
    """Set ``.grad`` of the projection and head to their clipped per-sample sums.

    Args:
        top: A top accepted by `projection_of`.
        head: The site's cosine head.
        criterion: The site's loss (ArcFace plus the optional compat term).
        features: A batch of frozen-trunk features (may be empty).
        labels: Class index of each sample.
        targets: Parent-model embeddings for the compat term (or placeholders).
        max_grad_norm: Per-sample clipping bound C.

    Returns:
        Each sample's loss (detached).

    Raises:
        ValueError: The top is not a lone projection.
    """
    found = projection_of(top)
    if found is None:
        raise ValueError("clip_projection_and_head needs a lone bias-free projection.")
    layer, inputs_of = found
    inputs = inputs_of(features)

    # Embeddings as a leaf: the gradient of the summed loss with respect to
    # them is, row by row, each sample's own gradient (losses are per sample).
    embeddings = F.linear(inputs, layer.weight.detach()).requires_grad_(True)
    cosine = head(embeddings)
    losses = criterion.per_sample(embeddings, cosine, labels, targets)
    if losses.numel() == 0:
        layer.weight.grad = torch.zeros_like(layer.weight)
        head.weight.grad = torch.zeros_like(head.weight)
        return losses.detach()
    embedding_grads, cosine_grads = torch.autograd.grad(
        losses.sum(), [embeddings, cosine], retain_graph=True
    )

    projection_norms = embedding_grads.norm(dim=1) * inputs.norm(dim=1)
    head_norms = cosine_norm_sample(head, [embeddings.detach()], cosine_grads)[
        head.weight
    ]
    total = torch.sqrt(projection_norms**2 + head_norms**2)
    factors = (max_grad_norm / (total + NORM_EPSILON)).clamp(max=1.0)

    layer.weight.grad = (factors[:, None] * embedding_grads).T @ inputs
    (head.weight.grad,) = torch.autograd.grad(
        cosine, head.weight, grad_outputs=factors[:, None] * cosine_grads
    )
    return losses.detach()
