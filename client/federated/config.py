"""The configuration of a federated training run, shared by the server and the sites.

Flower carries run configuration as flat ``key = value`` pairs (kebab-case
keys in ``[tool.flwr.app.config]`` of pyproject.toml, overridable with
``flwr run --run-config``); `TrainingConfig` is the typed, validated form of
those pairs, and the only place their defaults live.
"""

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from facefed.core.errors import ConfigurationError

Accountant = Literal["rdp", "prv"]
CentralDP = Literal["none", "server-fixed"]
CompatMode = Literal["none", "l2"]
SecureAggregation = Literal["none", "secaggplus"]


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run needs to agree on between server and sites.

    Attributes:
        num_rounds: Federated rounds.
        site_dirs: Site folders, one per simulated SuperNode (simulation only;
            a deployed SuperNode names its folder in its node config).
        trainable_blocks: How many of the network's top stages are fine-tuned
            and shared (1 = the final projection only); lower layers stay frozen.
        local_epochs: Passes over the local data per round.
        batch_size: Expected batch size (Poisson sampling draws around it).
        learning_rate: SGD learning rate (momentum 0.9) of the shared layers
            and the head. Keep it small: dlib's projection weights average
            0.008, and at 0.05 the DP noise alone moved them by 5x their norm
            in 5 rounds (a random projection: own accuracy kept, cross-model
            accuracy lost).
        head_lr_scale: The site head's learning rate as a multiple of
            `learning_rate`. The head starts from random class centres every
            run; a faster head finds them in the first steps, so the shared
            layers are not pulled towards random directions meanwhile.
        target_epsilon: Per-site privacy budget for the whole run.
        target_delta: Delta of the (epsilon, delta) guarantee.
        max_grad_norm: Per-sample gradient clipping bound (Abadi et al., 2016).
        accountant: Opacus accountant, RDP (Mironov, 2017) or PRV
            (Gopi et al., 2021).
        arcface_scale: ArcFace feature scale s (Deng et al., 2019).
        arcface_margin: ArcFace additive angular margin m in radians.
        compat: Backward-compatible training term (Shen et al., 2020): none,
            or "l2", a pull of each new embedding towards the parent model's
            embedding of the same sample (see `training.compatibility_loss`).
        compat_weight: Weight of the compatibility term.
        min_fit_fraction: Fraction of the sampled sites whose updates a round
            needs to be aggregated; fewer leaves the model unchanged.
        min_sites: Sites that must be connected before a round starts.
        central_dp: Optional Flower central DP wrapper on the server.
        central_noise_multiplier: Noise multiplier of the central wrapper.
        central_clipping_norm: Update clipping norm of the central wrapper.
        secure_aggregation: "secaggplus" runs every training round through
            Flower's SecAgg+ protocol (Bell et al., CCS 2020): the server
            learns only the sample-weighted average of the sites' updates.
        secagg_num_shares: Sites each site secret-shares its masks with
            (itself included); 0 for every sampled site.
        secagg_threshold: Shares needed to rebuild a site's mask; every site
            needs this many of its share holders to stay to the end of the
            round, and this many sites colluding with the server could
            rebuild one site's masks.
        secagg_clipping_range: Bound on each coordinate of a site's update
            (its change to the shared layers in a round) before quantisation;
            larger values are clipped.
        secagg_max_weight: Largest training-sample count a site may have;
            weights are quantised as a fraction of it.
        run_dir: Folder where the server writes progress and the message log.
        parent_model: Folder of a published model version to start from;
            empty for the shipped dlib weights.
        round_timeout: Seconds the server waits for the sites' replies.
    """

    num_rounds: int = 5
    site_dirs: tuple[str, ...] = ()
    trainable_blocks: int = 1
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.0005
    head_lr_scale: float = 1.0
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Accountant = "rdp"
    arcface_scale: float = 32.0
    arcface_margin: float = 0.3
    compat: CompatMode = "none"
    compat_weight: float = 1.0
    min_fit_fraction: float = 0.5
    min_sites: int = 2
    central_dp: CentralDP = "none"
    central_noise_multiplier: float = 0.0
    central_clipping_norm: float = 1.0
    secure_aggregation: SecureAggregation = "none"
    secagg_num_shares: int = 0
    secagg_threshold: int = 2
    secagg_clipping_range: float = 0.05
    secagg_max_weight: float = 10000.0
    run_dir: str = ""
    parent_model: str = ""
    round_timeout: float = 600.0
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _positive_int("num_rounds", self.num_rounds)
        _positive_int("trainable_blocks", self.trainable_blocks)
        _positive_int("local_epochs", self.local_epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("min_sites", self.min_sites)
        for name in (
            "learning_rate",
            "head_lr_scale",
            "target_epsilon",
            "max_grad_norm",
            "arcface_scale",
            "round_timeout",
            "central_clipping_norm",
            "secagg_clipping_range",
            "secagg_max_weight",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(
                    f"{name} must be positive, got {getattr(self, name)!r}."
                )
        if not 0 < self.target_delta < 1:
            raise ConfigurationError(
                f"target_delta must be in (0, 1), got {self.target_delta!r}."
            )
        if not 0 < self.min_fit_fraction <= 1:
            raise ConfigurationError(
                f"min_fit_fraction must be in (0, 1], got {self.min_fit_fraction!r}."
            )
        if not 0 <= self.arcface_margin < 1.5:
            raise ConfigurationError(
                f"arcface_margin must be in [0, 1.5) radians, got "
                f"{self.arcface_margin!r}."
            )
        if self.compat_weight < 0 or self.central_noise_multiplier < 0:
            raise ConfigurationError(
                "compat_weight and central_noise_multiplier must not be negative."
            )
        _choice("accountant", self.accountant, Accountant)
        _choice("compat", self.compat, CompatMode)
        _choice("central_dp", self.central_dp, CentralDP)
        _choice("secure_aggregation", self.secure_aggregation, SecureAggregation)
        if self.secure_aggregation == "secaggplus":
            self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        if self.central_dp != "none":
            raise ConfigurationError(
                f"secure_aggregation='secaggplus' cannot be combined with "
                f"central_dp={self.central_dp!r}: central DP clips each site's "
                "update on the server, and SecAgg+ never shows the server one."
            )
        if not isinstance(self.secagg_threshold, int) or self.secagg_threshold < 2:
            raise ConfigurationError(
                f"secagg_threshold must be an integer of at least 2, got "
                f"{self.secagg_threshold!r}."
            )
        shares = self.secagg_num_shares
        if shares != 0 and (not isinstance(shares, int) or shares < 3):
            raise ConfigurationError(
                f"secagg_num_shares must be 0 (every sampled site) or at least 3, "
                f"got {shares!r}."
            )
        if shares and self.secagg_threshold >= shares:
            raise ConfigurationError(
                f"secagg_threshold ({self.secagg_threshold}) must be smaller than "
                f"secagg_num_shares ({shares})."
            )
        sites = len(self.site_dirs) or self.min_sites
        if sites < self.secagg_threshold:
            raise ConfigurationError(
                f"SecAgg+ needs at least secagg_threshold={self.secagg_threshold} "
                f"sites in every round, but the run has {sites}."
            )

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """The flat, kebab-case form Flower's run config carries.

        Every key must also be declared in ``[tool.flwr.app.config]`` of
        pyproject.toml: ``flwr run --run-config`` refuses keys it does not
        declare (a test checks the two agree).
        """
        flat: dict[str, bool | int | float | str] = {}
        for item in dataclasses.fields(self):
            if item.name == "extra":
                continue
            value = getattr(self, item.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            flat[item.name.replace("_", "-")] = value
        return flat

    @classmethod
    def from_flower(
        cls, flat: Mapping[str, object], *, kebab_case_errors: bool = False
    ) -> "TrainingConfig":
        """Build a config from Flower's run config, ignoring keys it does not know.

        Args:
            flat: The run config (kebab-case keys).
            kebab_case_errors: Name keys in error messages as a config file
                or a command line spells them (``secagg-threshold``) rather
                than as Python does (``secagg_threshold``).

        Raises:
            ConfigurationError: A value has the wrong type or is out of range.
        """
        known = {item.name: item for item in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for key, value in flat.items():
            name = str(key).replace("-", "_")
            if name not in known or name == "extra":
                continue
            if name == "site_dirs":
                text = str(value)
                values[name] = tuple(p for p in text.split(",") if p)
                continue
            default = known[name].default
            try:
                if isinstance(default, bool):
                    values[name] = bool(value)
                elif isinstance(default, int):
                    values[name] = int(value)  # type: ignore[call-overload]
                elif isinstance(default, float):
                    values[name] = float(value)  # type: ignore[arg-type]
                else:
                    values[name] = str(value)
            except (TypeError, ValueError) as error:
                raise ConfigurationError(
                    f"Run config {key} has an invalid value {value!r}."
                ) from error
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ConfigurationError as error:
            if not kebab_case_errors:
                raise
            raise ConfigurationError(_kebab_case_names(str(error))) from None

    def replace(self, **changes: object) -> "TrainingConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# Keys a `facefed train --config` file's [training] table may hold beyond the
# run config: the site folders, as a TOML list.
FILE_ONLY_KEYS = ("sites",)


def run_config_keys() -> tuple[str, ...]:
    """Every key of Flower's run config (`TrainingConfig.to_flower`), kebab-case."""
    return tuple(
        item.name.replace("_", "-")
        for item in dataclasses.fields(TrainingConfig)
        if item.name != "extra"
    )


