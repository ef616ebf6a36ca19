"""One site's part of a training run: data, frozen features, DP rounds, evaluation.

`SiteRuntime` is what the Flower ClientApp calls. It keeps everything that
must not leave the site inside the site folder: chips, trunk features, the
ArcFace head and the privacy ledger. What it returns is only the shared
layers' arrays and scalar metrics.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.model import SplitNetwork, load_network
from facefed.client.federated.store import HeldOutPairs, SiteDataStore
from facefed.client.federated.training import (
    CosineClassifier,
    dp_train,
    noise_multiplier_for,
)
from facefed.core.errors import ConfigurationError, PrivacyBudgetExceededError
from facefed.privacy.dp import DPConfig, PrivacyLedger

logger = logging.getLogger(__name__)

TAR_FAR = 1e-2


@dataclass(frozen=True)
class PairScores:
    """Verification figures of one model (or model pair) on held-out pairs.

    Attributes:
        accuracy: Mean 10-fold verification accuracy (LFW protocol).
        tar: True accept rate at a false accept rate of 1e-2.
    """

    accuracy: float
    tar: float


class SiteRuntime:
    """A site's training state for one run.

    Args:
        site_dir: The site folder (see `SiteDataStore`).
        config: The run's configuration.
        site_id: Name the site is known by in its ledger and the run's metrics;
            defaults to the folder name.
    """

    def __init__(
        self, site_dir: Path | str, config: TrainingConfig, *, site_id: str = ""
    ) -> None:
        self.store = SiteDataStore(site_dir)
        self.config = config
        self.site_id = site_id or self.store.root.name
        self.ledger = PrivacyLedger(self.store.state_dir / "ledger.json")
        self.split = SplitNetwork(
            load_network(config.parent_model), trainable_blocks=config.trainable_blocks
        )

    # -- data ------------------------------------------------------------------

    def ensure_chips(self) -> None:
        """Detect and align the site's photos once (cached in the site folder)."""
        from facefed.client.federated.chips import pipeline_chip_fn

        self.store.prepare(pipeline_chip_fn())

    def _cached_features(self, name: str, chips: np.ndarray) -> torch.Tensor:
        key = f"{name}-{self.split.trunk_fingerprint()}-{_chips_digest(chips)}"
        path = self.store.state_dir / f"features-{key}.pt"
        if path.exists():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(cached, torch.Tensor) and len(cached) == len(chips):
                return cached
        features = self.split.trunk_features(chips)
        for stale in self.store.state_dir.glob(f"features-{name}-*.pt"):
            stale.unlink()
        torch.save(features, path)
        return features

    # -- training --------------------------------------------------------------

    def train_round(
        self,
        shared: dict[str, torch.Tensor],
        *,
        run_id: str,
        server_round: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Fine-tune the shared layers for one round with DP-SGD.

        Args:
            shared: The global shared-layer arrays sent by the server.
            run_id: The Flower run id (ledger entries are per run and round).
            server_round: The round number.

        Returns:
            The new shared arrays and the scalar metrics to report.

        Raises:
            PrivacyBudgetExceededError: This round would take the site past its
                budget; nothing is trained.
        """
        self.ensure_chips()
        samples = self.store.training_samples()
        features = self._cached_features("train", samples.chips)
        self.split.load_shared_state(shared)

        sigma, sample_rate, steps = noise_multiplier_for(
            config=self.config, num_examples=len(samples)
        )
        dp = DPConfig(
            noise_multiplier=sigma,
            max_grad_norm=self.config.max_grad_norm,
            delta=self.config.target_delta,
            target_epsilon=self.config.target_epsilon,
            accountant=self.config.accountant,
        )
        try:
            self.ledger.ensure_budget(
                self.site_id,
                budget=self.config.target_epsilon,
                delta=self.config.target_delta,
                planned_run=(dp, sample_rate, steps),
                accountant=self.config.accountant,
            )
        except PrivacyBudgetExceededError as error:
            # The server sees only this text: say who refused, and why (the
            # ledger's sentence starts with the site's name, said here first).
            why = str(error).replace(f"Site {self.site_id!r} ", "it ", 1)
            raise PrivacyBudgetExceededError(
                f"{self.site_id}: refused the round: {why}"
            ) from error

        generator = _secure_generator()
        head = self._load_head(samples.identities, generator)
        compat = (
            torch.from_numpy(self.split.embed_features(features))
            if self.config.compat == "l2"
            else None
        )
        result = dp_train(
            self.split.top,
            head,
            features,
            torch.from_numpy(samples.labels),
            config=self.config,
            noise_multiplier=sigma,
            generator=generator,
            compat_targets=compat,
        )
        self._save_head(head, samples.identities)

        self.ledger.record_run(
            self.site_id,
            run_id=f"{run_id}-round{server_round}",
            config=dp,
            sample_rate=result.sample_rate,
            steps=result.steps,
        )
        epsilon = self.ledger.spent_epsilon(
            self.site_id,
            delta=self.config.target_delta,
            accountant=self.config.accountant,
        )
        logger.info(
            "Site %s round %d: %d steps, loss %.3f, epsilon %.3f at delta %g",
            self.site_id,
            server_round,
            result.steps,
            result.mean_loss,
            epsilon,
            self.config.target_delta,
        )
        metrics = {
            "num-examples": float(result.num_examples),
            "loss": result.mean_loss,
            "steps": float(result.steps),
            "epsilon": epsilon,
            "delta": self.config.target_delta,
            "noise-multiplier": sigma,
            "sample-rate": result.sample_rate,
        }
        return self.split.shared_state(), metrics

    def _head_path(self) -> Path:
        return self.store.state_dir / "head.pt"

    def _load_head(
        self, identities: tuple[str, ...], generator: torch.Generator
    ) -> CosineClassifier:
        head = CosineClassifier(128, len(identities), generator=generator)
        path = self._head_path()
        if not path.exists():
            return head
        saved = torch.load(path, map_location="cpu", weights_only=True)
        rows = {name: i for i, name in enumerate(saved["identities"])}
        with torch.no_grad():
            # Keep the centres of identities still present; erased or new
            # identities get fresh rows.
            for index, name in enumerate(identities):
                if name in rows:
                    head.weight[index] = saved["weight"][rows[name]]
        return head

    def _save_head(self, head: CosineClassifier, identities: tuple[str, ...]) -> None:
        torch.save(
            {"identities": list(identities), "weight": head.weight.detach().clone()},
            self._head_path(),
        )

    # -- evaluation ------------------------------------------------------------

    def evaluate(
        self,
        shared: dict[str, torch.Tensor],
        *,
        parent: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Score a model (and, with `parent`, the cross-model case) on held-out pairs.

        Args:
            shared: The model's shared-layer arrays.
            parent: The parent model's shared arrays: adds the parent's own
                figures and the cross-model ones (templates from the parent,
                probes from the new model).

        Returns:
            Scalar metrics: num-examples (pairs), accuracy, tar-far-1e-2, and with
            a parent parent-accuracy, parent-tar-far-1e-2, cross-accuracy,
            cross-tar-far-1e-2.
        """
        self.ensure_chips()
        pairs = self.store.heldout_pairs()
        first = self._cached_features("heldout1", pairs.first)
        second = self._cached_features("heldout2", pairs.second)
        new_first, new_second = self._embed_with(shared, first, second)
        own = score_pairs(new_first, new_second, pairs)
        metrics = {
            "num-examples": float(len(pairs)),
            "accuracy": own.accuracy,
            "tar-far-1e-2": own.tar,
        }
        if parent is not None:
            old_first, old_second = self._embed_with(parent, first, second)
            old = score_pairs(old_first, old_second, pairs)
            cross = score_pairs(old_first, new_second, pairs)
            metrics |= {
                "parent-accuracy": old.accuracy,
                "parent-tar-far-1e-2": old.tar,
                "cross-accuracy": cross.accuracy,
                "cross-tar-far-1e-2": cross.tar,
            }
        return metrics

    def _embed_with(
        self, shared: dict[str, torch.Tensor], *features: torch.Tensor
    ) -> list[np.ndarray]:
        self.split.load_shared_state(shared)
        return [self.split.embed_features(f) for f in features]


def score_pairs(
    first: np.ndarray, second: np.ndarray, pairs: HeldOutPairs
) -> PairScores:
    """Accuracy and TAR at FAR 1e-2 of unit embeddings of the two sides of pairs.

    Accuracy follows the LFW protocol (each fold judged at the threshold best
    on the others; C's `kfold_accuracy`) with up to 10 folds, assigned round
    robin within genuine and within impostor pairs so every fold has both.
    """
    from facefed.core.verification import kfold_accuracy, tar_at_far

    scores = np.sum(first * second, axis=1)
    same = pairs.same.astype(bool)
    count = int(min(same.sum(), (~same).sum()))
    if count < 2:
        raise ConfigurationError(
            f"Held-out pairs need at least 2 genuine and 2 impostor pairs, got "
            f"{int(same.sum())} and {int((~same).sum())}."
        )
    folds = np.zeros(len(same), np.int64)
    for kind in (same, ~same):
        folds[kind] = np.arange(int(kind.sum())) % min(10, count)
    tar, _ = tar_at_far(scores, same, TAR_FAR)
    return PairScores(
        accuracy=kfold_accuracy(scores, same, folds).mean,
        tar=float(tar),
    )


def _chips_digest(chips: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(chips.tobytes()).hexdigest()[:16]


def _secure_generator() -> torch.Generator:
    import secrets

    # DP noise must be unpredictable to everyone else, the server included:
    # a seed it could know would let it subtract the noise. Seed from the OS.
    return torch.Generator().manual_seed(secrets.randbits(63))
