"""DP-SGD on the shared top: what changes, what stays frozen, what is accounted."""

import copy
import math

import numpy as np
import pytest
import torch

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.model import SplitNetwork, load_network
from facefed.client.federated.profiles import degrade, known_profiles
from facefed.client.federated.site import SiteRuntime
from facefed.client.federated.training import (
    CosineClassifier,
    arcface_loss,
    noise_multiplier_for,
)
from facefed.core.errors import ConfigurationError, PrivacyBudgetExceededError
from facefed.privacy.dp import epsilon_from_history


def test_arcface_margin_makes_the_target_harder():
    generator = torch.Generator().manual_seed(0)
    cosine = torch.rand(16, 5, generator=generator) * 1.6 - 0.8
    labels = torch.randint(0, 5, (16,), generator=generator)
    plain = arcface_loss(cosine, labels, scale=16.0, margin=0.0)
    margin = arcface_loss(cosine, labels, scale=16.0, margin=0.4)
    expected = torch.nn.functional.cross_entropy(16.0 * cosine, labels)
    assert plain.item() == pytest.approx(expected.item(), rel=1e-5)
    assert margin.item() > plain.item()


def test_noise_is_calibrated_to_the_whole_run():
    config = TrainingConfig(num_rounds=3, batch_size=8, target_epsilon=4.0)
    sigma, rate, steps = noise_multiplier_for(config=config, num_examples=50)
    assert rate == pytest.approx(1 / math.ceil(50 / 8))
    assert steps == math.ceil(50 / 8)
    run = epsilon_from_history([(sigma, rate, steps * 3)], delta=1e-5)
    assert 3.9 < run <= 4.0


def test_split_network_matches_the_full_network():
    network = load_network()
    split = SplitNetwork(network, trainable_blocks=2)
    chips = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), np.uint8)
    full = network(torch.from_numpy(chips).permute(0, 3, 1, 2).float())
    full = torch.nn.functional.normalize(full, dim=1).detach().numpy()
    ours = split.embed_features(split.trunk_features(chips))
    np.testing.assert_allclose(ours, full, atol=1e-5)
    assert sorted(split.shared_state()) == sorted(
        k for k in network.state_dict() if k.startswith(("stage5.", "embedding."))
    )


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [1, 2])
def test_round_trains_top_only_and_records_epsilon(sites, blocks):
    config = TrainingConfig(
        num_rounds=2, batch_size=8, target_epsilon=8.0, trainable_blocks=blocks
    )
    runtime = SiteRuntime(sites[0], config)
    trunk_before = {k: v.clone() for k, v in runtime.split.trunk.state_dict().items()}
    shared = runtime.split.shared_state()

    updated, metrics = runtime.train_round(shared, run_id="r1", server_round=1)

    assert all(not torch.equal(updated[k], shared[k]) for k in shared)
    for key, value in runtime.split.trunk.state_dict().items():
        assert torch.equal(value, trunk_before[key]), key
    assert 0 < metrics["epsilon"] <= 8.0
    assert metrics["num-examples"] >= 20
    assert runtime.ledger.spent_epsilon(runtime.site_id, delta=1e-5) == pytest.approx(
        metrics["epsilon"]
    )
    # The head stays at the site, next to its ledger.
    assert (sites[0] / ".facefed" / "head.pt").exists()


@pytest.mark.slow
def test_site_refuses_a_round_past_its_budget(sites):
    config = TrainingConfig(num_rounds=1, batch_size=8, target_epsilon=2.0)
    runtime = SiteRuntime(sites[0], config)
    shared = runtime.split.shared_state()
    runtime.train_round(shared, run_id="r1", server_round=1)
    entries = len(runtime.ledger.entries())
    # The run was calibrated for one round: a second one would overspend.
    with pytest.raises(PrivacyBudgetExceededError):
        runtime.train_round(shared, run_id="r1", server_round=2)
    assert len(runtime.ledger.entries()) == entries


def test_config_round_trips_through_flower_and_rejects_bad_values():
    config = TrainingConfig(num_rounds=3, site_dirs=("a", "b"), compat="l2")
    assert TrainingConfig.from_flower(config.to_flower()) == config
    with pytest.raises(ConfigurationError, match="target_delta"):
        TrainingConfig(target_delta=2.0)
    with pytest.raises(ConfigurationError, match="compat"):
        TrainingConfig.from_flower({"compat": "magic"})
    with pytest.raises(ConfigurationError, match="num-rounds"):
        TrainingConfig.from_flower({"num-rounds": "many"})
    with pytest.raises(ConfigurationError, match="head_lr_scale must be positive"):
        TrainingConfig(head_lr_scale=0.0)
    # Every field has a key in the Flower app config of pyproject.toml, which
    # `flwr run --run-config` overrides need.
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(TrainingConfig().to_flower())


