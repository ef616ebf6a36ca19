"""Closed-form per-sample gradients for Opacus of the layers facefed trains.

Opacus computes per-sample gradients of layer types it does not know by
re-running each layer under `torch.func.vmap`, which made a DP-SGD step tens
of times slower than a plain one here. The two such layers have short closed
forms, registered below (importing this module registers them):

- dlib's per-channel affine layer, y = w * x + b per channel:
  dL/dw_c = sum over pixels of x * g, dL/db_c = sum of g, per sample;
- the cosine head, y = x_hat W_hat^T with unit rows: per sample the gradient
  of the normalised weight is G = g^T x_hat (C x d), and the gradient of W is
  G projected off each row's direction and divided by the row's norm,
  (G_c - (G_c . w_hat_c) w_hat_c) / |w_c|.

For Opacus' ghost clipping (per-sample gradient *norms* without the
per-sample gradients, Li et al., 2022) the head also has a norm sampler:
its per-sample gradient has rows g_c (x_hat - cos_c w_hat_c) / |w_c|, and
since x_hat and w_hat_c are unit vectors, |x_hat - cos_c w_hat_c|^2 =
1 - cos_c^2, so the squared norm is sum_c g_c^2 (1 - cos_c^2) / |w_c|^2:
batch x classes numbers instead of batch x classes x 128. The same trick
covers the layers of `stage5` (``trainable-blocks = 2``): a convolution's
per-sample weight gradient is G A^T (G: output gradients, channels x
positions; A: unfolded inputs, patch values x positions), whose squared
Frobenius norm is sum over position pairs of (A^T A) * (G^T G), and the
affine layer's per-sample gradients are small enough to take norms of.
"""

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn

from facefed.client.federated.training import CosineClassifier
from facefed.core.errors import ConfigurationError
from facefed.models.dlib_resnet import Affine


@register_grad_sampler(Affine)
def affine_grad_sample(
    layer: Affine, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the per-channel scale and shift."""
    inputs = activations[0].to(backprops.dtype)
    samples: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        samples[layer.weight] = torch.einsum("nchw,nchw->nc", inputs, backprops)
    if layer.bias.requires_grad:
        samples[layer.bias] = backprops.sum(dim=(2, 3))
    return samples


@register_grad_sampler(CosineClassifier)
def cosine_grad_sample(
    layer: CosineClassifier, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the cosine head's class centres."""
    if not layer.weight.requires_grad:
        return {}
    inputs = F.normalize(activations[0].to(backprops.dtype), dim=1)
    weight = layer.weight.detach()
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit = weight / norms
    outer = torch.einsum("nc,nd->ncd", backprops, inputs)
    radial = torch.einsum("ncd,cd->nc", outer, unit)
    return {layer.weight: (outer - radial[..., None] * unit) / norms}


@register_norm_sampler(CosineClassifier)
def cosine_norm_sample(
    layer: CosineClassifier, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of the cosine head's class centres."""
    if not layer.weight.requires_grad:
        return {}
    inputs = F.normalize(activations[0].to(backprops.dtype), dim=1)
    weight = layer.weight.detach()
    norms = weight.norm(dim=1).clamp_min(1e-12)
    cosine = inputs @ (weight / norms[:, None]).T
    squared = (backprops**2 * (1.0 - cosine**2).clamp_min(0.0)) / norms**2
    return {layer.weight: squared.sum(dim=1).sqrt()}


@register_norm_sampler(Affine)
def affine_norm_sample(
    layer: Affine, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of the per-channel scale and shift."""
    samples = affine_grad_sample(layer, activations, backprops)
    return {param: sample.norm(dim=1) for param, sample in samples.items()}


@register_norm_sampler(nn.Conv2d)
def conv2d_norm_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a 2-d convolution, without the gradients.

    Ghost norm (Li et al., 2022) for ungrouped, numerically padded layers,
    which is every convolution of dlib's ResNet.
    """
    if layer.groups != 1 or isinstance(layer.padding, str):
        raise ConfigurationError(
            f"Ghost clipping supports ungrouped Conv2d with numeric padding, got "
            f"groups={layer.groups}, padding={layer.padding!r}."
        )
    patches = unfold2d(
        activations[0].to(backprops.dtype),
        kernel_size=layer.kernel_size,
        padding=layer.padding,
        stride=layer.stride,
        dilation=layer.dilation,
    )
    grads = backprops.flatten(2)
    norms: dict[nn.Parameter, torch.Tensor] = {}
    weight, bias = layer.weight, layer.bias
    if isinstance(weight, nn.Parameter) and weight.requires_grad:
        inputs_gram = torch.einsum("nkp,nkq->npq", patches, patches)
        grads_gram = torch.einsum("ncp,ncq->npq", grads, grads)
        squared = (inputs_gram * grads_gram).sum(dim=(1, 2))
        norms[weight] = squared.clamp_min(0.0).sqrt()
    if isinstance(bias, nn.Parameter) and bias.requires_grad:
        norms[bias] = grads.sum(dim=2).norm(dim=1)
    return norms