def training_table(document: Mapping[str, object], source: str) -> dict[str, object]:
    """The ``[training]`` table of a parsed config file, every key checked.

    Args:
        document: The parsed TOML document.
        source: Where it came from (the file's path), for the messages.

    Raises:
        ConfigurationError: The document has no ``[training]`` table, or the
            table holds a key no run config has (the message names it and the
            closest known key, so a typo never passes silently).
    """
    table = document.get("training")
    if not isinstance(table, Mapping):
        raise ConfigurationError(
            f"{source} has no [training] table: put the run's keys under a "
            "[training] header (sites = [...], num-rounds = 5, ...)."
        )
    known = (*FILE_ONLY_KEYS, *run_config_keys())
    for key in table:
        if key not in known:
            raise ConfigurationError(_unknown_key_message(str(key), known, source))
    return dict(table)


def _unknown_key_message(key: str, known: tuple[str, ...], source: str) -> str:
    message = f"{source}: [training] has an unknown key {key!r}."
    close = difflib.get_close_matches(key.replace("_", "-"), known, n=1, cutoff=0.6)
    if close:
        return f"{message} Did you mean {close[0]!r}?"
    return f"{message} Known keys: {', '.join(sorted(known))}."


def _kebab_case_names(message: str) -> str:
    for item in dataclasses.fields(TrainingConfig):
        if "_" in item.name:
            kebab = item.name.replace("_", "-")
            message = re.sub(rf"\b{item.name}\b", kebab, message)
    return message


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, got {value!r}.")


def _choice(name: str, value: str, kind: object) -> None:
    choices = get_args(kind)
    if value not in choices:
        raise ConfigurationError(
            f"{name} must be one of {', '.join(choices)}; got {value!r}."
        )