@pytest.mark.parametrize("profile", [p for p in known_profiles() if p != "clean"])
def test_camera_profiles_degrade_real_photos(test_data, profile):
    import cv2

    bgr = cv2.imread(str(test_data / "lfw" / "Ann_Veneman" / "Ann_Veneman_0001.jpg"))
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    out = degrade(image, profile, rng=np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8
    difference = np.abs(out.astype(int) - image.astype(int)).mean()
    assert difference > 2.0
    if profile == "lowres_gray":
        assert np.array_equal(out[..., 0], out[..., 1])
    if profile == "low_light":
        assert out.mean() < image.mean() / 2


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ConfigurationError, match="low_light"):
        degrade(np.zeros((4, 4, 3), np.uint8), "fog", rng=np.random.default_rng(0))


def test_closed_form_per_sample_gradients_match_opacus_functorch():
    import copy

    from opacus import GradSampleModule

    from facefed.client.federated import grad_samplers  # noqa: F401
    from facefed.models.dlib_resnet import Affine

    generator = torch.Generator().manual_seed(3)
    cases = [
        (Affine(4), torch.randn(5, 4, 3, 3, generator=generator)),
        (CosineClassifier(8, 3, generator=generator), torch.randn(5, 8)),
    ]
    for layer, inputs in cases:
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        reference = GradSampleModule(copy.deepcopy(layer), force_functorch=True)
        ours = GradSampleModule(copy.deepcopy(layer))
        for module in (reference, ours):
            (module(inputs) ** 2).sum().backward()
        for expected, got in zip(
            reference.parameters(), ours.parameters(), strict=True
        ):
            torch.testing.assert_close(
                got.grad_sample, expected.grad_sample, rtol=1e-4, atol=1e-4
            )


def test_head_norm_sampler_matches_the_norms_of_its_per_sample_gradients():
    from facefed.client.federated.grad_samplers import (
        cosine_grad_sample,
        cosine_norm_sample,
    )

    generator = torch.Generator().manual_seed(5)
    head = CosineClassifier(16, 7, generator=generator)
    with torch.no_grad():
        head.weight.mul_(1.0 + torch.rand(7, 1, generator=generator))
    inputs = [torch.randn(9, 16, generator=generator)]
    backprops = torch.randn(9, 7, generator=generator)
    per_sample = cosine_grad_sample(head, inputs, backprops)[head.weight]
    norms = cosine_norm_sample(head, inputs, backprops)[head.weight]
    torch.testing.assert_close(norms, per_sample.flatten(1).norm(dim=1))


def test_ghost_clipped_step_equals_clipping_each_sample_by_hand():
    """Ghost clipping (two backward passes, norms only) = clip-then-sum, no noise."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from facefed.client.federated.training import SiteLoss, _TopWithHead

    generator = torch.Generator().manual_seed(11)
    features = torch.randn(6, 10, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    targets = torch.randn(6, 4, generator=generator)
    config = TrainingConfig(max_grad_norm=0.05, compat="l2")
    top = torch.nn.Linear(10, 4, bias=False)
    head = CosineClassifier(4, 3, generator=generator)
    reference = _TopWithHead(copy.deepcopy(top), copy.deepcopy(head))

    model = _TopWithHead(top, head)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(features, labels, targets), batch_size=6)
    private, private_optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        criterion=SiteLoss(config),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=False,
        grad_sample_mode="ghost",
    )
    private_optimizer.zero_grad()
    criterion(*private(features), labels, targets).backward()
    private_optimizer.step()

    loss_fn = SiteLoss(config)
    summed = [torch.zeros_like(p) for p in reference.parameters()]
    factors = []
    for index in range(6):
        reference.zero_grad()
        one = slice(index, index + 1)
        loss_fn(*reference(features[one]), labels[one], targets[one]).backward()
        grads = [p.grad.clone() for p in reference.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, config.max_grad_norm / (float(norm) + 1e-6))
        factors.append(factor)
        summed = [s + factor * g for s, g in zip(summed, grads, strict=True)]
    assert min(factors) < 1.0  # clipping is engaged, not a no-op
    for parameter, before, total in zip(
        model.parameters(), reference.parameters(), summed, strict=True
    ):
        # lr 1, loss averaged over the batch of 6: the step is the mean.
        torch.testing.assert_close(
            before.detach() - parameter.detach(), total / 6, rtol=1e-4, atol=1e-6
        )


def _projection_tops() -> list[tuple[torch.nn.Module, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(10, 4, bias=False)
    split = SplitNetwork(load_network(), trainable_blocks=1)
    # Trunk features are ReLU outputs: non-negative maps of 256 channels.
    maps = torch.rand(6, 256, 3, 3, generator=generator)
    return [(linear, torch.randn(6, 10, generator=generator)), (split.top, maps)]


@pytest.mark.parametrize("case", [0, 1], ids=["linear", "dlib-projection"])
def test_one_backward_clipping_equals_clipping_each_sample_by_hand(case):
    """The projection's one-pass clipping gives the sum of clipped per-sample grads."""
    from facefed.client.federated.fast_clipping import clip_projection_and_head
    from facefed.client.federated.training import SiteLoss, _TopWithHead

    top, features = _projection_tops()[case]
    generator = torch.Generator().manual_seed(11)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    config = TrainingConfig(max_grad_norm=0.05, compat="l2")
    head = CosineClassifier(128 if case else 4, 3, generator=generator)
    targets = torch.randn(6, 128 if case else 4, generator=generator)
    reference = _TopWithHead(copy.deepcopy(top), copy.deepcopy(head))

    losses = clip_projection_and_head(
        top,
        head,
        SiteLoss(config),
        features,
        labels,
        targets,
        max_grad_norm=config.max_grad_norm,
    )

    loss_fn = SiteLoss(config)
    trained = [p for p in reference.parameters() if p.requires_grad]
    summed = [torch.zeros_like(p) for p in trained]
    factors, each_loss = [], []
    for index in range(6):
        reference.zero_grad()
        one = slice(index, index + 1)
        loss = loss_fn(*reference(features[one]), labels[one], targets[one])
        loss.backward()
        each_loss.append(float(loss))
        grads = [p.grad.clone() for p in trained]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, config.max_grad_norm / (float(norm) + 1e-6))
        factors.append(factor)
        summed = [s + factor * g for s, g in zip(summed, grads, strict=True)]
    assert min(factors) < 1.0  # clipping is engaged, not a no-op
    torch.testing.assert_close(losses, torch.tensor(each_loss), rtol=1e-5, atol=1e-6)
    own = [p for p in [*top.parameters(), *head.parameters()] if p.requires_grad]
    for parameter, total in zip(own, summed, strict=True):
        torch.testing.assert_close(parameter.grad, total, rtol=1e-4, atol=1e-7)


