"""Offline evaluation of a published model against its parent, site by site.

For each site folder (and the clean held-out set) it reports accuracy and
TAR at FAR 1e-2 of the parent ("before") and of the new model ("after"), the
cross-model figures (templates of the parent, probes of the new model), and
the epsilon each site spent, read from the model's training summary. It runs
where the site folders are, i.e. at the sites or on an admin's test bed; in a
real federation the same figures come from the sites' evaluate replies.
"""

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from facefed.client.federated.config import TrainingConfig
from facefed.client.federated.model import WEIGHTS_FILE
from facefed.core.errors import ConfigurationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteComparison:
    """Before/after figures of one site's held-out pairs.

    Attributes:
        site: Site folder name.
        pairs: Usable held-out pairs.
        before_accuracy: Parent model's k-fold accuracy.
        before_tar: Parent model's TAR at FAR 1e-2.
        after_accuracy: New model's accuracy.
        after_tar: New model's TAR at FAR 1e-2.
        cross_accuracy: Accuracy of parent templates against new probes.
        cross_tar: TAR at FAR 1e-2 of the same.
        epsilon: Epsilon the site spent in the run (None for a non-training set).
    """

    site: str
    pairs: int
    before_accuracy: float
    before_tar: float
    after_accuracy: float
    after_tar: float
    cross_accuracy: float
    cross_tar: float
    epsilon: float | None


def compare_models(model_dir: Path, site_dirs: list[Path]) -> list[SiteComparison]:
    """Score a published model and its parent on each folder's held-out pairs.

    Raises:
        ConfigurationError: The model folder is not a published version.
    """
    from facefed.client.federated.site import SiteRuntime

    summary_path = model_dir / "training.json"
    if not summary_path.exists() or not (model_dir / WEIGHTS_FILE).exists():
        raise ConfigurationError(f"{model_dir} is not a published model version.")
    summary = json.loads(summary_path.read_text())
    config = TrainingConfig.from_flower(summary["config"])
    weights = torch.load(
        model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True
    )
    results = []
    for folder in site_dirs:
        runtime = SiteRuntime(folder, config)
        parent = runtime.split.shared_state()
        after = {k: weights[k] for k in parent}
        metrics = runtime.evaluate(after, parent=parent)
        epsilon = summary.get("epsilon", {}).get(runtime.site_id)
        results.append(
            SiteComparison(
                site=runtime.site_id,
                pairs=int(metrics["num-examples"]),
                before_accuracy=metrics["parent-accuracy"],
                before_tar=metrics["parent-tar-far-1e-2"],
                after_accuracy=metrics["accuracy"],
                after_tar=metrics["tar-far-1e-2"],
                cross_accuracy=metrics["cross-accuracy"],
                cross_tar=metrics["cross-tar-far-1e-2"],
                epsilon=epsilon,
            )
        )
        logger.info("Evaluated %s on %s", model_dir.name, runtime.site_id)
    return results


def plot_comparison(results: list[SiteComparison], path: Path) -> None:
    """Bar chart of before/after/cross accuracy and TAR per site, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.site for r in results]
    x = np.arange(len(results))
    for axis, metric in zip(axes, ("accuracy", "tar"), strict=True):
        for offset, which in ((-0.27, "before"), (0.0, "after"), (0.27, "cross")):
            values = [getattr(r, f"{which}_{metric}") for r in results]
            axis.bar(x + offset, values, width=0.26, label=which)
        axis.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_title("k-fold accuracy" if metric == "accuracy" else "TAR at FAR 1e-2")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def results_table(results: list[SiteComparison]) -> str:
    """A Markdown table of the comparison."""
    lines = [
        "| set | pairs | acc before | acc after | TAR@1e-2 before | TAR@1e-2 after "
        "| cross acc | cross TAR | epsilon |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        epsilon = "-" if r.epsilon is None else f"{r.epsilon:.2f}"
        lines.append(
            f"| {r.site} | {r.pairs} | {r.before_accuracy:.4f} "
            f"| {r.after_accuracy:.4f} "
            f"| {r.before_tar:.4f} | {r.after_tar:.4f} | {r.cross_accuracy:.4f} "
            f"| {r.cross_tar:.4f} | {epsilon} |"
        )
    return "\n".join(lines)


def write_report(results: list[SiteComparison], out: Path) -> None:
    """Write `federated_eval.json`, `.md` and `.png` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "federated_eval.json").write_text(
        json.dumps([asdict(r) for r in results], indent=1)
    )
    (out / "federated_eval.md").write_text(results_table(results) + "\n")
    plot_comparison(results, out / "federated_eval.png")
