"""Maths of the ArcFace, CosFace and AdaFace heads (property tests)."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from facefed.core.errors import ConfigurationError
from facefed.models.heads import AdaFaceHead, ArcFaceHead, CosFaceHead, create_head

angles = st.floats(min_value=0.01, max_value=math.pi - 0.01)
margins = st.floats(min_value=0.05, max_value=1.2)
scales = st.floats(min_value=1.0, max_value=64.0)


def _planar(head, angle: float, norm: float = 1.0):
    """Class 0 along x, class 1 along y; the embedding at `angle` from class 0."""
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    x = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64) * norm
    return head.double()(x, torch.tensor([0]))[0]


@settings(max_examples=60, deadline=None)
@given(angle=angles, margin=margins, scale=scales)
def test_arcface_target_is_cos_theta_plus_m_where_defined(angle, margin, scale):
    head = ArcFaceHead(2, 2, scale=scale, margin=margin)
    logits = _planar(head, angle)
    if angle + margin < math.pi - 1e-6:
        assert logits[0].item() == pytest.approx(
            scale * math.cos(angle + margin), abs=1e-6
        )
    else:  # the th/mm fallback
        expected = math.cos(angle) - math.sin(math.pi - margin) * margin
        assert logits[0].item() == pytest.approx(scale * expected, abs=1e-6)
    assert logits[1].item() == pytest.approx(scale * math.sin(angle), abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(margin=margins)
def test_arcface_target_logit_decreases_with_the_angle(margin):
    head = ArcFaceHead(2, 2, scale=1.0, margin=margin)
    grid = np.linspace(0.01, math.pi - 0.01, 400)
    values = [_planar(head, a)[0].item() for a in grid]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(values))
    # Past the switch the fallback keeps the margin's first-order size m*sin(m).
    for a, v in zip(grid, values, strict=True):
        if a + margin > math.pi + 0.01:
            assert v == pytest.approx(math.cos(a) - margin * math.sin(margin), abs=1e-6)


def test_arcface_easy_margin_leaves_obtuse_angles_alone():
    head = ArcFaceHead(2, 2, scale=1.0, margin=0.5, easy_margin=True)
    assert _planar(head, 2.0)[0].item() == pytest.approx(math.cos(2.0), abs=1e-6)
    assert _planar(head, 1.0)[0].item() == pytest.approx(math.cos(1.5), abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(angle=angles, margin=st.floats(0.0, 0.9), scale=scales)
def test_cosface_subtracts_m_from_the_target_cosine(angle, margin, scale):
    logits = _planar(CosFaceHead(2, 2, scale=scale, margin=margin), angle)
    assert logits[0].item() == pytest.approx(
        scale * (math.cos(angle) - margin), abs=1e-6
    )
    assert logits[1].item() == pytest.approx(scale * math.sin(angle), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(angle=st.floats(0.7, 2.3), margin=st.floats(0.1, 0.6))
def test_adaface_margin_follows_the_feature_norm(angle, margin):
    head = AdaFaceHead(2, 2, scale=1.0, margin=margin, h=1.0).eval()
    head.batch_mean.fill_(10.0)
    head.batch_std.fill_(2.0)
    # Average norm: q = 0, the CosFace margin.
    average = _planar(head, angle, norm=10.0)
    assert average[0].item() == pytest.approx(math.cos(angle) - margin, abs=1e-6)
    # High norm (q = 1): cos(theta - m) - 2m.
    high = _planar(head, angle, norm=30.0)
    assert high[0].item() == pytest.approx(
        math.cos(angle - margin) - 2 * margin, abs=1e-6
    )
    # Low norm (q = -1): cos(theta + m), no additive term.
    low = _planar(head, angle, norm=1.0)
    assert low[0].item() == pytest.approx(math.cos(angle + margin), abs=1e-6)
    for logits in (average, high, low):  # non-target: plain cosine
        assert logits[1].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_adaface_batch_statistics_move_only_in_training():
    head = AdaFaceHead(8, 4, t_alpha=0.5)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=generator) * 3
    labels = torch.randint(0, 4, (16,), generator=generator)
    head.eval()(x, labels)
    assert head.batch_mean.item() == 20.0
    head.train()(x, labels)
    norms = x.norm(dim=1)
    assert head.batch_mean.item() == pytest.approx(0.5 * 20 + 0.5 * norms.mean().item())
    assert head.batch_std.item() == pytest.approx(0.5 * 100 + 0.5 * norms.std().item())


@pytest.mark.parametrize("name", ["arcface", "cosface", "adaface"])
def test_heads_train_a_separable_problem(name):
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 16, generator=generator)
    labels = torch.arange(5).repeat(20)
    x = centres[labels] + 0.3 * torch.randn(100, 16, generator=generator)
    head = create_head(name, 16, 5, scale=16.0)
    optimiser = torch.optim.SGD(head.parameters(), lr=0.1)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(head(x, labels), labels)
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < first / 2
    predicted = head.cosine(x).argmax(dim=1)
    assert (predicted == labels).float().mean().item() > 0.95


def test_bad_settings_are_refused():
    with pytest.raises(ConfigurationError, match="known: arcface, cosface, adaface"):
        create_head("sphereface", 8, 4)
    with pytest.raises(ConfigurationError, match="margin"):
        ArcFaceHead(8, 4, margin=2.0)
    head = CosFaceHead(8, 4)
    with pytest.raises(ConfigurationError, match=r"0\.\.3"):
        head(torch.randn(2, 8), torch.tensor([0, 4]))