def test_training_takes_the_one_backward_path_only_for_a_lone_projection():
    from facefed.client.federated.fast_clipping import projection_of

    assert projection_of(torch.nn.Linear(10, 4, bias=False)) is not None
    assert projection_of(torch.nn.Linear(10, 4, bias=True)) is None
    network = load_network()
    assert projection_of(SplitNetwork(network, trainable_blocks=1).top) is not None
    assert projection_of(SplitNetwork(network, trainable_blocks=2).top) is None


def test_stage5_norm_samplers_match_the_norms_of_opacus_per_sample_gradients():
    from opacus import GradSampleModule

    from facefed.client.federated.grad_samplers import (
        affine_norm_sample,
        conv2d_norm_sample,
    )
    from facefed.models.dlib_resnet import Affine

    generator = torch.Generator().manual_seed(7)
    cases = [
        (torch.nn.Conv2d(3, 4, 3, 1, 1), torch.randn(5, 3, 6, 6, generator=generator)),
        (torch.nn.Conv2d(3, 4, 3, 2, 0), torch.randn(5, 3, 7, 7, generator=generator)),
        (Affine(4), torch.randn(5, 4, 3, 3, generator=generator)),
    ]
    for layer, inputs in cases:
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        wrapped = GradSampleModule(copy.deepcopy(layer), loss_reduction="sum")
        outputs = wrapped(inputs)
        backprops = torch.randn(outputs.shape, generator=generator)
        (outputs * backprops).sum().backward()
        sampler = (
            conv2d_norm_sample
            if isinstance(layer, torch.nn.Conv2d)
            else (affine_norm_sample)
        )
        norms = sampler(layer, [inputs], backprops)
        for own, param in zip(layer.parameters(), wrapped.parameters(), strict=True):
            torch.testing.assert_close(
                norms[own],
                param.grad_sample.flatten(1).norm(dim=1),
                rtol=1e-4,
                atol=1e-5,
            )


def test_an_empty_poisson_batch_still_steps_and_reports_a_finite_loss():
    from facefed.client.federated.training import dp_train

    generator = torch.Generator().manual_seed(2)
    top = torch.nn.Linear(10, 4, bias=False)
    head = CosineClassifier(4, 3, generator=generator)
    before = top.weight.detach().clone()
    # Sample rate 1/N = 1/200: most batches of this tiny run are empty.
    result = dp_train(
        top,
        head,
        torch.randn(200, 10, generator=generator),
        torch.arange(200) % 3,
        config=TrainingConfig(batch_size=1, max_grad_norm=1.0),
        noise_multiplier=1.0,
        generator=generator,
    )
    assert result.steps == 200
    assert math.isfinite(result.mean_loss)
    assert torch.isfinite(top.weight).all() and not torch.equal(top.weight, before)
